"""Scaled-dot-product attention: lmrt against every PyTorch backend, forward, backward and both, in one run.

    python -m benchmarks.bench_attention [--quick] [--modes ...] [--dtypes ...] [--seqlens L ...] [--head-dims D ...]
                                         [--no-compile] [--out DIR | --save] [--no-plot]

Grids: sequence length L at a fixed number of tokens per batch (batch = tokens // L) and model width (heads = width
// d); causal and not. CUDA: d 64 and 128, L 1024, 4096 and 16384 at 16384 tokens and width 2048 (32 heads at d=64,
16 at d=128), bfloat16 (--dtypes bfloat16 float16 for both). CPU: d 64, L 256 to 2048 at 2048 tokens and width 256,
float32 and bfloat16. q, k, v and the output gradient are (batch, heads, L, d) tensors of standard normal values;
the scale is 1/sqrt(d). How each provider is checked and timed: benchmarks/harness.py.

Providers: lmrt-triton, lmrt-cuda, lmrt-cpp (lmrt.ops.scaled_dot_product_attention under each backend),
`sdpa-flash`, `sdpa-efficient`, `sdpa-cudnn` and `sdpa-math` (F.scaled_dot_product_attention held to one backend
with torch.nn.attention.sdpa_kernel; on the CPU flash and math, the two PyTorch has there), `naive`
(lmrt.reference.scaled_dot_product_attention in the inputs' dtype: plain PyTorch ops that hold the L x L scores)
and `compile` (torch.compile of the naive reference, with dynamic shapes, reset for every (dtype, d, causal): a few
compilations, not one per shape). An SDPA backend that refuses a case is `unsupported`, with its reason.

The float64 reference cannot run the full-size grid (at L=16384 the scores of 32 heads alone are 64 GiB in
float64), so the check runs on a reduced case of the same dtype, d and causality: batch 1, 2 heads, L = min(L,
4096) (float64 scores of 256 MiB at most), recorded as each row's `check_shape`. On the quick grid that is the
timed case itself.

FLOPs are those of the matmuls: forward 4 * batch * heads * L^2 * d (QK^T and PV, 2 FLOPs per multiply-add),
halved when causal; backward 2.5x the forward's (QK^T recomputed, dV, dP, dQ, dK: five matmuls to two); fwd+bwd
3.5x. The ceiling is the matmul measured at the start of the run (benchmarks/common.py: measure_ceilings).
Timing on CUDA: do_bench with 12.5 ms of warm-up and 50 ms of timed calls per measurement, half its defaults.
Peak memory (CUDA): the output, what autograd saves and the workspace (fwd); the gradients and the workspace
(bwd); all of them (fwd+bwd).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

import lmrt
from benchmarks import common, harness
from benchmarks.harness import Case, Point, Provider
from lmrt import reference

# Each mode's FLOPs as a multiple of the forward's.
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
CHECKED = ("output", "grad_query", "grad_key", "grad_value")
# The reduced case the float64 check runs on: batch 1, at most CHECK_HEADS heads and CHECK_SEQLEN positions.
CHECK_HEADS, CHECK_SEQLEN = 2, 4096
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
CPU_SDPA_BACKENDS = ("sdpa-flash", "sdpa-math")


@dataclass(frozen=True)
class Grid:
    tokens: int  # batch * L, batch = max(1, tokens // L)
    width: int  # heads * d, heads = max(1, width // d)
    seqlens: tuple[int, ...]
    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]


QUICK_GRID = Grid(128, 128, (128,), (64,), ("float32",))
CPU_GRID = Grid(2048, 256, (256, 512, 1024, 2048), (64,), ("float32", "bfloat16"))
CUDA_GRID = Grid(16384, 2048, (1024, 4096, 16384), (64, 128), ("bfloat16",))


def make_case(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool, dtype: torch.dtype,
              device: torch.device) -> Case:
    """Seeded standard normal q, k, v (leaves requiring grad) and output gradient; the same for every provider
    and every run."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn() -> Tensor:
        return torch.randn(batch, heads, seqlen, head_dim, generator=generator, device=device).to(dtype)

    q, k, v = (randn().requires_grad_(True) for _ in range(3))
    return Case((q, k, v), randn(), CHECKED, {"is_causal": causal})


