"""The `lmrt` command line (also `python -m lmrt`): train, tokenize, eval, generate, bench, info.

    lmrt train --preset tiny                       # GPT on the embedded corpus, on this machine's CPU or GPU
    lmrt tokenize --data my_texts/ --tokenizer bpe --out my_texts.bin   # then: lmrt train --data my_texts.bin
    lmrt train --model lstm --data my_texts/ --out runs/lstm --set batch_size=32 learning_rate=3e-3
    lmrt train --out runs/tiny --resume            # continue the latest checkpoint
    lmrt eval --run runs/tiny                      # validation loss and perplexity
    lmrt generate --run runs/tiny --prompt "The import statement" --max-new-tokens 200
    lmrt bench --quick                             # the benchmark suite's smoke run (from a source checkout)
    lmrt bench attention model --save              # those benchmarks, into benchmarks/results/<device>/
    lmrt info                                      # versions, GPU, backends

`lmrt train`'s settings are the preset's (for the run's model), then the config file's, then --model, --preset, --data
and --out, then --set's, each over the ones before. With --resume the run keeps its saved settings: those given may
change what a resumed run may change (RESUMABLE_CHANGES), and any other that differs from the saved value is refused.

A user's mistake (a missing file, a bad setting, a corrupt checkpoint) ends with one line on stderr and exit
status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import platform
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import lmrt
from lmrt import backends
from lmrt.data import write_token_file
from lmrt.data.token_file import is_token_file, tokenizer_path
from lmrt.train.checkpoint import CheckpointError, CheckpointManager
from lmrt.train.config import MODELS, TOKENIZERS, TrainConfig, parse_overrides, read_settings
from lmrt.train.presets import PRESETS, with_preset
from lmrt.train.trainer import NonFiniteLossError, Trainer, corpus_tokens

USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, ImportError, NonFiniteLossError, OSError,
               backends.BackendCannotServeError)
# lmrt generate's sampling options, with their defaults when it samples (neither --greedy nor --beams).
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": None}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.command(args) or 0
    except USER_ERRORS as error:
        print(f"lmrt {args.command_name}: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmrt", description="lmrt: kernel-optimized Transformers for PyTorch.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = _command(commands, "train", _train, "train a model (on the embedded corpus unless --data is given)")
    train.add_argument("--model", choices=MODELS, help="default: gpt, or the config file's")
    train.add_argument("--preset", choices=list(PRESETS), help="a named size and schedule; tiny suits a CPU")
    train.add_argument("--config", type=Path, help="a YAML or TOML file of TrainConfig settings")
    train.add_argument("--data", help="a text file, a folder of text files or a .bin token file")
    train.add_argument("--out", help="the run's folder (checkpoints, metrics, plot, tokenizer)")
    train.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override settings: the preset's (for the run's model), the config file's, those of "
                       "--model, --preset, --data and --out, then these, each over the ones before; model_options "
                       "adds to the preset's")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run folder, "
                       "with its saved settings; a setting given here that a resumed run may not change must equal "
                       "the saved one")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    tokenize = _command(commands, "tokenize", _tokenize,
                        "pre-tokenize text into a .bin token file (with its tokenizer beside it) for lmrt train --data")
    tokenize.add_argument("--data", help="a text file or a folder of text files (default: the embedded corpus)")
    tokenize.add_argument("--out", required=True, help="the .bin file to write; its tokenizer goes beside it, "
                                                       "NAME.tokenizer.json")
    tokenize.add_argument("--tokenizer", choices=TOKENIZERS, default=TrainConfig.tokenizer)
    tokenize.add_argument("--bpe-vocab-size", type=int, default=TrainConfig.bpe_vocab_size,
                          help="the BPE vocabulary's size, as train's bpe_vocab_size (default: %(default)s)")

    evaluate = _command(commands, "eval", _eval, "validation loss and perplexity of a trained run")
    evaluate.add_argument("--run", required=True, help="the run's folder")
    evaluate.add_argument("--batches", type=int, help="validation batches (default: all)")
    evaluate.add_argument("--data", help="the run's data where it is now (default: where it was trained from; the "
                                         "embedded corpus for a run trained on it)")

    generate = _command(commands, "generate", _generate, "continue a prompt with a trained run's model")
    generate.add_argument("--run", required=True, help="the run's folder")
    generate.add_argument("--prompt", default="\n")
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--greedy", action="store_true", help="the most likely token at each step")
    generate.add_argument("--temperature", type=float,
                          help=f"the sampling temperature (default: {SAMPLING['temperature']})")
    generate.add_argument("--top-k", type=int,
                          help=f"sample from the k likeliest tokens (default: {SAMPLING['top_k']})")
    generate.add_argument("--top-p", type=float, help="sample from the likeliest tokens whose probabilities reach p")
    generate.add_argument("--beams", type=int, default=1, help="beam search with this many beams")
    generate.add_argument("--length-penalty", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)

    bench = _command(commands, "bench", _bench, "run the benchmark suite (from a source checkout; exit status 1 "
                                                "when a provider is wrong)")
    bench.add_argument("benchmarks", nargs="*", metavar="NAME", help="attention, layer_norm, rms_norm, softmax, "
                       "model (default: all)")
    bench.add_argument("--quick", action="store_true", help="the smoke grids: under a minute on a CPU")
    where = bench.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR", help="folder for the JSON, CSV and PNG of each benchmark")
    where.add_argument("--save", action="store_true", help="write them into benchmarks/results/<device>/")

    _command(commands, "info", _info, "versions, GPU and the backends this install has")
    return parser


def _command(commands, name: str, function, help_text: str) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help_text, description=help_text)
    command.set_defaults(command=function, command_name=name)
    return command


def _given_settings(args) -> dict:
    """The settings this invocation gives, each source over the ones before: the config file, then --model,
    --preset, --data and --out, then --set."""
    settings = read_settings(args.config) if args.config is not None else {}
    flags = dict(model=args.model, preset=args.preset, data=args.data, out_dir=args.out)
    settings.update({name: value for name, value in flags.items() if value is not None})
    settings.update(parse_overrides(args.set))
    return settings


def _train(args) -> int:
    reporter = _ConsoleReporter(progress=not args.quiet)
    settings = _given_settings(args)
    out_dir = settings.pop("out_dir", None) or f"runs/{settings.get('preset') or settings.get('model', 'gpt')}"
    try:
        if args.resume:
            # The saved config, with the settings given here as changes (a preset by its name only: its settings are
            # in the saved config already); a setting a resumed run may not change must equal the saved one.
            trainer = Trainer.continue_run(out_dir, settings, on_event=reporter)
        else:
            trainer = Trainer(TrainConfig.from_dict({**with_preset(settings), "out_dir": out_dir}), on_event=reporter)
        return 130 if trainer.run().interrupted else 0
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _tokenize(args) -> int:
    out = Path(args.out)
    if not out.name.endswith(".bin"):
        raise ValueError(f"--out {out} must end in .bin: lmrt train --data reads a .bin file as token ids")
    # What lmrt train does with the same settings, so that training on the .bin is training on the text.
    if args.data is not None and is_token_file(args.data):
        raise ValueError(f"{args.data} is already a token file; --data takes a text file or a folder of text files")
    tokenizer, tokens = corpus_tokens(TrainConfig(data=args.data, tokenizer=args.tokenizer,
                                                  bpe_vocab_size=args.bpe_vocab_size))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_token_file(out, tokens, tokenizer.vocab_size)
    tokenizer.save(tokenizer_path(out))
    print(f"lmrt tokenize: {len(tokens):,} tokens written to {out}; tokenizer {tokenizer.kind} "
          f"({tokenizer.vocab_size} ids) in {tokenizer_path(out)}")
    return 0


def _trainer_of_run(run: str, load_data: bool, changes: dict | None = None) -> Trainer:
    if CheckpointManager(Path(run) / "checkpoints").latest() is None:
        raise FileNotFoundError(f"no checkpoint in {Path(run) / 'checkpoints'}; train first: lmrt train --out {run}")
    return Trainer.continue_run(run, changes, load_data=load_data)


def _eval(args) -> int:
    # The validation split of the run's data (checked against the fingerprint its checkpoints hold).
    trainer = _trainer_of_run(args.run, load_data=True, changes={"data": args.data} if args.data else None)
    loss = trainer.evaluate(args.batches)  # None: every validation batch
    print(f"step {trainer.step}: validation loss {loss:.4f}, perplexity {_perplexity(loss):.2f}")
    return 0


def _generate(args) -> int:
    trainer = _trainer_of_run(args.run, load_data=False)  # the checkpoint's model and tokenizer are all it needs
    given = {name: getattr(args, name) for name in SAMPLING if getattr(args, name) is not None}
    if args.greedy or args.beams != 1:
        # Greedy decoding and beam search draw nothing: a sampling option given with them would be ignored.
        if given:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            raise ValueError(f"{flags} set how tokens are sampled, and --greedy or --beams decode without sampling; "
                             "leave out one or the other")
        if args.greedy and args.beams != 1:
            raise ValueError(f"--greedy and --beams {args.beams} are two ways to decode; pick one")
    options = dict(num_beams=args.beams, length_penalty=args.length_penalty)
    if not args.greedy and args.beams == 1:
        options.update(do_sample=True, **{**SAMPLING, **given})
    print(trainer.generate_text(args.prompt, args.max_new_tokens, seed=args.seed, **options))
    return 0


def _bench(args) -> int:
    # `python -m lmrt` has the current folder on sys.path, but the `lmrt` console script has its bin/ folder there
    # instead, so the benchmarks of the checkout it is run from are looked for in the current folder.
    if importlib.util.find_spec("benchmarks") is None and (Path.cwd() / "benchmarks" / "suite.py").is_file():
        sys.path.insert(0, str(Path.cwd()))
    if importlib.util.find_spec("benchmarks") is None:
        raise ImportError("lmrt bench runs the benchmark suite of a source checkout: run it from the repository root "
                          f"(the folder that holds benchmarks/), not {Path.cwd()}")
    from benchmarks import suite

    return suite.run(args.benchmarks, quick=args.quick, out=args.out, save=args.save)


def _info(args) -> int:
    lines = [f"lmrt {lmrt.__version__} (imported from {Path(lmrt.__file__).parent})",
             f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for package in ("triton", "transformers", "tokenizers"):
        spec = importlib.util.find_spec(package)
        lines.append(f"{package} {_version(package) if spec else 'not installed'}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            lines.append(f"GPU {index}: {torch.cuda.get_device_name(index)}")
    else:
        lines.append("GPU: none (CUDA is not available to this torch)")
    for name in backends.BACKENDS:
        reasons = {d: backends.unavailable_reason(name, d)
                   for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}
        usable = [d for d, reason in reasons.items() if reason is None]
        why = "; ".join(sorted({r for r in reasons.values() if r}))
        lines.append(f"backend {name}: " + (f"available on {', '.join(usable)}" if usable else f"unavailable ({why})"))
    print("\n".join(lines))
    return 0


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(version unknown)"


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class _ConsoleReporter:
    """Turns the trainer's events into a progress bar (tqdm, when installed) and lines of text."""

    def __init__(self, progress: bool):
        self.progress, self.bar = progress, None

    def __call__(self, name: str, data: dict) -> None:
        getattr(self, f"_{name}")(data)

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def _start(self, data) -> None:
        config = data["config"]
        print(f"lmrt train: {config.model}, {data['parameters'] / 1e6:.2f}M parameters, on {data['device']} "
              f"({data['precision']}, {data['world_size']} process{'es' if data['world_size'] > 1 else ''}); "
              f"{data['train_examples']} training and {data['validation_examples']} validation examples\n"
              f"{config}", flush=True)
        if self.progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=config.max_steps, initial=data["start_step"], desc="train", unit="step",
                            dynamic_ncols=True)

    def _step(self, data) -> None:
        metrics = f"loss {data['loss']:.4f}, lr {data['lr']:.2e}, {data['tokens_per_second']:,.0f} tok/s"
        if "mfu" in data:
            metrics += f", MFU {100 * data['mfu']:.1f}%"
        if self.bar is not None:
            self.bar.set_postfix_str(metrics, refresh=False)
            self.bar.update(1)
        elif data["step"] % 50 == 0:
            print(f"step {data['step']}: {metrics}", flush=True)

    def _eval(self, data) -> None:
        self._write(f"step {data['step']}: validation loss {data['validation_loss']:.4f}, "
                    f"perplexity {data['perplexity']:.2f}")

    def _sample(self, data) -> None:
        self._write(f"step {data['step']} sample:\n{data['text']}\n")

    def _checkpoint(self, data) -> None:
        self._write(f"step {data['step']}: checkpoint {data['path']}")

    def _end(self, data) -> None:
        if self.bar is not None:
            self.bar.close()
        result = data["result"]
        how = "interrupted; resume with --resume" if result.interrupted else "done"
        print(f"lmrt train: {how} at step {result.step}; checkpoints, metrics.jsonl and loss.png in "
              f"{result.out_dir}", flush=True)
