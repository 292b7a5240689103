"""The GPU launch path of the attention kernels (autotuner, configuration tables), exercised without a GPU."""

import pytest
import torch

import lmrt
from lmrt import backends, reference

attention = pytest.importorskip("lmrt.kernels.attention")


@pytest.mark.parametrize("name", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("head_dim,head_dim_v,expected", [(40, 40, 64), (128, 96, 128), (59, 160, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_autotuner_keeps_the_table_of_the_head_dim(name, head_dim, head_dim_v, expected, dtype):
    """16-bit inputs tune over their head dim's table; float32 ones also over the small tile that always fits."""
    tuned = attention._tuned(name, 4096, 4096)
    block_d, block_dv = attention._block_dim(head_dim), attention._block_dim(head_dim_v)
    q = torch.empty(0, dtype=dtype)
    kept = tuned.early_config_prune(tuned.configs, {"q_ptr": q}, BLOCK_D=block_d, BLOCK_DV=block_dv)
    wanted = attention.CONFIGS[name][expected] + ([attention.SMALL_CONFIGS[name]] if dtype == torch.float32 else [])
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept] == sorted(wanted)


@pytest.mark.skipif(backends.unavailable_reason("triton", "cpu") is not None, reason="needs the Triton interpreter")
def test_autotuned_launch_path_on_the_interpreter(monkeypatch):
    """The autotuned kernels and their grid functions give the same results; one configuration per table, so
    the autotuner has nothing to time and runs under the interpreter."""
    for tables in attention.CONFIGS.values():
        for head_dim in tables:
            monkeypatch.setitem(tables, head_dim, [min(tables[head_dim])])
    for name, tables in attention.CONFIGS.items():  # float32 inputs add the small tile to the list: make it the same
        monkeypatch.setitem(attention.SMALL_CONFIGS, name, tables[64][0])
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


def test_autotuned_per_size_class(monkeypatch):
    """A GPU launch takes the autotuner of its size class (its programs' rows in all, and the length each walks,
    rounded up to powers of two), so a small first launch does not choose the tile of every later one."""
    monkeypatch.setattr(attention, "_use_autotuner", lambda device: True)
    classes = []

    def tuned(name, work, loop):
        classes.append((name, work, loop))
        return _LaunchRecorder(fits=None)

    monkeypatch.setattr(attention, "_tuned", tuned)
    cuda = torch.device("cuda")
    attention._launch("fwd", cuda, 1000, (2, 3), 700, torch.empty(0))  # 6000 query rows, each walking 700 keys
    attention._launch("dkdv", cuda, 1024, (16, 16), 1, torch.empty(0))
    attention._launch("dq", cuda, 1, (1, 1), 0, torch.empty(0))
    assert classes == [("fwd", 8192, 1024), ("dkdv", 262144, 1), ("dq", 1, 1)]


def test_each_size_class_has_its_own_autotuner():
    assert attention._tuned("dq", 2048, 1024) is attention._tuned("dq", 2048, 1024)
    assert attention._tuned("dq", 2048, 1024) is not attention._tuned("dq", 262144, 1024)
    assert attention._tuned("dq", 2048, 1024).fn is attention._tuned("dq", 262144, 1024).fn  # one JIT function


class _LaunchRecorder:
    """Stands in for a Triton kernel: records each launch's tile (None where the autotuner would choose); only the
    tile `fits` fits, or any when `fits` is None."""

    def __init__(self, fits):
        self.fits, self.tiles = fits, []

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, BLOCK_M=None, BLOCK_N=None, num_warps=None, num_stages=None, **constexprs):
        self.tiles.append((BLOCK_M, BLOCK_N, num_warps, num_stages))
        if self.fits is not None and (BLOCK_M, BLOCK_N, num_warps, num_stages) != self.fits:
            raise attention.OutOfResources(300_000, 232_448, "shared memory")


def test_untuned_gpu_launch_falls_back_to_a_tile_that_fits(monkeypatch):
    """Without the autotuner a GPU launch takes the first tile of its list that fits, the small one at worst, and
    remembers it; the last OutOfResources propagates when none fits."""
    monkeypatch.setattr(attention, "_use_autotuner", lambda device: False)
    monkeypatch.setattr(attention, "_FITTING", {})
    cuda = torch.device("cuda")
    q = torch.empty(0, dtype=torch.float32)
    constexprs = dict(BLOCK_D=256, BLOCK_DV=256)
    recorder = _LaunchRecorder(fits=attention.SMALL_CONFIGS["fwd"])
    monkeypatch.setitem(attention._PLAIN, "fwd", recorder)
    attention._launch("fwd", cuda, 100, (1, 1), 100, q, **constexprs)
    assert recorder.tiles == attention.CONFIGS["fwd"][256] + [attention.SMALL_CONFIGS["fwd"]]
    recorder.tiles.clear()
    attention._launch("fwd", cuda, 100, (1, 1), 100, q, **constexprs)
    assert recorder.tiles == [attention.SMALL_CONFIGS["fwd"]]

    monkeypatch.setitem(attention._PLAIN, "fwd", _LaunchRecorder(fits=attention.SMALL_CONFIGS["fwd"]))
    with pytest.raises(attention.OutOfResources):  # 16-bit inputs do not get the small tile
        attention._launch("fwd", cuda, 100, (1, 1), 100, q.bfloat16(), **constexprs)