def check_shape(heads: int, seqlen: int, head_dim: int) -> tuple[int, int, int, int]:
    """The reduced (batch, heads, L, d) shape the float64 check of a case of any batch runs on."""
    return 1, min(heads, CHECK_HEADS), min(seqlen, CHECK_SEQLEN), head_dim


def attention_flops(mode: str, batch: int, heads: int, seqlen: int, head_dim: int, causal: bool) -> float:
    """FLOPs of the matmuls of attention in `mode` (see the module doc)."""
    forward = 4 * batch * heads * seqlen * seqlen * head_dim // (2 if causal else 1)
    return forward * FLOP_FACTOR[mode]


class AttentionBenchmark(harness.OpBenchmark):
    name = "attention"
    doc = __doc__
    metric = common.COMPUTE
    shape_headers = ("dtype", "causal", "B x H x L x d")
    x = "seqlen"
    panel_rows = ("dtype", "head_dim")
    panel_cols = ("mode", "causal")
    quick_help = "batch 1, 2 heads, L=128, d=64, float32"
    reference = staticmethod(reference.scaled_dot_product_attention)

    def add_grid_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--seqlens", nargs="+", type=common.positive_int, metavar="L",
                            help="default: the grid's; batch = tokens // L at the grid's tokens per batch")
        parser.add_argument("--head-dims", nargs="+", type=common.positive_int, metavar="D",
                            help="default: the grid's; heads = width // D at the grid's model width")

    def providers(self, device: torch.device, compile_skip: str | None) -> tuple[list[Provider], dict[str, str]]:
        found, skipped = harness.lmrt_providers(lmrt.ops.scaled_dot_product_attention, device)
        for name, backend in SDPA_BACKENDS.items():
            if device.type == "cuda" or name in CPU_SDPA_BACKENDS:
                found.append(Provider(name, F.scaled_dot_product_attention, functools.partial(sdpa_kernel, backend),
                                      pytorch=True, refuses=True))
            else:
                skipped[name] = f"PyTorch's SDPA has no {name.removeprefix('sdpa-')} kernel for {device.type} tensors"
        found.append(Provider("naive", self.reference))
        compiled, not_compiled = harness.compiled_provider(self.reference, compile_skip, dynamic=True)
        return found + compiled, {**skipped, **not_compiled}

    def points(self, args: argparse.Namespace, device: torch.device) -> list[Point]:
        grid = QUICK_GRID if args.quick else CUDA_GRID if device.type == "cuda" else CPU_GRID
        grid = dataclasses.replace(grid, seqlens=tuple(args.seqlens or grid.seqlens),
                                   head_dims=tuple(args.head_dims or grid.head_dims),
                                   dtypes=tuple(args.dtypes or grid.dtypes))
        points = []
        for dtype_name, head_dim, causal in itertools.product(grid.dtypes, grid.head_dims, (False, True)):
            dtype, heads = common.DTYPES[dtype_name], max(1, grid.width // head_dim)
            for seqlen in grid.seqlens:
                batch = max(1, grid.tokens // seqlen)
                shape = {"dtype": dtype_name, "causal": causal, "batch": batch, "heads": heads, "seqlen": seqlen,
                         "head_dim": head_dim, "check_shape": list(check_shape(heads, seqlen, head_dim))}
                make = functools.partial(make_case, batch, heads, seqlen, head_dim, causal, dtype, device)
                make_check = functools.partial(make_case, *check_shape(heads, seqlen, head_dim), causal, dtype, device)
                work = functools.partial(attention_flops, batch=batch, heads=heads, seqlen=seqlen, head_dim=head_dim,
                                         causal=causal)
                points.append(Point(shape, make, work, make_check, compile_group=(dtype_name, head_dim, causal)))
        return points

    def shape_cells(self, row: dict[str, Any]) -> list[str]:
        return [row["dtype"], "yes" if row["causal"] else "no",
                f"{row['batch']}x{row['heads']}x{row['seqlen']}x{row['head_dim']}"]


BENCHMARK = AttentionBenchmark()
main = BENCHMARK.main

if __name__ == "__main__":
    main()
