"""The training loop: data, model, AdamW with warmup and cosine decay, mixed precision, gradient accumulation and
clipping, evaluation, samples, metrics and checkpoints, on one process or several (torchrun, DDP).

The trainer prints nothing: it reports what happens through `on_event(name, data)` (the command line turns the
events into a progress bar and lines of text). Events: "start" (the config, the model's size, the data's),
"step" (loss, learning rate, tokens/s, MFU on a GPU), "eval" (validation loss and perplexity), "sample" (generated
text), "checkpoint" (its path), "end" (a TrainResult).

A run never loses its work: checkpoints hold everything needed to continue bitwise as if never stopped (model,
optimizer, schedule, gradient scaler, RNG states, the data position and a fingerprint of the data, the config and the
tokenizer); Ctrl-C or SIGTERM saves one after the step in progress and returns; a training loss, gradient norm or
validation loss that is not finite stops the run with NonFiniteLossError before the update that would spoil the weights,
or before a checkpoint of spoilt weights is written, so the last checkpoint stays the last good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

import lmrt
from lmrt import backends
from lmrt.data import (
    BPETokenizer,
    ByteTokenizer,
    LanguageModelWindows,
    Seq2SeqPairs,
    Tokenizer,
    default_corpus,
    load_tokenizer,
    read_text,
    read_token_file,
    split_tokens,
    tokenizer_from_dict,
)
from lmrt.data.token_file import is_token_file, tokenizer_path
from lmrt.models import GPT, IGNORE_INDEX, GPTConfig, LSTMConfig, LSTMLanguageModel, Seq2SeqConfig, Seq2SeqTransformer
from lmrt.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    apply_model_state,
    apply_optimizer_state,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from lmrt.train.config import TrainConfig, settings_over

# Settings a resumed run may change: how long it runs, what it reports and where it computes, not what it computes;
# and how large its steps are and in what precision they compute (the remedies for a run that diverged), which need no
# saved state of their own: the weights are float32 whatever the precision, and the schedule is recomputed from the
# settings at every step.
RESUMABLE_CHANGES = {"max_steps", "max_minutes", "eval_interval", "sample_interval", "sample_tokens", "sample_prompt",
                     "checkpoint_interval", "keep_last", "tensorboard", "device", "compile", "backend",
                     "learning_rate", "min_learning_rate", "grad_clip", "precision"}
# A second Ctrl-C this many seconds or more after the first interrupts at once; one sooner is the same keypress
# arriving twice (torchrun forwards the terminal's SIGINT to workers that got it already).
SECOND_CTRL_C_SECONDS = 2.0
# The data's fingerprint hashes the tokens in chunks of this many, at most this many chunks, evenly spaced: all of a
# corpus of up to 4M tokens, samples of a larger one (a .bin file too large to read at every start).
_FINGERPRINT_CHUNK = 1 << 16
_FINGERPRINT_CHUNKS = 64
# Dense bfloat16 tensor-core peaks (FLOP/s), for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class NonFiniteLossError(RuntimeError):
    """The training loss, the gradient norm or the validation loss became NaN or infinite; the run stopped and kept
    its last good checkpoint."""


@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    validation_loss: float | None
    interrupted: bool
    out_dir: Path


Event = Callable[[str, dict], None]


class Trainer:
    """Trains the model `config` describes; `resume=True` continues from the latest checkpoint in its out_dir."""

    def __init__(self, config: TrainConfig, on_event: Event | None = None, resume: bool = False):
        if resume:
            checkpoint, checkpoint_path = _latest_checkpoint(config.out_dir)
            _check_resumable(config, checkpoint["state"], checkpoint_path)
        else:
            _refuse_existing_run(config.out_dir)
            checkpoint, checkpoint_path = None, None
        self._set_up(config, on_event, checkpoint, checkpoint_path, load_data=True)

    @classmethod
    def continue_run(cls, out_dir: str | Path, changes: dict | None = None, on_event: Event | None = None,
                     load_data: bool = True) -> Trainer:
        """The run in `out_dir`, from its latest checkpoint and with the config saved there, changed by `changes`:
        a setting of RESUMABLE_CHANGES takes its new value, any other must equal the saved one (CheckpointError);
        model_options add to the saved ones key by key, as they do to a preset's.
        The run lives in `out_dir` from then on, whatever out_dir it was trained with (a copied or moved run).
        `load_data=False` reads no corpus: the trainer generates text but cannot train or evaluate. Reads the
        checkpoint once."""
        checkpoint, path = _latest_checkpoint(out_dir)
        saved = checkpoint["state"]["config"]
        config = TrainConfig.from_dict({**settings_over(saved, changes or {}), "out_dir": str(out_dir)})
        _check_resumable(config, checkpoint["state"], path)
        trainer = cls.__new__(cls)
        trainer._set_up(config, on_event, checkpoint, path, load_data)
        return trainer

    def _set_up(self, config: TrainConfig, on_event: Event | None, checkpoint: dict | None,
                checkpoint_path: Path | None, load_data: bool) -> None:
        self.on_event = on_event or (lambda name, data: None)
        if config.data is not None:
            # The run's record says where its data is, from whatever folder it is resumed or evaluated.
            config = dataclasses.replace(config, data=str(Path(config.data).resolve()))
        self.rank, self.world_size = _init_distributed(config.device)
        self.out_dir = Path(config.out_dir)
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", config.keep_last)
        self.config = config
        self.device = _resolve_device(config.device, self.rank)
        if config.backend is not None:
            # Every op would raise at its first call (an explicit choice does not fall back): say so before a step.
            reason = backends.unavailable_reason(config.backend, self.device.type)
            if reason is not None:
                raise ValueError(f"`backend` is {config.backend!r}, which cannot run on {self.device}: {reason}")
        self.amp_dtype = _resolve_precision(config.precision, self.device)
        self._peak_flops = next((flops for name, flops in PEAK_FLOPS.items() if self.device.type == "cuda"
                                 and name in torch.cuda.get_device_name(self.device)), None)
        torch.manual_seed(config.seed)
        saved_tokenizer = tokenizer_from_dict(checkpoint["state"]["tokenizer"]) if checkpoint else None
        if load_data:
            self.tokenizer, tokens = self._corpus_tokens(saved_tokenizer)
            self.data_fingerprint = _data_fingerprint(tokens)
            if checkpoint:
                _check_same_data(config, checkpoint["state"]["data"], self.data_fingerprint, checkpoint_path)
            if self.tokenizer.kind != config.tokenizer:
                # A .bin file's ids are its own tokenizer's, whatever the setting said: the saved config tells the
                # truth.
                self.config = config = config.with_overrides([f"tokenizer={self.tokenizer.kind}"])
            train_tokens, validation_tokens = split_tokens(tokens, config.validation_fraction)
            self.train_data = self._dataset(train_tokens, "training")
            self.validation_data = self._dataset(validation_tokens, "validation")
        else:  # the checkpoint holds all that generation needs: the model and its tokenizer
            self.tokenizer, self.train_data, self.validation_data = saved_tokenizer, None, None
            self.data_fingerprint = checkpoint["state"]["data"].get("fingerprint")
        self.model = _build_model(config, self.tokenizer).to(self.device)
        self.optimizer = _adamw(self.model, config, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(config))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step, self.epoch, self.position = 0, 0, 0
        self._saved_run = (None, None)  # (checkpoint, processes that trained it) of a resumed run
        self.tokens_seen, self.train_seconds = 0, 0.0  # totals over the run, resumed ones included
        self._tensorboard = _tensorboard_writer(self.out_dir) if config.tensorboard and self.rank == 0 else None
        if checkpoint:
            self._restore(checkpoint, checkpoint_path)
        self.train_model = torch.compile(self.model) if config.compile else self.model
        if self.world_size > 1:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.train_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ----------------------------------------------------------------------------------------------------- set-up
    def _corpus_tokens(self, saved_tokenizer: Tokenizer | None) -> tuple[Tokenizer, torch.Tensor]:
        try:
            return corpus_tokens(self.config, saved_tokenizer)
        except FileNotFoundError as error:
            if saved_tokenizer is None:
                raise
            # A run loaded from its checkpoint (whose tokenizer it brings) whose data has moved.
            raise FileNotFoundError(f"{error} (the data of the run in {self.out_dir}; if it moved, give its new place: "
                                    f"--data, or the `data` setting)") from None

    def _dataset(self, tokens, split: str):
        try:
            if self.config.model == "seq2seq":
                half = self.config.context_length // 2
                return Seq2SeqPairs.continuations(tokens, half, half - 1, self.tokenizer)
            return LanguageModelWindows(tokens, self.config.context_length, seed=self.config.seed)
        except ValueError as error:  # too few tokens for one example: say which split, and what would help
            validation = split == "validation"
            share = self.config.validation_fraction if validation else 1 - self.config.validation_fraction
            larger = "a larger validation_fraction, " if validation else ""
            raise ValueError(f"the {split} split ({share:.3g} of the data): {error}; use more text, {larger}or a "
                             f"shorter context_length") from None

    def _restore(self, checkpoint: dict, source: Path) -> None:
        state = checkpoint["state"]
        apply_model_state(self.model, state["model"], source=source)
        apply_optimizer_state(self.optimizer, state["optimizer"], source=source)
        self.scheduler.load_state_dict(state["scheduler"])
        # The saved schedule's base rate and the optimizer's rates are the saved learning_rate's: a resumed run that
        # changes learning_rate or min_learning_rate continues on the schedule they give (the same rates, bit for bit,
        # when neither changed).
        self.scheduler.base_lrs = [self.config.learning_rate] * len(self.optimizer.param_groups)
        for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = self.config.learning_rate
            group["lr"] = self.config.learning_rate * factor(self.scheduler.last_epoch)
        if state["scaler"]:  # a no-op where the scaler is off (a float16 run resumed in another precision)
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self.step, self.epoch, self.position = state["step"], state["data"]["epoch"], state["data"]["position"]
        # Positions count each process's share of the data (and a step, batch_size sequences per process): the run
        # goes on with as many processes or not at all (None: a checkpoint of an lmrt that did not record it).
        self._saved_run = (source, state["data"].get("processes"))
        self.tokens_seen, self.train_seconds = state["progress"]["tokens"], state["progress"]["seconds"]

    def _require_data(self, purpose: str) -> None:
        if self.train_data is None:
            raise RuntimeError(f"{purpose} needs the run's data, and this trainer was loaded without it "
                               f"(Trainer.continue_run(..., load_data=False))")

    # ------------------------------------------------------------------------------------------------------- data
    def _micro_batches(self) -> Iterator[tuple[tuple, int, int]]:
        """(batch, epoch, position after it), forever: each epoch a DistributedSampler permutation of the dataset
        (this process's share of it), cut into batches; starts at the saved (epoch, position)."""
        sampler = DistributedSampler(self.train_data, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=self.config.seed, drop_last=True)
        size = self.config.batch_size
        if len(sampler) < size:
            raise ValueError(f"the training data has {len(self.train_data)} examples, fewer than one batch of "
                             f"{size} per process; use more text, a shorter context_length or a smaller batch_size")
        epoch, position = self.epoch, self.position
        while True:
            sampler.set_epoch(epoch)
            if isinstance(self.train_data, LanguageModelWindows):
                self.train_data.set_epoch(epoch)
            indices = list(sampler)
            while position + size <= len(indices):
                batch = self._collate(self.train_data, [self.train_data[i] for i in indices[position: position + size]])
                position += size
                yield batch, epoch, position
            epoch, position = epoch + 1, 0

    def _collate(self, data, items: list) -> tuple:
        """A batch of `items` of dataset `data`, on the device."""
        if isinstance(data, Seq2SeqPairs):
            return tuple(t.to(self.device) for t in data.collate(items))
        return tuple(torch.stack(column).to(self.device) for column in zip(*items, strict=True))

    # ------------------------------------------------------------------------------------------------------- loop
    def request_stop(self) -> None:
        """Finish the step in progress, save a checkpoint and return from run() (what Ctrl-C does)."""
        self._stop_requested = True

    def run(self) -> TrainResult:
        """Train until max_steps, max_minutes or a stop request (Ctrl-C); returns how it ended."""
        self._require_data("training")
        path, processes = self._saved_run
        if processes is not None and processes != self.world_size:
            raise CheckpointError(f"cannot train on from {path} in {self.world_size} process(es): its run trained "
                                  f"in {processes}, and the position in the data and the global batch are per "
                                  f"process; resume it with {_launch_command(processes)}")
        config = self.config
        if config.max_steps // config.sample_interval > self.step // config.sample_interval:
            self._prompt_ids(config.sample_prompt, "`sample_prompt`")  # refused now, not at the first sample
        self._emit("start", config=config, parameters=self.model.num_parameters(), device=str(self.device),
                   precision=str(self.amp_dtype).removeprefix("torch."), train_examples=len(self.train_data),
                   validation_examples=len(self.validation_data), start_step=self.step, world_size=self.world_size)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(self.out_dir / "tokenizer.json")
            # Drop the records written past the starting step: past the checkpoint of a resumed run, or by a new
            # run's earlier attempt that stopped before its first checkpoint. Here, not on loading: a load for
            # evaluation or generation may be looking at a run that another process is training.
            _truncate_metrics(self.out_dir / "metrics.jsonl", self.step)
        batches = self._micro_batches()
        started = time.perf_counter()
        train_loss = validation_loss = None
        saved_step = self.step  # a resumed run's checkpoint, or no step yet
        self._stop_requested = False
        with self._ctrl_c_requests_stop(), self._backend():
            try:
                while self.step < config.max_steps and not self._stop_agreed(started):
                    train_loss, metrics = self._train_step(batches)
                    self.step += 1
                    self._emit("step", step=self.step, **metrics)
                    self._log_metrics({"step": self.step, **metrics})
                    evaluated = self.step % config.eval_interval == 0 or self.step == config.max_steps
                    if evaluated:
                        validation_loss = self._evaluate_and_report()
                        if not math.isfinite(validation_loss):  # spoilt weights: the next step's loss would be too
                            raise self._non_finite(self.step, "the validation loss", validation_loss)
                    if self.step % config.sample_interval == 0:
                        self._emit("sample", step=self.step, text=self.sample())
                    if self.step % config.checkpoint_interval == 0 or self.step == config.max_steps:
                        self._save(validation_loss if evaluated else None)
                        saved_step = self.step
                if saved_step != self.step:  # stopped by time or by request: keep the work
                    self._save(None)
            finally:
                if self.rank == 0:
                    _plot_losses(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
                if self._tensorboard is not None:
                    self._tensorboard.flush()
        result = TrainResult(self.step, train_loss, validation_loss, self._stop_requested, self.out_dir)
        self._emit("end", result=result)
        return result

    @contextlib.contextmanager
    def _ctrl_c_requests_stop(self):
        """In the main thread, the first Ctrl-C (SIGINT) or a SIGTERM (what schedulers and torchrun send) asks the
        loop to stop after the current step, so that a checkpoint is never taken in the middle of an optimizer
        update. A second Ctrl-C interrupts at once, unless it comes within SECOND_CTRL_C_SECONDS of the first: under
        torchrun every worker gets each keypress twice (from the terminal, and forwarded by torchrun), and ranks
        interrupted at different points would wait on each other's collectives instead of saving."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        first_signal = None

        def handler(signum, frame):
            nonlocal first_signal
            now = time.monotonic()
            if signum == signal.SIGINT and first_signal is not None and now - first_signal >= SECOND_CTRL_C_SECONDS:
                raise KeyboardInterrupt
            if first_signal is None:
                first_signal = now
            self._stop_requested = True

        previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, previous_handler in previous.items():
                signal.signal(number, previous_handler)

    def _stop_agreed(self, started: float) -> bool:
        """Whether to stop now, at a stop request or with max_minutes past since `started`: every process stops at
        the same step when any of them was asked to or ran out of time (each has its own clock, started apart)."""
        time_up = self.config.max_minutes is not None and time.perf_counter() - started > 60 * self.config.max_minutes
        if self.world_size == 1:
            return self._stop_requested or time_up
        flags = torch.tensor([float(self._stop_requested), float(time_up)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self._stop_requested = bool(flags[0].item())
        return bool(flags.max().item())

    def _train_step(self, batches: Iterator) -> tuple[float, dict]:
        config, model = self.config, self.train_model
        model.train()
        start = time.perf_counter()
        total = torch.zeros((), device=self.device)
        for micro in range(config.gradient_accumulation):
            batch, self.epoch, self.position = next(batches)
            last = micro == config.gradient_accumulation - 1
            sync = model.no_sync() if self.world_size > 1 and not last else contextlib.nullcontext()
            with sync, self._autocast():
                _, loss = model(*batch)
            with sync:
                self.scaler.scale(loss / config.gradient_accumulation).backward()
            total += loss.detach().float()
        mean_loss = total / config.gradient_accumulation
        if self.world_size > 1:
            dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
        loss_value = mean_loss.item()
        if not math.isfinite(loss_value):
            raise self._non_finite(self.step + 1, "the training loss", loss_value)
        if config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        elif not self.scaler.is_enabled():
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        # A gradient that overflowed would make every weight it touches NaN: refuse it before the update. With
        # float16 (the scaler on) an overflow is expected now and then: the scaler skips that update and lowers its
        # scale.
        if not self.scaler.is_enabled() and not math.isfinite(norm := norm.item()):
            raise self._non_finite(self.step + 1, "the gradient norm", norm)
        # This step's rate (after a resume with another learning_rate, the scheduler's get_last_lr() is the saved one).
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        seconds = time.perf_counter() - start
        tokens = config.batch_size * config.gradient_accumulation * self.world_size * config.context_length
        self.tokens_seen += tokens
        self.train_seconds += seconds
        metrics = {"loss": loss_value, "lr": lr, "tokens_per_second": tokens / seconds, "tokens": self.tokens_seen,
                   "seconds": self.train_seconds}
        if self._peak_flops is not None and isinstance(self.model, GPT):
            metrics["mfu"] = self.model.estimate_mfu(tokens / seconds / self.world_size, self._peak_flops)
        return loss_value, metrics

    def _non_finite(self, step: int, what: str, value: float) -> NonFiniteLossError:
        """The error that stops the run at `step` (which is not saved), with the way back."""
        latest = self.checkpoints.latest()
        advice = (f"The last good checkpoint is {latest}; resume from it (lmrt train --resume) with a lower "
                  f"learning_rate, a lower grad_clip or precision=float32" if latest else
                  "No checkpoint was written yet; start again with a lower learning_rate, a lower grad_clip or "
                  "precision=float32")
        return NonFiniteLossError(f"step {step}: {what} is {value}; the run stopped. {advice}")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32)

    def _backend(self):
        """The `backend` setting's choice of backend for lmrt's ops, if it makes one (process-wide while it holds)."""
        return lmrt.backend(self.config.backend) if self.config.backend is not None else contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> float:
        """Mean loss per target token over the first `batches` batches of the validation data (the same ones every
        time; all of them when None): each batch's mean weighs as many targets as it holds, so a short last batch or
        a batch of short seq2seq targets counts for what it holds."""
        self._require_data("evaluation")
        if batches is not None and batches < 1:
            raise ValueError(f"evaluation needs `batches` >= 1 (or None: every validation batch), got {batches}")
        self.model.eval()
        data, size = self.validation_data, self.config.batch_size
        if isinstance(data, LanguageModelWindows):
            data.set_epoch(0)
        end = len(data) if batches is None else min(len(data), size * batches)
        loss_sum, targets = 0.0, 0
        for start in range(0, end, size):
            batch = self._collate(data, [data[i] for i in range(start, min(start + size, end))])
            counted = int((batch[-1] != IGNORE_INDEX).sum())  # the last column of every batch is the targets
            with self._autocast(), self._backend():
                loss_sum += self.model(*batch)[1].float().item() * counted
            targets += counted
        return loss_sum / targets

    def _evaluate_and_report(self) -> float:
        loss = self.evaluate(self.config.eval_batches)
        perplexity = math.exp(min(loss, 50.0))
        self._emit("eval", step=self.step, validation_loss=loss, perplexity=perplexity)
        self._log_metrics({"step": self.step, "validation_loss": loss, "perplexity": perplexity,
                           "tokens": self.tokens_seen, "seconds": self.train_seconds})
        return loss

    def sample(self) -> str:
        """The periodic sample: sample_tokens tokens after sample_prompt, temperature 0.8, top-k 40, a fixed seed."""
        return self.generate_text(self.config.sample_prompt, self.config.sample_tokens, seed=self.config.seed,
                                  do_sample=True, temperature=0.8, top_k=40)

    @torch.no_grad()
    def generate_text(self, prompt: str, max_new_tokens: int, seed: int = 0, **options) -> str:
        """The model's continuation of `prompt` (options of lmrt.generation.generate), with the prompt; for the
        encoder-decoder, the continuation of `prompt` as its source text."""
        self.model.eval()
        generator = torch.Generator(self.device).manual_seed(seed)
        ids = self._prompt_ids(prompt, "the prompt")
        with self._autocast(), self._backend():
            if isinstance(self.model, Seq2SeqTransformer):
                source = torch.tensor([ids], device=self.device)
                limit = min(max_new_tokens, self.model.config.max_length)  # the last new token is never fed back
                out = self.model.generate(source, limit, generator=generator, **options)
                return self.tokenizer.decode(out[0, 1:].tolist())
            room = self.config.context_length + 1 - len(ids)  # the last new token is never fed back
            out = self.model.generate(torch.tensor([ids], device=self.device), min(max_new_tokens, room),
                                      generator=generator, **options)
            return self.tokenizer.decode(out[0].tolist())

    def _prompt_ids(self, prompt: str, name: str) -> list[int]:
        """The token ids generation starts from (BOS for an empty prompt); the model's context (the encoder's, for
        the encoder-decoder) must hold them."""
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.bos_id]
        seq2seq = isinstance(self.model, Seq2SeqTransformer)
        context = self.model.config.max_length if seq2seq else self.config.context_length
        if len(ids) > context:
            raise ValueError(f"{name} has {len(ids)} tokens; the model's {'source' if seq2seq else 'context'} holds "
                             f"{context}")
        return ids

    # --------------------------------------------------------------------------------------------------- records
    def _save(self, validation_loss: float | None) -> None:
        if self.rank == 0:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                     "rng": capture_rng_state(), "step": self.step,
                     "data": {"epoch": self.epoch, "position": self.position, "processes": self.world_size,
                              "fingerprint": self.data_fingerprint, "python": platform.python_version()},
                     "progress": {"tokens": self.tokens_seen, "seconds": self.train_seconds},
                     "config": self.config.to_dict(), "model_config": dataclasses.asdict(self.model.config),
                     "tokenizer": self.tokenizer.to_json()}
            path = self.checkpoints.save(self.step, state, validation_loss)
            self._emit("checkpoint", step=self.step, path=str(path))
        if self.world_size > 1:
            dist.barrier()

    def _emit(self, name: str, **data) -> None:
        if self.rank == 0:
            self.on_event(name, data)

    def _log_metrics(self, record: dict) -> None:
        """One JSON line in metrics.jsonl and, with `tensorboard`, scalars in out_dir/tensorboard."""
        if self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for name, value in record.items():
                if name != "step":
                    self._tensorboard.add_scalar(name, value, record["step"])


def _init_distributed(device: str) -> tuple[int, int]:
    """(rank, world size): torchrun's, with the process group set up (NCCL for a run on GPUs, gloo for one on CPUs,
    even where GPUs are present), or (0, 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    on_gpus = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpus else "gloo")
    return dist.get_rank(), world_size


