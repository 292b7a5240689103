"""The GPU launch path of the attention kernels (autotuner, configuration tables), exercised without a GPU."""

import pytest
import torch

import lmrt
from lmrt import backends, reference

attention = pytest.importorskip("lmrt.kernels.attention")


@pytest.mark.parametrize("name", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("head_dim,head_dim_v,expected", [(40, 40, 64), (128, 96, 128), (59, 160, 256)])
def test_autotuner_keeps_the_table_of_the_head_dim(name, head_dim, head_dim_v, expected):
    tuned = attention._TUNED[name]
    block_d, block_dv = attention._block_dim(head_dim), attention._block_dim(head_dim_v)
    kept = tuned.early_config_prune(tuned.configs, {}, BLOCK_D=block_d, BLOCK_DV=block_dv)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept] == sorted(
        attention.CONFIGS[name][expected])


@pytest.mark.skipif(backends.unavailable_reason("triton", "cpu") is not None, reason="needs the Triton interpreter")
def test_autotuned_launch_path_on_the_interpreter(monkeypatch):
    """The autotuned kernels and their grid functions give the same results; one configuration per table, so
    the autotuner has nothing to time and runs under the interpreter."""
    for tables in attention.CONFIGS.values():
        for head_dim in tables:
            monkeypatch.setitem(tables, head_dim, [min(tables[head_dim])])
    monkeypatch.setattr(attention, "_use_autotuner", lambda device: True)
    q, k, v = (torch.randn(1, 2, 150, 32, requires_grad=True) for _ in range(3))  # rows and keys of several tiles
    with lmrt.backend("triton"):
        out = lmrt.ops.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = reference.scaled_dot_product_attention(*exact_inputs, is_causal=True)
    exact.sum().backward()
    for result, expected in zip((out, q.grad, k.grad, v.grad), (exact, *(t.grad for t in exact_inputs)), strict=True):
        torch.testing.assert_close(result.double(), expected, atol=1e-4, rtol=1e-4)
