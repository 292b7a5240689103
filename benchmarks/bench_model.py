"""End to end: training-step throughput and generation of a GPT on lmrt's kernels against the same GPT on
PyTorch's eager ops, on PyTorch's SDPA and fused ops, and under torch.compile, with the LSTM baseline beside them.

    python -m benchmarks.bench_model [--quick] [--models NAME ...] [--no-compile] [--out DIR | --save] [--no-plot]

Models: `gpt-tiny` (the `tiny` preset: 3 layers, 4 heads, width 128, context 128, batch 16) everywhere, and
`gpt2-small` (GPTConfig.gpt2_small(): 124M parameters, context 1024, batch 8) on CUDA; --quick: `gpt-quick` (2
layers, 2 heads, width 64, context 64, batch 4). The LSTM beside each is its preset's (lmrt.train.presets) at the
GPT's vocabulary, batch and context. Tokens: the bytes of the embedded corpus (lmrt.data.default_corpus), in
windows at seeded random offsets; the same batches for every provider.

Providers:
- `lmrt`: the GPT on lmrt's ops on the device's default backend (lmrt/backends.py: triton on CUDA, cpp on the CPU).
- `torch-eager`: the GPT under lmrt.backend("torch"): lmrt's plain-PyTorch reference ops, unfused, what a model
  written with basic PyTorch ops runs.
- `torch-fused`: the GPT on PyTorch's own fused ops: the lmrt.ops functions that lmrt.nn's modules call routed to
  their torch.nn.functional twins (pytorch_ops(): F.scaled_dot_product_attention, F.layer_norm, F.rms_norm,
  F.softmax; the signatures are the same by design).
- `torch-compile`: torch.compile of the torch-fused GPT (not in --quick nor with --no-compile).
- `lstm`: LSTMLanguageModel (torch.nn.LSTM, cuDNN on CUDA), the baseline, eager.
torch-eager, torch-fused and torch-compile are the PyTorch providers each row's time is compared with ("time_vs").

A training step: forward and loss under autocast (bfloat16 on CUDA; float32 on the CPU, no autocast), backward,
gradient clipping to norm 1, an AdamW step (fused on CUDA), gradients set to None; timed with the harness's timer
(do_bench on CUDA, with MODEL_REP_MS of timed steps; on the CPU the providers' steps interleaved in rounds).
tokens/s = batch * context / median step time. MFU = model FLOPs per token (GPT.estimate_mfu: 6 * non-embedding
parameters + 12 * layers * width * context) * tokens/s / the GPU's peak bfloat16 FLOP/s
(lmrt.train.trainer.PEAK_FLOPS; none for a CPU or a GPU not listed); `% matmul` is the same FLOPs over the matmul
ceiling measured at the start of the run. Peak memory (CUDA): what one step allocates beyond the model, its
gradients and the optimizer's state held before it.

Check before timing: every GPT provider trains CHECK_STEPS steps from the same initial weights on the same
batches; its losses must stay within LOSS_TOLERANCE (relative, per dtype: float32 1e-4, bfloat16 2e-2) of
torch-eager's at every step. The steps after the first depend on the gradients, so a wrong backward shows as
well as a wrong forward. A provider outside the tolerance, or one that raises, is WRONG and not timed. The LSTM,
another model, must give finite losses.

Generation: greedy continuation of a prompt at batch 1 with the KV cache (model.generate, use_cache=True), in eval
mode under the same autocast, from the initial weights; tokens/s = new tokens / median time of a call (at least 3
calls each, the providers interleaved in rounds after a warm-up call each). `same_as_recompute` counts the leading
new tokens that the cached generation shares with use_cache=False (the whole sequence recomputed at every step) on
the same provider: all of them, unless a near-tie between two logits of the untrained model breaks the other way."""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import lmrt
from benchmarks import common
from lmrt.data import default_corpus
from lmrt.models import GPT, GPTConfig, LSTMConfig, LSTMLanguageModel
from lmrt.train.presets import PRESETS
from lmrt.train.trainer import PEAK_FLOPS

CHECK_STEPS = 3
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
LEARNING_RATE = 1e-3
MODEL_REP_MS = 500
# The lmrt.ops functions that lmrt.nn's modules call, each the twin of the torch.nn.functional function of its name.
FUSED_TWINS = ("scaled_dot_product_attention", "layer_norm", "rms_norm", "softmax")
PYTORCH = ("torch-eager", "torch-fused", "torch-compile")
PROVIDER_COLORS = {"lmrt": "tab:orange", "torch-eager": "tab:gray", "torch-fused": "tab:blue",
                   "torch-compile": "tab:green", "lstm": "tab:purple"}


