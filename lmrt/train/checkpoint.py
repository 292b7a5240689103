"""Checkpoints that never lose a run: atomic writes, the last N kept plus the best, and loads that refuse a corrupt
or mismatched file before touching anything.

A checkpoint is one torch.save zip archive holding {"format": "lmrt.checkpoint", "version", "step",
"validation_loss", "state"}, where `state` is the trainer's dict (model, optimizer, scheduler, scaler, RNG states,
config, tokenizer). Everything in it is a tensor, a number, a string, None or a dict/list/tuple of those, so that it
loads with torch.load(weights_only=True): opening a checkpoint never runs code from the file. CheckpointManager.save
checks this before writing, because a run whose checkpoints cannot be loaded back is already lost.

On disk, in the manager's directory:
    step-00001000.pt    the last `keep_last` steps, plus the best one's step file
    best.pt             the checkpoint of lowest validation loss so far (a hard link to its step file where the
                        filesystem allows, else a copy)
    checkpoints.json    the index: every kept step with its validation loss, and which one is best
Each is written to a temporary file in the same directory, flushed to disk and renamed over its name, so that a
reader (or a resumed run) sees either the old file or the new one, never a partial one.
"""

from __future__ import annotations

import json
import math
import operator
import os
import pickle
import random
import re
import secrets
import shutil
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

try:
    import numpy
except ImportError:  # numpy is optional (torch does not need it); without it there is no numpy RNG to save
    numpy = None

FORMAT = "lmrt.checkpoint"
FORMAT_VERSION = 1
INDEX_FORMAT = "lmrt.checkpoint-index"
INDEX_NAME = "checkpoints.json"
BEST_NAME = "best.pt"
_STEP_NAME = re.compile(r"step-(\d{8,})\.pt")
# Temporary files start with a dot (hidden, and never matching _STEP_NAME) and end in .tmp.
_TEMPORARY_NAME = re.compile(r"\.(step-\d{8,}\.pt|best\.pt|checkpoints\.json)\.[0-9a-f]+\.tmp")