def _refuse_existing_run(out_dir: str | Path) -> None:
    """A new run in a folder holding another's checkpoints would delete them (later steps count as an abandoned
    continuation) and mix its metrics with theirs: refuse it."""
    latest = CheckpointManager(Path(out_dir) / "checkpoints").latest()
    if latest is not None:
        raise CheckpointError(f"`out_dir` {out_dir} already holds a run (latest checkpoint {latest.name}); continue it "
                              "with resume (lmrt train --resume), or train into another out_dir (--out)")


def _launch_command(processes: int) -> str:
    return "lmrt train --resume" if processes == 1 else f"torchrun --nproc_per_node {processes} -m lmrt train --resume"


def _latest_checkpoint(out_dir: str | Path) -> tuple[dict, Path]:
    """The latest checkpoint of the run in `out_dir`, loaded, and its path."""
    path = CheckpointManager(Path(out_dir) / "checkpoints").latest()
    if path is None:
        raise CheckpointError(f"cannot resume: no checkpoint in {Path(out_dir) / 'checkpoints'}")
    return load_checkpoint(path), path


def _check_resumable(config: TrainConfig, state: dict, path: Path) -> None:
    """`config` differs from the config saved in a checkpoint's `state` only in what a resumed run may change. Not
    out_dir: the checkpoint was found in config.out_dir, and a copied or moved run lives in its new folder. Nor
    `data`, where the checkpoint holds the data's fingerprint (which _check_same_data compares): the same data at
    another path (moved, or named relative to another folder). Nor `tokenizer` for a .bin file of token ids, whose
    tokenizer is the one that wrote it."""
    saved = state["config"]
    free = RESUMABLE_CHANGES | {"out_dir"}
    if state["data"].get("fingerprint") is not None:
        free = free | {"data"}
    if config.data is not None and is_token_file(config.data):
        free = free | {"tokenizer"}
    changed = sorted(name for name, value in config.to_dict().items() if name not in free and saved.get(name) != value)
    if changed:
        name = changed[0]
        raise CheckpointError(f"cannot resume from {path}: it was trained with {name}={saved.get(name)!r}, the "
                              f"config now says {getattr(config, name)!r} (a resumed run may change only "
                              f"{', '.join(sorted(RESUMABLE_CHANGES))})")


