import math

import pytest
import torch

import lmrt
from lmrt.patching import PatchReport, Replacement
from tests.conftest import DEVICE
from tests.tolerance import assert_within_torch_error

D = 32


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(D)
        self.rms = torch.nn.RMSNorm(D, eps=1e-6)
        self.proj = torch.nn.Linear(D, D)
        self.attn_softmax = torch.nn.Softmax(dim=-1)

    def forward(self, x):
        h = self.proj(self.rms(self.norm(x)))
        return x + self.attn_softmax(h @ h.transpose(-1, -2) / math.sqrt(D)) @ h


class CustomLayerNorm(torch.nn.LayerNorm):
    """A subclass may compute something else: patch leaves it alone."""

    def forward(self, x):
        return super().forward(x) * 2


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block() for _ in range(2)])
        self.head = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.LayerNorm(D, bias=False),
                                        torch.nn.RMSNorm(D, elementwise_affine=False))
        self.final = lmrt.nn.LayerNorm(D)  # already lmrt's
        self.custom = CustomLayerNorm(D)
        for param in self.parameters():  # norms' weights other than ones, so that a lost weight shows
            torch.nn.init.normal_(param, std=0.5)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.custom(self.final(self.head(x)))


EXPECTED = [
    ("blocks.0.norm", torch.nn.LayerNorm, lmrt.nn.LayerNorm),
    ("blocks.0.rms", torch.nn.RMSNorm, lmrt.nn.RMSNorm),
    ("blocks.0.attn_softmax", torch.nn.Softmax, lmrt.nn.Softmax),
    ("blocks.1.norm", torch.nn.LayerNorm, lmrt.nn.LayerNorm),
    ("blocks.1.rms", torch.nn.RMSNorm, lmrt.nn.RMSNorm),
    ("blocks.1.attn_softmax", torch.nn.Softmax, lmrt.nn.Softmax),
    ("head.1", torch.nn.LayerNorm, lmrt.nn.LayerNorm),
    ("head.2", torch.nn.RMSNorm, lmrt.nn.RMSNorm),
]


def forward_backward(model, x, grad_output):
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad()
    out = model(x)
    out.backward(grad_output.to(out.dtype))
    return [out.detach(), x.grad] + [param.grad for param in model.parameters()]


def _double(model):
    double = Net().to(DEVICE, torch.float64)
    double.load_state_dict(model.state_dict())
    return double


def test_report_lists_replacements():
    model = Net()
    report = lmrt.patch(model)
    assert isinstance(report, PatchReport)
    assert [(r.name, r.old_class, r.new_class) for r in report.replaced] == EXPECTED
    assert len(report) == len(EXPECTED) and report.skipped == ()
    for name, _, new_class in EXPECTED:
        assert type(model.get_submodule(name)) is new_class
    assert type(model.final) is lmrt.nn.LayerNorm and type(model.custom) is CustomLayerNorm
    text = str(report)
    assert text.splitlines()[0] == "lmrt.patch replaced 8 modules:"
    assert "  blocks.0.norm: torch.nn.LayerNorm -> lmrt.nn.LayerNorm" in text.splitlines()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_outputs_and_gradients_match_unpatched(backend):
    model = Net().to(DEVICE)
    x, grad_output = torch.randn(2, 5, D, device=DEVICE), torch.randn(2, 5, D, device=DEVICE)
    # The model holds an lmrt.nn.LayerNorm: on the torch backend it is PyTorch's own computation, so that the
    # bound below is PyTorch's error and not that of whichever backend the default order picks.
    with lmrt.backend("torch"):
        expected = forward_backward(model, x, grad_output)
        exact = forward_backward(_double(model), x.double(), grad_output.double())  # float64: the reference only
    lmrt.patch(model)
    with lmrt.backend(backend):
        results = forward_backward(model, x, grad_output)
    names = ["output", "grad_input"] + [f"grad {name}" for name, _ in model.named_parameters()]
    for name, result, torch_result, exact_result in zip(names, results, expected, exact, strict=True):
        if backend == "torch":  # the reference backend: PyTorch's own computation up to rounding
            torch.testing.assert_close(result, torch_result, msg=name)
        else:
            assert_within_torch_error(name, result, torch_result, exact_result)


def test_parameters_state_dict_and_optimizer_carry_over():
    model = Net()
    params_before = dict(model.named_parameters())
    state_before = model.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    original_norm = model.blocks[0].norm

    lmrt.patch(model)
    assert {name: id(p) for name, p in model.named_parameters()} == {name: id(p) for name, p in params_before.items()}
    assert model.blocks[0].norm.weight is original_norm.weight and model.blocks[0].norm.bias is original_norm.bias
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    for key, value in state_before.items():
        assert torch.equal(state_after[key], value), key

    weight_before = original_norm.weight.detach().clone()
    model(torch.randn(2, 5, D)).square().sum().backward()
    optimizer.step()
    assert original_norm.weight.grad is not None
    assert not torch.equal(original_norm.weight, weight_before)