# What torch.load(weights_only=True) rebuilds, by exact type: subclasses (numpy.float64 is a float, a defaultdict a
# dict) pickle as their own class, which weights_only refuses.
_LOADABLE_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_LOADABLE_TENSORS = (Tensor, nn.Parameter)
_LOADABLE_CONTAINERS = (dict, OrderedDict, list, tuple, torch.Size)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated or corrupt, not lmrt's, from a newer lmrt, or not
    matching the model or optimizer it is loaded into."""


class CheckpointManager:
    """Saves a run's checkpoints in `directory`, keeping the last `keep_last` steps and the best by validation loss.

    One process writes a directory (rank 0 of a distributed run); any number may read it. Steps are expected to
    grow: saving a step below ones already present means the run went back to an earlier checkpoint, so the later
    steps belong to an abandoned continuation and are deleted (best.pt is kept whatever its step), lest latest()
    resume the wrong branch.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3):
        if type(keep_last) is not int or keep_last < 1:
            raise ValueError(f"CheckpointManager: `keep_last` must be an integer >= 1, got {keep_last!r}")
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"CheckpointManager: `directory` {self.directory} exists and is not a directory")
        self.keep_last = keep_last
        self._losses, self._best = self._recover()

    def save(self, step: int, state: dict, validation_loss: float | None = None) -> Path:
        """Write `state` as `directory/step-{step:08d}.pt`, make it best.pt if its `validation_loss` is the lowest
        so far, update checkpoints.json and delete the step files no longer kept. Returns the step file's path.

        If anything fails (a full disk, an interrupt), the previous checkpoints and index are left as they were and
        no temporary file remains."""
        try:
            step = operator.index(step)
        except TypeError:
            raise TypeError(f"CheckpointManager.save: `step` must be an integer, got {step!r}") from None
        if step < 0:
            raise ValueError(f"CheckpointManager.save: `step` must be >= 0, got {step}")
        if not isinstance(state, dict):
            raise TypeError(f"CheckpointManager.save: `state` must be a dict, got {type(state).__name__}")
        _check_loadable(state, "state")
        # A loss given as a tensor or a numpy scalar becomes a plain float, which JSON and weights_only accept.
        try:
            loss = None if validation_loss is None else float(validation_loss)
        except (TypeError, ValueError):
            raise TypeError(f"CheckpointManager.save: `validation_loss` must be a number or None, got "
                            f"{validation_loss!r}") from None

        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_temporaries()
        path = self.directory / f"step-{step:08d}.pt"
        payload = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "validation_loss": loss, "state": state}
        _write_atomically(path, lambda file: _save_with_crc32(payload, file))

        # The index is written after the step file and best.pt: a crash in between leaves files the index does not
        # list yet, which _recover() reads back, never an index naming files that do not exist. The manager's own view
        # follows each completed write, so that after a failure further on it still counts this checkpoint.
        self._losses = {s: v for s, v in self._losses.items() if s < step}
        self._losses[step] = loss
        if _improves(loss, self._best):
            self._publish_best(path)
            self._best = (step, loss)
        kept = sorted(self._losses)[-self.keep_last:]
        if self._best is not None and self._best[0] in self._losses and self._best[0] not in kept:
            kept.append(self._best[0])
        kept_losses = {s: self._losses[s] for s in sorted(kept)}
        self._write_index(kept_losses, self._best)
        # Scanning (rather than diffing the index) also removes steps dropped by an earlier save that failed.
        for old_step, old_path in _scan_steps(self.directory).items():
            if old_step not in kept_losses:
                old_path.unlink(missing_ok=True)
        self._losses = kept_losses
        return path

    def latest(self) -> Path | None:
        """The step file of the highest step in the directory, or None. Read from the directory itself, which every
        completed save has renamed its file into, so that it holds even with the index missing or behind."""
        steps = _scan_steps(self.directory)
        return steps[max(steps)] if steps else None

    def best(self) -> Path | None:
        """best.pt, the checkpoint of lowest validation loss saved so far, or None if no save had one."""
        path = self.directory / BEST_NAME
        return path if self._best is not None and path.is_file() else None

    def _recover(self) -> tuple[dict[int, float | None], tuple[int, float] | None]:
        """The kept steps' losses and the best (step, loss), from the index and the files on disk. Files the index
        does not list (the index missing, unreadable, or behind after an interrupted save) are read back."""
        on_disk = _scan_steps(self.directory)
        index = self._read_index()
        recorded, best = index if index is not None else ({}, None)
        best_path = self.directory / BEST_NAME
        if not best_path.is_file():
            best = None
        elif index is None:
            header = _read_step_and_loss(best_path)
            best = header if header is not None and _improves(header[1], None) else None
        losses = {}
        for step, path in sorted(on_disk.items()):
            if step in recorded:
                losses[step] = recorded[step]
                continue
            header = _read_step_and_loss(path)
            losses[step] = None if header is None else header[1]
            # A save interrupted between best.pt and the index leaves best.pt holding a step the index lacks.
            if best_path.is_file() and _improves(losses[step], best):
                best = (step, losses[step])
        return losses, best

    def _read_index(self) -> tuple[dict[int, float | None], tuple[int, float] | None] | None:
        """The index's (losses by step, best), or None if it is missing or not a valid index."""
        try:
            index = json.loads((self.directory / INDEX_NAME).read_text(encoding="utf-8"))
            if index["format"] != INDEX_FORMAT or index["version"] != FORMAT_VERSION:
                return None
            losses = {}
            for entry in index["checkpoints"]:
                step, loss = entry["step"], entry["validation_loss"]
                if type(step) is not int or not (loss is None or type(loss) is float):
                    return None
                losses[step] = loss
            best = index["best"]
            if best is not None:
                best = (best["step"], best["validation_loss"])
                if type(best[0]) is not int or type(best[1]) is not float:
                    return None
            return losses, best
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_index(self, losses: dict[int, float | None], best: tuple[int, float] | None) -> None:
        index = {
            "format": INDEX_FORMAT,
            "version": FORMAT_VERSION,
            "checkpoints": [{"step": step, "path": f"step-{step:08d}.pt", "validation_loss": loss}
                            for step, loss in losses.items()],
            "best": None if best is None else {"step": best[0], "path": BEST_NAME, "validation_loss": best[1]},
        }
        text = json.dumps(index, indent=2) + "\n"
        _write_atomically(self.directory / INDEX_NAME, lambda file: file.write(text.encode("utf-8")))

    def _publish_best(self, source: Path) -> None:
        """Point best.pt at `source` atomically: a hard link costs no space and no copying."""
        target = self.directory / BEST_NAME
        temporary = _temporary_path(target)
        try:
            os.link(source, temporary)
        except OSError:  # filesystems without hard links (FAT, some network mounts) get a copy
            def copy(file: BinaryIO) -> None:
                with open(source, "rb") as original:
                    shutil.copyfileobj(original, file)
            _write_atomically(target, copy)
            return
        try:
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_directory(self.directory)

    def _remove_temporaries(self) -> None:
        """Delete temporary files of a writer that was killed mid-save (they can be as large as a checkpoint)."""
        for path in self.directory.iterdir():
            if _TEMPORARY_NAME.fullmatch(path.name):
                path.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by CheckpointManager.save fully into memory, tensors on `map_location`.

    Returns {"format", "version", "step", "validation_loss", "state"}. Raises CheckpointError, naming the file, if it
    is missing, truncated or corrupt (every record's CRC-32 is checked: torch.load alone does not notice flipped
    bytes in tensor data), not an lmrt checkpoint, or written by a newer lmrt."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from None
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, zlib.error) as error:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: not a readable zip archive ({error})"
                              ) from None
    if damaged is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: its record {damaged!r} fails its CRC-32 check")
    payload = _load_payload(path, map_location, mmap=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an lmrt checkpoint: it lacks the marker 'format': {FORMAT!r} (a file "
                              f"written by torch.save directly?)")
    version = payload.get("version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"checkpoint {path} has an invalid format version {version!r}; expected an integer "
                              f"from 1 to {FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, newer than the version "
                              f"{FORMAT_VERSION} this lmrt reads; upgrade lmrt to load it")
    step, loss = payload.get("step"), payload.get("validation_loss")
    if type(step) is not int or step < 0 or not (loss is None or type(loss) is float) or \
            not isinstance(payload.get("state"), dict):
        raise CheckpointError(f"checkpoint {path} is malformed: expected an integer step >= 0, a float or None "
                              f"validation loss and a state dict, got step {step!r}, validation loss {loss!r} and "
                              f"state of type {type(payload.get('state')).__name__}")
    return payload


def apply_model_state(model: nn.Module, state_dict: Mapping[str, Any], *, source: str | Path | None = None) -> None:
    """Load `state_dict` into `model` after checking that its keys, and every tensor's shape and dtype, match the
    model's own state_dict; on a mismatch raise CheckpointError naming the first differing key, with nothing
    copied. `source` (the checkpoint's path) names the checkpoint in the error."""
    where = "the checkpoint" if source is None else f"checkpoint {source}"
    name = type(model).__name__
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{where} holds a model state of type {type(state_dict).__name__}; expected a dict of "
                              f"tensors (a state_dict)")
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        problems = ([f"lacks {_first_few(missing)} that {name} has"] if missing else []) + \
                   ([f"has {_first_few(unexpected)} that {name} lacks"] if unexpected else [])
        raise CheckpointError(f"{where} does not fit {name}: it {' and '.join(problems)}")
    for key, tensor in expected.items():
        if not isinstance(tensor, Tensor):  # a module's extra state, which has no shape to compare
            continue
        saved = state_dict[key]
        if not isinstance(saved, Tensor) or saved.shape != tensor.shape or saved.dtype != tensor.dtype:
            raise CheckpointError(f"{where} does not fit {name}: `{key}` is {_describe(saved)} in the checkpoint but "
                                  f"{_describe(tensor)} in the model")
    model.load_state_dict(state_dict, strict=True)


