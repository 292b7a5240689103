import pytest
import torch

import lmrt
from tests.conftest import DEVICE

MODULE_PAIRS = [
    (lmrt.nn.LayerNorm, torch.nn.LayerNorm, dict(normalized_shape=8)),
    (lmrt.nn.LayerNorm, torch.nn.LayerNorm, dict(normalized_shape=(5, 8), bias=False)),
    (lmrt.nn.LayerNorm, torch.nn.LayerNorm, dict(normalized_shape=8, elementwise_affine=False, eps=1e-3)),
    (lmrt.nn.RMSNorm, torch.nn.RMSNorm, dict(normalized_shape=8)),
    (lmrt.nn.RMSNorm, torch.nn.RMSNorm, dict(normalized_shape=[5, 8], eps=1e-6, elementwise_affine=False)),
]


@pytest.mark.parametrize("lmrt_cls,torch_cls,kwargs", MODULE_PAIRS, ids=lambda v: str(v))
def test_drop_in_for_torch_module(lmrt_cls, torch_cls, kwargs):
    reference = torch_cls(**kwargs, device=DEVICE)
    for param in reference.parameters():
        torch.nn.init.normal_(param)
    module = lmrt_cls(**kwargs, device=DEVICE)
    module.load_state_dict(reference.state_dict())
    assert module.state_dict().keys() == reference.state_dict().keys()
    torch_cls(**kwargs, device=DEVICE).load_state_dict(module.state_dict())
    assert isinstance(module, torch_cls)
    assert repr(module).replace(lmrt_cls.__name__, "") == repr(reference).replace(torch_cls.__name__, "")

    x = torch.randn(3, 5, 8, device=DEVICE, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with lmrt.backend("triton"):
        y = module(x)
        y.square().sum().backward()
    y_ref = reference(x_ref)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for (name, param), ref_param in zip(module.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param.grad, ref_param.grad, msg=name)