@pytest.mark.parametrize("training", [True, False])
def test_training_mode_kept(training):
    model = Net().train(training)
    lmrt.patch(model)
    assert all(module.training == training for module in model.modules())


def test_unpatch_restores_originals_and_patch_is_idempotent():
    model = Net()
    originals = {name: model.get_submodule(name) for name, _, _ in EXPECTED}
    lmrt.patch(model)
    assert len(lmrt.patch(model)) == 0  # lmrt's modules are not patched again
    model.eval()

    report = lmrt.unpatch(model)
    assert [(r.name, r.old_class, r.new_class) for r in report.replaced] == [(n, new, old) for n, old, new in EXPECTED]
    assert str(report).startswith("lmrt.unpatch replaced 8 modules:")
    for name, module in originals.items():
        assert model.get_submodule(name) is module
        assert not module.training  # the mode set while patched
    assert type(model.final) is lmrt.nn.LayerNorm  # lmrt's own from the start: not lmrt.patch's to undo
    assert len(lmrt.unpatch(model)) == 0
    assert len(lmrt.patch(model)) == len(EXPECTED)


def test_unpatch_takes_the_current_parameters():
    model = Net()
    lmrt.patch(model)
    model.blocks[0].norm.weight = torch.nn.Parameter(torch.zeros(D))
    lmrt.unpatch(model)
    assert torch.equal(model.blocks[0].norm.weight, torch.zeros(D))


def test_shared_module_replaced_once():
    model = Net()
    model.blocks[1].norm = model.blocks[0].norm
    report = lmrt.patch(model)
    assert {"blocks.0.norm", "blocks.1.norm"} <= {r.name for r in report.replaced}
    assert model.blocks[0].norm is model.blocks[1].norm
    assert type(model.blocks[0].norm) is lmrt.nn.LayerNorm


def test_modules_it_cannot_swap_are_reported_and_left_alone():
    model = Net()
    model.blocks[0].attn_softmax = torch.nn.Softmax()  # implicit dim: not supported by lmrt.nn.Softmax
    model.blocks[1].norm.forward = lambda x: x  # a per-instance forward, as hook libraries install
    report = lmrt.patch(model)
    assert [(s.name, s.module_class) for s in report.skipped] == [
        ("blocks.0.attn_softmax", torch.nn.Softmax), ("blocks.1.norm", torch.nn.LayerNorm)]
    assert "dim=None" in report.skipped[0].reason and "forward" in report.skipped[1].reason
    assert type(model.blocks[0].attn_softmax) is torch.nn.Softmax and type(model.blocks[1].norm) is torch.nn.LayerNorm
    assert "left 2 as they are:" in str(report)


def test_hooks_carried_over():
    model = Net()
    seen = []
    model.blocks[0].norm.register_forward_hook(lambda module, args, output: seen.append(type(module)))
    lmrt.patch(model)
    model(torch.randn(1, 3, D))
    assert seen == [lmrt.nn.LayerNorm]


def test_hook_handles_and_changes_while_patched_hold_on_both_sides():
    """Hooks are the module's, not copies: a handle taken before patching removes its hook from the replacement, and
    what is registered or set while patched stays after unpatch."""
    model = Net()
    seen = []
    handle = model.blocks[0].norm.register_forward_hook(lambda module, args, output: seen.append("before"))
    lmrt.patch(model)
    handle.remove()
    model.blocks[0].norm.register_forward_hook(lambda module, args, output: seen.append("while"))
    model.blocks[0].norm.eps = 0.5
    model(torch.randn(1, 3, D))
    assert seen == ["while"]
    lmrt.unpatch(model)
    model(torch.randn(1, 3, D))
    assert seen == ["while", "while"] and model.blocks[0].norm.eps == 0.5


def test_a_module_compiled_by_module_compile_is_left_alone():
    """Its compiled call runs the original's forward on the original's parameters whatever class holds it: a
    replacement would be reported and never run."""
    model = Net()
    model.blocks[0].norm.compile(backend="eager")
    report = lmrt.patch(model)
    assert [(s.name, s.module_class) for s in report.skipped] == [("blocks.0.norm", torch.nn.LayerNorm)]
    assert "Module.compile()" in report.skipped[0].reason and type(model.blocks[0].norm) is torch.nn.LayerNorm


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"lmrt.patch: `model` is itself a torch.nn.LayerNorm; only submodules"):
        lmrt.patch(torch.nn.LayerNorm(4))
    with pytest.raises(TypeError, match=r"lmrt.unpatch: `model` must be a torch.nn.Module, got list"):
        lmrt.unpatch([])


def test_report_str_when_nothing_replaced():
    report = lmrt.patch(torch.nn.Linear(2, 2))
    assert len(report) == 0 and not report
    assert str(report) == "lmrt.patch replaced 0 modules"
    assert str(Replacement("a.b", torch.nn.RMSNorm, lmrt.nn.RMSNorm)) == "a.b: torch.nn.RMSNorm -> lmrt.nn.RMSNorm"
