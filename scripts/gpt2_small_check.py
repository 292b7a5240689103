"""GPT-2 small on a GPU: 50 training steps on the Triton backend against the same 50 on the torch backend, and
generation with the KV cache. Writes gpt2_small_check.json and gpt2_small_check.png into OUT_DIR.

    python scripts/gpt2_small_check.py OUT_DIR [--steps 50] [--batch 8]     (lmrt installed, or PYTHONPATH=.)

Both runs start from the same weights and see the same batches: byte-level tokens of the English documentation
CPython ships (pydoc_data.topics), in windows of 1024 at fixed random offsets. bfloat16 autocast, AdamW. The
yardstick of "bfloat16 noise" is measured in the same script: the torch backend run once more in float32 (TF32
off); the Triton run matches if its distance from the torch bfloat16 run stays within the distance between the
torch bfloat16 and float32 runs. Generation: greedy, 256 new tokens after a 64-token prompt, with the cache and by
recomputing the whole sequence at every step, timed, and their agreement reported.
"""

import argparse
import json
import pydoc_data.topics
import time
from pathlib import Path

import torch

import lmrt
from lmrt.models import GPT, GPTConfig

CONTEXT = 1024
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bfloat16 tensor-core peak, SXM


def corpus_tokens(device) -> torch.Tensor:
    text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long, device=device)


def batches(tokens: torch.Tensor, steps: int, batch: int):
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - CONTEXT - 1, (batch,), generator=generator).tolist()
        window = torch.stack([tokens[s: s + CONTEXT + 1] for s in starts])
        yield window[:, :-1], window[:, 1:]


def train(backend: str, dtype: torch.dtype, initial_state: dict, tokens, steps: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig.gpt2_small(), device="cuda")
    model.load_state_dict(initial_state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    losses, times = [], []
    torch.cuda.reset_peak_memory_stats()
    with lmrt.backend(backend):
        for idx, targets in batches(tokens, steps, batch):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(idx, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())  # synchronizes
            times.append(time.perf_counter() - start)
    steady = sorted(times[5:])[len(times[5:]) // 2] if len(times) > 5 else times[-1]
    tokens_per_second = batch * CONTEXT / steady
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
    return dict(backend=backend, dtype=str(dtype).removeprefix("torch."), losses=losses, step_seconds=steady,
                tokens_per_second=tokens_per_second, peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9,
                mfu=model.estimate_mfu(tokens_per_second, peak) if peak and dtype != torch.float32 else None,
                model=model)


def generation(model, tokens) -> dict:
    model.eval()
    prompt = tokens[:64][None]
    results = {}
    with lmrt.backend("triton"), torch.autocast("cuda", dtype=torch.bfloat16):
        for use_cache in (True, False):
            model.generate(prompt, 8, use_cache=use_cache)  # warm-up: kernels compiled and tuned
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(prompt, 256, use_cache=use_cache)
            torch.cuda.synchronize()
            results[use_cache] = (out[0, 64:], time.perf_counter() - start)
    (cached, cached_s), (recomputed, recomputed_s) = results[True], results[False]
    same_prefix = int((cached != recomputed).int().argmax()) if not torch.equal(cached, recomputed) else len(cached)
    return dict(new_tokens=len(cached), cached_tokens_per_second=len(cached) / cached_s,
                recomputed_tokens_per_second=len(recomputed) / recomputed_s, identical_leading_tokens=same_prefix,
                sample=bytes(t for t in cached.tolist() if t < 256).decode("utf-8", errors="replace"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    tokens = corpus_tokens("cuda")
    torch.manual_seed(0)
    initial_state = GPT(GPTConfig.gpt2_small(), device="cuda").state_dict()
    runs = [train(backend, dtype, initial_state, tokens, args.steps, args.batch)
            for backend, dtype in (("triton", torch.bfloat16), ("torch", torch.bfloat16), ("torch", torch.float32))]
    triton_model = runs[0].pop("model")
    for run in runs[1:]:
        del run["model"]
    triton_bf16, torch_bf16, torch_fp32 = (run["losses"] for run in runs)
    gap = max(abs(a - b) for a, b in zip(triton_bf16, torch_bf16, strict=True))
    noise = max(abs(a - b) for a, b in zip(torch_bf16, torch_fp32, strict=True))
    summary = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), parameters=triton_model.num_parameters(),
        steps=args.steps, batch=args.batch, context=CONTEXT, runs=runs,
        max_loss_gap_triton_vs_torch_bf16=gap, max_loss_gap_torch_bf16_vs_fp32=noise, within_bf16_noise=gap <= noise,
        generation=generation(triton_model, tokens))
    (args.out / "gpt2_small_check.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    for run in runs:
        print(run["backend"], run["dtype"], "first/last loss", run["losses"][0], run["losses"][-1],
              "tokens/s", round(run["tokens_per_second"]), "MFU", run["mfu"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        ax.plot(run["losses"], label=f"{run['backend']} {run['dtype']}")
    ax.set(xlabel="step", ylabel="training loss", title=f"GPT-2 small, {summary['device']}")
    ax.legend()
    fig.savefig(args.out / "gpt2_small_check.png", dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