def apply_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any], *,
                          source: str | Path | None = None) -> None:
    """Load `state_dict` into `optimizer` after checking that it has as many parameter groups, each with as many
    parameters, and that every per-parameter state tensor fits its parameter; on a mismatch raise CheckpointError,
    with nothing loaded. `source` (the checkpoint's path) names the checkpoint in the error."""
    where = "the checkpoint" if source is None else f"checkpoint {source}"
    name = type(optimizer).__name__
    if not (isinstance(state_dict, Mapping) and isinstance(state_dict.get("state"), Mapping)
            and isinstance(state_dict.get("param_groups"), list)):
        raise CheckpointError(f"{where} holds no {name} state: expected a dict with 'state' and 'param_groups', got "
                              f"{_describe(state_dict)}")
    groups, saved_groups = optimizer.param_groups, state_dict["param_groups"]
    if len(saved_groups) != len(groups):
        raise CheckpointError(f"{where} does not fit the {name}: it has {len(saved_groups)} parameter groups, the "
                              f"optimizer {len(groups)}")
    parameters = {}  # the saved state's parameter ids -> (group, position in group, parameter)
    for group_index, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        ids = saved.get("params") if isinstance(saved, Mapping) else None
        if not isinstance(ids, list) or len(ids) != len(group["params"]):
            count = len(ids) if isinstance(ids, list) else "no"
            raise CheckpointError(f"{where} does not fit the {name}: parameter group {group_index} has {count} "
                                  f"parameters in the checkpoint but {len(group['params'])} in the optimizer")
        parameters.update({pid: (group_index, position, parameter)
                           for position, (pid, parameter) in enumerate(zip(ids, group["params"], strict=True))})
    for pid, parameter_state in state_dict["state"].items():
        if pid not in parameters or not isinstance(parameter_state, Mapping):
            raise CheckpointError(f"{where} holds {name} state for parameter id {pid!r}, which no parameter group "
                                  f"lists or which is not a dict")
        group_index, position, parameter = parameters[pid]
        for key, value in parameter_state.items():
            # Elementwise optimizers keep tensors of the parameter's shape; factored ones (Adafactor's row and
            # column statistics) keep size 1 along some dimensions. Other ranks (scalars such as Adam's step)
            # carry no shape to check.
            if isinstance(value, Tensor) and value.dim() == parameter.dim() > 0 and not all(
                    size in (1, expected) for size, expected in zip(value.shape, parameter.shape, strict=True)):
                raise CheckpointError(f"{where} does not fit the {name}: state `{key}` of parameter {position} in "
                                      f"group {group_index} has shape {list(value.shape)} but the parameter has "
                                      f"shape {list(parameter.shape)}")
    optimizer.load_state_dict(state_dict)