def _data_fingerprint(tokens) -> dict:
    """The token count and a BLAKE2 hash of the tokens as int64 (all of them, or evenly spaced chunks of a large
    corpus), cheap enough for every start: what tells a resumed run that its data changed under the same path."""
    count = len(tokens)
    chunks = -(-count // _FINGERPRINT_CHUNK)
    if chunks > _FINGERPRINT_CHUNKS:
        starts = [i * (count - _FINGERPRINT_CHUNK) // (_FINGERPRINT_CHUNKS - 1) for i in range(_FINGERPRINT_CHUNKS)]
    else:
        starts = range(0, count, _FINGERPRINT_CHUNK)
    digest = hashlib.blake2b(digest_size=16)
    for start in starts:
        digest.update(numpy.asarray(tokens[start: start + _FINGERPRINT_CHUNK]).astype("<i8").tobytes())
    return {"tokens": count, "hash": digest.hexdigest()}


def _check_same_data(config: TrainConfig, saved_data: dict, current: dict, path: Path) -> None:
    """The data is the one the checkpoint's run trained on, by fingerprint (a checkpoint of an lmrt that saved none
    is taken on trust)."""
    saved = saved_data.get("fingerprint")
    if saved is None or saved == current:
        return
    data = "the embedded corpus" if config.data is None else f"`data` {config.data}"
    size = (f"{current['tokens']} tokens now, {saved['tokens']} then" if current["tokens"] != saved["tokens"] else
            f"{current['tokens']} tokens, as then, but others")
    advice = "give the run's data (`data`, --data), or train a new run into another out_dir (--out)"
    saved_python, python = saved_data.get("python"), platform.python_version()
    if config.data is None and saved_python not in (None, python):
        advice = (f"the embedded corpus is the pydoc topics of the Python that runs lmrt, Python {saved_python}'s "
                  f"for that run and {python}'s here: run lmrt under Python {saved_python}, or train a new run into "
                  "another out_dir (--out)")
    raise CheckpointError(f"{path} was trained on other data than {data} ({size}); {advice}")


def _tensorboard_writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("tensorboard=true needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _resolve_device(name: str, rank: int) -> torch.device:
    if name == "auto":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"`device` must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` is {name!r}, but this machine has no CUDA GPU (torch {torch.__version__})")
    return device


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if precision == "float16" and device.type != "cuda":
        raise ValueError("precision=float16 needs a CUDA GPU (its gradient scaler); use bfloat16 or float32 on a CPU")
    return getattr(torch, precision)


def corpus_tokens(config: TrainConfig, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, torch.Tensor]:
    """The tokenizer and the token ids of the run's corpus (`data`, else the embedded default corpus).

    The tokenizer is `tokenizer` if given (a resumed run's), else the one saved beside a .bin file, else a new one
    of the configured kind (a BPE is trained on the text). A .bin file's ids are memory-mapped, not read.
    """
    text = _read_text(config)
    tokenizer = tokenizer if tokenizer is not None else _make_tokenizer(config, text)
    return tokenizer, _tokens(config, text, tokenizer)


def _read_text(config: TrainConfig) -> str | None:
    """The training text, or None when `data` is a file of token ids (lmrt.data.token_file.is_token_file)."""
    if config.data is not None and is_token_file(config.data):
        return None
    return default_corpus() if config.data is None else read_text(config.data)


def _make_tokenizer(config: TrainConfig, text: str | None) -> Tokenizer:
    if text is None:  # a .bin file: the tokenizer that wrote it, saved beside it by `lmrt tokenize`
        path = tokenizer_path(config.data)
        if path.is_file():
            return load_tokenizer(path)
        if config.tokenizer == "byte":
            return ByteTokenizer()
        raise ValueError(f"{config.data} is already tokenized and has no tokenizer file {path} beside it: write it "
                         f"with lmrt tokenize, or train with tokenizer=byte if it holds byte ids")
    if config.tokenizer == "byte":
        return ByteTokenizer()
    return BPETokenizer.train([text], config.bpe_vocab_size)


def _tokens(config: TrainConfig, text: str | None, tokenizer: Tokenizer):
    if text is None:
        return read_token_file(config.data, tokenizer.vocab_size)
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def _build_model(config: TrainConfig, tokenizer: Tokenizer) -> torch.nn.Module:
    options = dict(config.model_options)
    try:
        if config.model == "gpt":
            return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=config.context_length, **options))
        if config.model == "lstm":
            return LSTMLanguageModel(LSTMConfig(vocab_size=tokenizer.vocab_size,
                                                context_length=config.context_length, **options))
        return Seq2SeqTransformer(Seq2SeqConfig(
            src_vocab_size=tokenizer.vocab_size, tgt_vocab_size=tokenizer.vocab_size, max_length=config.context_length,
            share_embeddings=True, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
            **options))
    except TypeError as error:  # an unknown option
        raise ValueError(f"model_options for {config.model}: {error}") from None