@contextlib.contextmanager
def pytorch_ops() -> Iterator[None]:
    """Route the lmrt.ops functions that lmrt.nn's modules call (they look them up on the lmrt.ops module at every
    call) to their torch.nn.functional twins, which have the same signatures; restore them on exit."""
    saved = {name: getattr(lmrt.ops, name) for name in FUSED_TWINS}
    try:
        for name in FUSED_TWINS:
            setattr(lmrt.ops, name, getattr(F, name))
        yield
    finally:
        for name, function in saved.items():
            setattr(lmrt.ops, name, function)


@dataclass(frozen=True)
class ModelSpec:
    """A GPT and the LSTM beside it, trained at `batch` x the GPT's context; generation continues a `prompt`-token
    prompt by `new_tokens`."""

    name: str
    gpt: GPTConfig
    lstm: LSTMConfig
    batch: int
    prompt: int
    new_tokens: int


def _preset_spec(name: str, preset: str, gpt: GPTConfig, batch: int, prompt: int, new_tokens: int) -> ModelSpec:
    lstm = LSTMConfig(vocab_size=gpt.vocab_size, context_length=gpt.context_length,
                      **PRESETS[preset]["model_options"]["lstm"])
    return ModelSpec(name, gpt, lstm, batch, prompt, new_tokens)


def model_specs(quick: bool, device: torch.device) -> list[ModelSpec]:
    if quick:
        gpt = GPTConfig(n_layer=2, n_head=2, n_embd=64, context_length=64)
        return [ModelSpec("gpt-quick", gpt, LSTMConfig(n_layer=1, n_embd=64, hidden_size=128, context_length=64),
                          batch=4, prompt=8, new_tokens=16)]
    tiny = PRESETS["tiny"]
    specs = [_preset_spec("gpt-tiny", "tiny", GPTConfig(context_length=tiny["context_length"],
                                                        **tiny["model_options"]["gpt"]),
                          tiny["batch_size"], prompt=16, new_tokens=64)]
    if device.type == "cuda":
        specs.append(_preset_spec("gpt2-small", "gpt2-small", GPTConfig.gpt2_small(), batch=8, prompt=64,
                                  new_tokens=64))
    return specs


@dataclass(frozen=True)
class ModelProvider:
    """How a provider runs the model: inside `context()`; `compiled`: under torch.compile; `lstm`: the LSTM."""

    name: str
    context: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext
    compiled: bool = False
    lstm: bool = False


def providers(compile_skip: str | None) -> tuple[list[ModelProvider], dict[str, str]]:
    found = [ModelProvider("lmrt"), ModelProvider("torch-eager", functools.partial(lmrt.backend, "torch")),
             ModelProvider("torch-fused", pytorch_ops)]
    if compile_skip is None:
        found.append(ModelProvider("torch-compile", pytorch_ops, compiled=True))
    found.append(ModelProvider("lstm", lstm=True))
    return found, {} if compile_skip is None else {"torch-compile": compile_skip}


