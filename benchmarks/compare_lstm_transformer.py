"""The Transformer against the LSTM baseline: `lmrt train` on both, with the same data, tokens per step and time
budget, and their validation perplexity against tokens seen and against training time.

    python -m benchmarks.compare_lstm_transformer [--minutes 4] [--preset tiny] [--out DIR]

Both models train from the `tiny` preset (byte tokens of the embedded corpus, context 128, batch 16, the same
schedule shape) until the time budget ends; the learning-rate schedule is set for the steps that the budget allows
each (measured in a short warm-up run), so that both finish their decay. Validation perplexity is measured every
`eval_interval` steps on the same validation windows. Writes compare_lstm_transformer.json (every evaluation),
.md (a table) and .png (the two plots) into DIR.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lmrt
from lmrt.train import TrainConfig, Trainer
from lmrt.train.presets import preset_settings

MODELS = ("gpt", "lstm")


def steps_per_minute(settings: dict, out: Path) -> float:
    """Training steps per minute of a model, from 20 steps after 5 of warm-up."""
    times = []
    config = TrainConfig.from_dict({**settings, "max_steps": 25, "eval_interval": 1000, "sample_interval": 1000,
                                    "checkpoint_interval": 1000, "out_dir": str(out)})
    Trainer(config, on_event=lambda name, data: times.append(time.perf_counter()) if name == "step" else None).run()
    return 60 * 20 / (times[-1] - times[4])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=4.0, help="training time per model")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--out", type=Path, default=Path("compare_lstm_transformer"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for model in MODELS:
        settings = preset_settings(args.preset, model)
        steps = int(steps_per_minute(settings, args.out / f"{model}-warmup") * args.minutes)
        interval = max(1, steps // 12)
        config = TrainConfig.from_dict({**settings, "max_steps": steps, "eval_interval": interval,
                                        "sample_interval": steps, "checkpoint_interval": steps,
                                        "out_dir": str(args.out / model)})
        trainer = Trainer(config)
        trainer.run()
        records = [json.loads(line) for line in (args.out / model / "metrics.jsonl").read_text().splitlines()]
        results[model] = dict(parameters=trainer.model.num_parameters(), steps=steps,
                              evaluations=[r for r in records if "validation_loss" in r],
                              sample=trainer.sample())
    meta = dict(device=str(trainer.device), torch=torch.__version__, lmrt=lmrt.__version__, preset=args.preset,
                minutes=args.minutes, threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    (args.out / "compare_lstm_transformer.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    rows = ["| model | parameters | steps | tokens | training minutes | validation perplexity |",
            "| --- | --- | --- | --- | --- | --- |"]
    for model, result in results.items():
        last = result["evaluations"][-1]
        rows.append(f"| {model} | {result['parameters']:,} | {result['steps']} | {last['tokens']:,} | "
                    f"{last['seconds'] / 60:.1f} | {last['perplexity']:.2f} |")
    table = "\n".join(rows)
    (args.out / "compare_lstm_transformer.md").write_text(f"{json.dumps(meta)}\n\n{table}\n")
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for model, result in results.items():
        evaluations = result["evaluations"]
        perplexity = [r["perplexity"] for r in evaluations]
        axes[0].plot([r["tokens"] for r in evaluations], perplexity, "o-", label=model)
        axes[1].plot([r["seconds"] / 60 for r in evaluations], perplexity, "o-", label=model)
    axes[0].set(xlabel="training tokens", ylabel="validation perplexity (bytes)", yscale="log")
    axes[1].set(xlabel="training minutes")
    for ax in axes:
        ax.legend()
    fig.suptitle(f"Transformer (GPT) against LSTM, preset {args.preset}, {meta['device']}, {args.minutes} min each")
    fig.savefig(args.out / "compare_lstm_transformer.png", dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