def capture_rng_state() -> dict:
    """The state of every random number generator a training step draws from: Python's `random`, numpy's global
    RNG (when numpy is installed), torch's CPU generator and each CUDA device's, as weights_only-loadable values."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if numpy is not None:
        algorithm, keys, position, has_gauss, cached_gaussian = numpy.random.get_state()
        state["numpy"] = {"algorithm": str(algorithm), "keys": torch.from_numpy(keys.astype(numpy.int64)),
                          "position": int(position), "has_gauss": int(has_gauss),
                          "cached_gaussian": float(cached_gaussian)}
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generators saved by capture_rng_state; the state is checked whole before any generator is set.

    CUDA generators are restored for the devices both the saved run and this process have (continuing bitwise
    needs the same devices); a numpy state is skipped where numpy is not installed."""
    torch_state = state.get("torch") if isinstance(state, Mapping) else None
    if not isinstance(torch_state, Tensor) or torch_state.dtype != torch.uint8 or \
            torch_state.shape != torch.get_rng_state().shape:
        raise CheckpointError(f"restore_rng_state: `state['torch']` must be the uint8 tensor of "
                              f"torch.get_rng_state(), got {_describe(torch_state)}")
    python_state = state.get("python")
    if not (isinstance(python_state, tuple | list) and len(python_state) == 3):
        raise CheckpointError(f"restore_rng_state: `state['python']` must be random.getstate()'s (version, "
                              f"internal state, gauss_next), got {_describe(python_state)}")
    cuda_states = state.get("cuda")
    if not (isinstance(cuda_states, list) and all(isinstance(s, Tensor) and s.dtype == torch.uint8
                                                  for s in cuda_states)):
        raise CheckpointError(f"restore_rng_state: `state['cuda']` must be a list of uint8 tensors "
                              f"(torch.cuda.get_rng_state_all()), got {_describe(cuda_states)}")
    numpy_state = state.get("numpy") if numpy is not None else None
    if numpy_state is not None and not (isinstance(numpy_state, Mapping) and
                                        isinstance(numpy_state.get("keys"), Tensor) and
                                        numpy_state["keys"].shape == (624,)):
        raise CheckpointError(f"restore_rng_state: `state['numpy']` must hold the 624 `keys` of numpy's MT19937, "
                              f"got {_describe(numpy_state)}")

    version, internal, gauss_next = python_state
    random.setstate((version, tuple(internal), gauss_next))
    if numpy_state is not None:
        numpy.random.set_state((numpy_state["algorithm"], numpy_state["keys"].cpu().numpy().astype(numpy.uint32),
                                numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(torch_state.cpu())
    if cuda_states and torch.cuda.is_available():
        for device, cuda_state in enumerate(cuda_states[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


def _check_loadable(value: Any, where: str) -> None:
    """Raise TypeError naming the first thing under `where` that torch.load(weights_only=True) would refuse."""
    kind = type(value)
    if kind in _LOADABLE_SCALARS or kind in _LOADABLE_TENSORS:
        return
    if kind not in _LOADABLE_CONTAINERS:
        raise TypeError(f"CheckpointManager.save: `{where}` is a {kind.__module__}.{kind.__qualname__}, which "
                        f"torch.load(weights_only=True) refuses; store tensors, numbers, strings, None and "
                        f"dicts/lists/tuples of them (e.g. dataclasses.asdict(config), float(loss))")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_loadable(key, f"{where} key {key!r}")
            _check_loadable(item, f"{where}[{key!r}]")
    else:
        for position, item in enumerate(value):
            _check_loadable(item, f"{where}[{position}]")


def _save_with_crc32(payload: dict, file: BinaryIO) -> None:
    """torch.save with CRC-32s in the archive even if the process turned them off, as load_checkpoint checks them."""
    compute_crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)
    try:
        torch.save(payload, file)
    finally:
        torch.serialization.set_crc32_options(compute_crc32)


def _load_payload(path: Path, map_location: str | torch.device, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # torch's message is a page of advice; its "WeightsUnpickler error:" line names what was refused.
        lines = str(error).splitlines()
        cause = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
        raise CheckpointError(f"{path} is not an lmrt checkpoint: it holds objects torch.load(weights_only=True) "
                              f"refuses ({cause.strip()})") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {first_line}") from None


def _read_step_and_loss(path: Path) -> tuple[int, float | None] | None:
    """(step, validation loss) of the checkpoint at `path`, or None if unreadable. Memory-mapped, so that only the
    small pickled header is read, not the tensors."""
    try:
        payload = _load_payload(path, "cpu", mmap=True)
    except CheckpointError:
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return None
    step, loss = payload.get("step"), payload.get("validation_loss")
    return (step, loss) if type(step) is int and (loss is None or type(loss) is float) else None


def _scan_steps(directory: Path) -> dict[int, Path]:
    """The step files in `directory` by step."""
    if not directory.is_dir():
        return {}
    return {int(match.group(1)): path for path in directory.iterdir() if (match := _STEP_NAME.fullmatch(path.name))}


def _improves(loss: float | None, best: tuple[int, float] | None) -> bool:
    """Whether `loss` beats `best`; a missing or non-finite loss (a diverged run) never does."""
    return loss is not None and math.isfinite(loss) and (best is None or loss < best[1])


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def _write_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write` on a temporary file beside `path`, flush it to disk and rename it over `path`; on any failure
    remove the temporary file and leave `path` as it was."""
    temporary = _temporary_path(path)
    try:
        # open(), not tempfile.mkstemp: mkstemp's mode 0600 would hide checkpoints from other users' jobs.
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable across a power loss (POSIX; Windows cannot open a directory)."""
    if os.name == "nt":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _first_few(keys: list[str]) -> str:
    shown = ", ".join(f"`{key}`" for key in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} of shape {list(value.shape)}"
    return f"a {type(value).__name__}"