def corpus_batches(spec: ModelSpec, count: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """`count` (inputs, targets) batches of byte tokens of the embedded corpus at seeded random offsets."""
    tokens = torch.tensor(list(default_corpus().encode("utf-8")), dtype=torch.long)
    context = spec.gpt.context_length
    generator = torch.Generator().manual_seed(0)
    found = []
    for _ in range(count):
        starts = torch.randint(0, len(tokens) - context - 1, (spec.batch,), generator=generator).tolist()
        window = torch.stack([tokens[start: start + context + 1] for start in starts]).to(device)
        found.append((window[:, :-1], window[:, 1:]))
    return found


def build(spec: ModelSpec, provider: ModelProvider, gpt_state: dict[str, Tensor], device: torch.device
          ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the module a step calls, the model itself): the GPT from `gpt_state`, or a seeded LSTM."""
    if provider.lstm:
        torch.manual_seed(0)
        model: torch.nn.Module = LSTMLanguageModel(spec.lstm, device=device)
    else:
        model = GPT(spec.gpt, device=device)
        model.load_state_dict(gpt_state)
    return (torch.compile(model) if provider.compiled else model), model


def autocast(device: torch.device) -> AbstractContextManager[object]:
    """bfloat16 autocast on CUDA, as lmrt train runs there; none on the CPU (float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_step(module: torch.nn.Module, model: torch.nn.Module, device: torch.device) -> Callable[..., Tensor]:
    """One training step of `model` (called through `module`) on a batch: see the module doc."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")

    def step(idx: Tensor, targets: Tensor) -> Tensor:
        with autocast(device):
            _, loss = module(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def check_losses(losses: Sequence[float], expected: Sequence[float] | None, dtype: torch.dtype) -> str | None:
    """None when every loss is finite and, given `expected`, within LOSS_TOLERANCE[dtype] of it relatively."""
    if not all(math.isfinite(loss) for loss in losses):
        return f"non-finite losses {losses}"
    if expected is None:
        return None
    tolerance = LOSS_TOLERANCE[dtype]
    for step, (loss, reference) in enumerate(zip(losses, expected, strict=True), 1):
        if abs(loss - reference) > tolerance * abs(reference):
            return (f"step {step}: loss {loss:.6g}, torch-eager's {reference:.6g}: off by more than {tolerance:g} x "
                    f"|loss|")
    return None


def check_training(
    spec: ModelSpec, provider: ModelProvider, gpt_state: dict[str, Tensor], batches: Sequence[tuple[Tensor, Tensor]],
    expected: Sequence[float] | None, device: torch.device,
) -> tuple[dict[str, Any], common.Job | None, torch.nn.Module | None]:
    """A training row with `provider`'s check (its losses against `expected`), the job that times its step and the
    model (None and None when the check failed)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    row: dict[str, Any] = {
        "task": "train", "model": spec.name, "parameters": None, "batch": spec.batch,
        "context": spec.gpt.context_length, "dtype": common.dtype_str(dtype), "provider": provider.name,
        "status": "ok", "error": None, "losses": None, "ms": None, "ms_p20": None, "ms_p80": None,
        "tokens_per_second": None, "mfu": None, "matmul_fraction": None, "peak_memory_mb": None, "time_vs": {},
    }
    try:
        with provider.context():
            module, model = build(spec, provider, gpt_state, device)
            row["parameters"] = model.num_parameters()
            step = train_step(module, model, device)
            row["losses"] = [step(*batch).item() for batch in batches]
            error = check_losses(row["losses"], None if provider.lstm else expected, dtype)
    except Exception as failure:  # a provider that fails is a result to report, not the end of the run
        error = common.raised(failure)
    if error is not None:
        row.update(status="WRONG", error=error)
        return row, None, None
    return row, common.Job(lambda: functools.partial(step, *batches[0]), context=provider.context), model


def fill_training(row: dict[str, Any], timing: common.Timing | Exception, job: common.Job, model: torch.nn.Module,
                  spec: ModelSpec, ceilings: common.Ceilings, device: torch.device) -> None:
    """Complete a checked training row with its step's timing: tokens/s, and for the GPT its fraction of the
    matmul ceiling and MFU."""
    try:
        if isinstance(timing, Exception):
            raise timing
        row.update(common.timing_columns(timing, job, device))
    except Exception as failure:  # a provider that fails is a result to report, not the end of the run
        row.update(status="WRONG", error=common.raised(failure))
        return
    tokens_per_second = spec.batch * spec.gpt.context_length / (row["ms"] * 1e-3)
    row["tokens_per_second"] = tokens_per_second
    if isinstance(model, GPT):
        row["matmul_fraction"] = model.estimate_mfu(tokens_per_second, ceilings.matmul_tflops * 1e12)
        peak = next((flops for name, flops in PEAK_FLOPS.items()
                     if device.type == "cuda" and name in common.device_name(device)), None)
        row["mfu"] = None if peak is None else model.estimate_mfu(tokens_per_second, peak)


def check_generation(spec: ModelSpec, provider: ModelProvider, gpt_state: dict[str, Tensor], prompt: Tensor,
                     device: torch.device) -> tuple[dict[str, Any], common.Job | None]:
    """A generation row with the agreement of `provider`'s cached greedy generation with recomputing, and the job
    that times the cached one (None when it failed)."""
    row: dict[str, Any] = {
        "task": "generate", "model": spec.name, "provider": provider.name, "status": "ok", "error": None,
        "prompt_tokens": spec.prompt, "new_tokens": spec.new_tokens, "ms": None, "ms_p20": None, "ms_p80": None,
        "tokens_per_second": None, "same_as_recompute": None, "time_vs": {},
    }

    def generate(use_cache: bool) -> Tensor:
        out = model.generate(prompt, spec.new_tokens, use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out[0, spec.prompt:]

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with provider.context(), autocast(device):
            yield

    try:
        with context():
            _, model = build(spec, provider, gpt_state, device)
            model.eval()
            cached, recomputed = generate(True), generate(False)
    except Exception as failure:
        row.update(status="WRONG", error=common.raised(failure))
        return row, None
    differ = (cached != recomputed).nonzero()
    row["same_as_recompute"] = int(differ[0, 0]) if len(differ) else len(cached)
    return row, common.Job(lambda: functools.partial(generate, True), context=context)


def fill_generation(row: dict[str, Any], timing: common.Timing | Exception, job: common.Job,
                    device: torch.device) -> None:
    """Complete a checked generation row with its timing: tokens/s."""
    if isinstance(timing, Exception):
        row.update(status="WRONG", error=common.raised(timing))
        return
    row.update(common.timing_columns(timing, job, device))
    row["tokens_per_second"] = row["new_tokens"] / (row["ms"] * 1e-3)


def run(specs: Sequence[ModelSpec], found: Sequence[ModelProvider], timer: common.Timer, ceilings: common.Ceilings,
        device: torch.device, deadline: float | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Training rows, then generation rows, of every model and provider; and what was not run when
    time.monotonic() passed `deadline` (None when all was). Each task checks every provider first, then times
    those that passed in one call of the timer, which interleaves them on the CPU."""
    results: list[dict[str, Any]] = []
    for index, spec in enumerate(specs):
        if deadline is not None and time.monotonic() > deadline:
            return results, f"models {[s.name for s in specs[index:]]} not run: the time budget was spent"
        torch.manual_seed(0)
        gpt_state = copy.deepcopy(GPT(spec.gpt, device=device).state_dict())
        batches = corpus_batches(spec, CHECK_STEPS, device)
        expected = None
        checked: dict[str, tuple[dict[str, Any], common.Job | None, torch.nn.Module | None]] = {}
        for provider in sorted(found, key=lambda p: p.name != "torch-eager"):  # torch-eager's losses first
            print(f"model: {spec.name} train {provider.name}", file=sys.stderr, flush=True)
            if provider.compiled:
                torch.compiler.reset()
            checked[provider.name] = check_training(spec, provider, gpt_state, batches, expected, device)
            if provider.name == "torch-eager" and checked[provider.name][0]["losses"] is not None:
                expected = checked[provider.name][0]["losses"]
        rows = [checked[provider.name][0] for provider in found]
        timed = [checked[provider.name] for provider in found if checked[provider.name][1] is not None]
        print(f"model: {spec.name} train: timing {len(timed)} providers", file=sys.stderr, flush=True)
        for (row, job, model), timing in zip(timed, timer([job for _, job, _ in timed]), strict=True):
            fill_training(row, timing, job, model, spec, ceilings, device)
        common.set_time_ratios(rows, PYTORCH)
        prompt = batches[0][0][:1, : spec.prompt]
        generation = []
        for provider in found:
            if not provider.compiled:
                print(f"model: {spec.name} generate {provider.name}", file=sys.stderr, flush=True)
                generation.append(check_generation(spec, provider, gpt_state, prompt, device))
        timed = [(row, job) for row, job in generation if job is not None]
        generation_timer = common.cpu_timer(0, warmup=1, min_reps=3)
        for (row, job), timing in zip(timed, generation_timer([job for _, job in timed]), strict=True):
            fill_generation(row, timing, job, device)
        common.set_time_ratios([row for row, _ in generation], PYTORCH)
        results += rows + [row for row, _ in generation]
    return results, None


def print_tables(results: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
    fmt = common.fmt
    baselines = [name for name in PYTORCH if name in meta["providers"]]
    vs = [f"vs {name}" for name in baselines]
    train = [row for row in results if row["task"] == "train"]
    cells = [[row["model"], f"{row['batch']}x{row['context']}", row["dtype"], row["provider"], *common.time_cells(row),
              fmt(row["tokens_per_second"], ",.0f"), fmt(row["mfu"], ".1%"), fmt(row["matmul_fraction"], ".1%"),
              *[fmt(row["time_vs"].get(name), ".2f", "x") for name in baselines], fmt(row["peak_memory_mb"], ".0f"),
              common.status_cell(row)] for row in train]
    common.print_table(("model", "batch x context", "dtype", "provider", "ms/step", "p20-p80 ms", "tokens/s", "MFU",
                        "% matmul", *vs, "peak MiB", "status"), cells,
                       f"training steps on {meta['device']}: matmul ceiling {meta['matmul_tflops']:.4g} TFLOP/s",
                       left=("model", "dtype", "provider", "status"))
    generate = [row for row in results if row["task"] == "generate"]
    cells = [[row["model"], f"{row['prompt_tokens']}+{row['new_tokens']}", row["provider"], *common.time_cells(row),
              fmt(row["tokens_per_second"], ",.1f"), fmt(row["same_as_recompute"], "d"),
              *[fmt(row["time_vs"].get(name), ".2f", "x") for name in baselines], common.status_cell(row)]
             for row in generate]
    common.print_table(("model", "prompt+new", "provider", "ms", "p20-p80 ms", "tokens/s", "same as recompute", *vs,
                        "status"), cells, f"greedy generation with the KV cache, batch 1, on {meta['device']}",
                       left=("model", "provider", "status"))
    for name, why in meta["skipped"].items():
        print(f"  skipped {name}: {why}")
    if meta["not_run"]:
        print(f"  {meta['not_run']}")


def plot(results: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path) -> list[Path]:
    """One PNG: tokens/s per provider, a panel per (task, model); nothing, and an empty list, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    panels = list(dict.fromkeys((row["task"], row["model"]) for row in results))
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, layout="constrained")
    for ax, (task, model) in zip(axes[0], panels, strict=True):
        rows = [row for row in results if (row["task"], row["model"]) == (task, model) and row["tokens_per_second"]]
        names = [row["provider"] for row in rows]
        ax.barh(names, [row["tokens_per_second"] for row in rows],
                color=[PROVIDER_COLORS.get(name, "tab:gray") for name in names])
        ax.invert_yaxis()
        ax.set_xlabel("tokens/s")
        ax.set_title(f"{model}: {'training step' if task == 'train' else 'generation, KV cache'}")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"bench_model: {meta['device']}")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _parse(argv: Sequence[str] | None, device: torch.device) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: gpt-quick, no torch-compile")
    parser.add_argument("--models", nargs="+", choices=("gpt-tiny", "gpt2-small"), help="default: the device's")
    parser.add_argument("--no-compile", action="store_true", help="no torch-compile provider")
    common.add_output_arguments(parser, "bench_model.json, .csv and .png")
    args = common.parse_arguments(parser, argv)
    if args.models and args.quick:
        parser.error("--models with --quick: the smoke run has its own model, gpt-quick")
    runnable = {spec.name for spec in model_specs(False, device)}
    for name in args.models or ():
        if name not in runnable:
            parser.error(f"--models {name}: runs on CUDA only, and this device is {device.type}")
    return args


def main(argv: Sequence[str] | None = None, ceilings: common.Ceilings | None = None,
         deadline: float | None = None) -> list[dict[str, Any]]:
    """Run the benchmark the command line asks for, with the ceilings given (else measured first); print the
    tables, write --out or --save; return the result rows."""
    device = common.default_device()
    args = _parse(argv, device)
    with common.cpu_settings(device, args.quick):
        timer = common.timer_for(device, args.quick, cuda_rep_ms=MODEL_REP_MS)
        if ceilings is None:
            ceilings = common.measure_ceilings(device, timer, args.quick)
        specs = model_specs(args.quick, device)
        if args.models:
            specs = [spec for spec in specs if spec.name in args.models]
        skip = "--no-compile" if args.no_compile else "not in --quick: compiling takes longer" if args.quick else None
        found, skipped = providers(skip)
        results, not_run = run(specs, found, timer, ceilings, device, deadline)
        meta = common.run_meta(device, ceilings, benchmark="bench_model", quick=args.quick, metric="tokens/s",
                               providers=[provider.name for provider in found],
                               pytorch_providers=[name for name in PYTORCH if name in {p.name for p in found}],
                               skipped=skipped, not_run=not_run, check_steps=CHECK_STEPS,
                               loss_tolerance={common.dtype_str(k): v for k, v in LOSS_TOLERANCE.items()})
    print_tables(results, meta)
    out = common.output_dir(args, device)
    if out is not None:
        common.write_report(out, "bench_model", meta, results,
                            None if args.no_plot else functools.partial(plot, results, meta))
    return results

if __name__ == "__main__":
    main()