def _adamw(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (and embeddings) only, not on biases and norm weights."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                             fused=device.type == "cuda")


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to learning_rate, then cosine decay to min_learning_rate at max_steps, as a LambdaLR factor."""
    floor = config.min_learning_rate / config.learning_rate

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl, skipping (with one warning) the lines that are not a record with an integer
    step: a line torn by a process killed or a disk filled mid-append must not cost the run."""
    records, skipped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append(record)
        else:
            skipped += 1
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} unreadable line{'s' if skipped > 1 else ''} (not a JSON record "
                      f"with an integer step; torn by an interrupted write?)", stacklevel=2)
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after `step` that an interrupted run wrote past its last checkpoint, and unreadable lines."""
    if path.is_file():
        records = [record for record in _read_metrics(path) if record["step"] <= step]
        path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def _plot_losses(metrics: Path, out: Path) -> None:
    """Training and validation loss against steps, as a PNG (when matplotlib is installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not metrics.is_file():
        return
    records = _read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    validation = [(r["step"], r["validation_loss"]) for r in records if "validation_loss" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="training", linewidth=0.8)
    if validation:
        ax.plot(*zip(*validation, strict=True), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats per token)", title=f"lmrt {lmrt.__version__}: {out.parent.name}")
    ax.legend()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
