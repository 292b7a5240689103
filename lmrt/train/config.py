"""TrainConfig: everything that defines a training run, in one dataclass.

It comes from defaults, a preset (lmrt.train.presets), a YAML or TOML file, and `key=value` overrides from the
command line, in that order; it is printed at the start of a run and saved in every checkpoint, so that a run can be
resumed and reproduced.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from lmrt._settings import field_types, require_at_least, require_one_of, require_types, types_of
from lmrt.backends import BACKENDS
from lmrt.data.tokenizer import MIN_BPE_VOCAB_SIZE

MODELS = ("gpt", "seq2seq", "lstm")
TOKENIZERS = ("byte", "bpe")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    """A training run. `model_options` are fields of the model's config (GPTConfig, Seq2SeqConfig, LSTMConfig)
    on top of the preset's; `data` is a text file, a folder of them or a pre-tokenized .bin file (None: the
    embedded default corpus). Steps count optimizer updates; one update sees batch_size * gradient_accumulation
    sequences."""

    model: str = "gpt"
    preset: str | None = None
    model_options: dict = field(default_factory=dict)
    data: str | None = None
    tokenizer: str = "byte"
    bpe_vocab_size: int = 4096
    validation_fraction: float = 0.05
    context_length: int = 256
    batch_size: int = 16
    gradient_accumulation: int = 1
    max_steps: int = 2000
    max_minutes: float | None = None
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0
    precision: str = "auto"
    compile: bool = False
    device: str = "auto"
    backend: str | None = None
    eval_interval: int = 200
    eval_batches: int = 20
    sample_interval: int = 500
    sample_tokens: int = 200
    sample_prompt: str = "\n"
    checkpoint_interval: int = 200
    keep_last: int = 3
    out_dir: str = "runs/default"
    tensorboard: bool = False
    seed: int = 1337

    def __post_init__(self):
        require_types(self)
        require_one_of(self, dict(model=MODELS, tokenizer=TOKENIZERS, precision=PRECISIONS))
        require_at_least(self, 1, ("context_length", "batch_size", "gradient_accumulation", "max_steps",
                                   "eval_interval", "eval_batches", "sample_interval", "checkpoint_interval",
                                   "sample_tokens", "keep_last"))
        require_at_least(self, 0, ("warmup_steps",))
        require_at_least(self, MIN_BPE_VOCAB_SIZE, ("bpe_vocab_size",))
        if self.model == "seq2seq" and self.context_length < 4:
            # The trainer splits a window into a source of half and a target of half less its end token.
            raise ValueError(f"TrainConfig: `context_length` must be >= 4 for model seq2seq (a source of half and a "
                             f"target of half, less its end token), got {self.context_length}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"TrainConfig: `backend` must be one of {', '.join(BACKENDS)} or None (each op's "
                             f"default), got {self.backend!r}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"TrainConfig: `validation_fraction` must be in (0, 1), got {self.validation_fraction}")
        if not self.learning_rate > 0.0:
            raise ValueError(f"TrainConfig: `learning_rate` must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(f"TrainConfig: need 0 <= min_learning_rate <= learning_rate, got "
                             f"{self.min_learning_rate} and {self.learning_rate}")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"TrainConfig: `weight_decay` must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TrainConfig: `{name}` must be in [0, 1), got {getattr(self, name)}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"TrainConfig: `grad_clip` must be > 0 or None, got {self.grad_clip}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"TrainConfig: `max_minutes` must be > 0 or None, got {self.max_minutes}")
        if not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"TrainConfig: `seed` must be in [-2**63, 2**64) (torch.manual_seed's range), got "
                             f"{self.seed}")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"TrainConfig: unknown setting {unknown[0]!r}; the settings are "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """A config from a .yaml/.yml or .toml file (read_settings); settings it leaves out keep their defaults."""
        return cls.from_dict(read_settings(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: list[str]) -> TrainConfig:
        """A copy with `key=value` overrides applied (as parse_overrides reads them)."""
        return TrainConfig.from_dict({**self.to_dict(), **parse_overrides(overrides)})

    def __str__(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(f"{f.name:<{width}}  {getattr(self, f.name)!r}" for f in dataclasses.fields(self))


def parse_overrides(overrides: list[str]) -> dict:
    """The settings that `key=value` overrides give, later ones over earlier; a value is parsed as the setting's type
    (`none` for an optional one, JSON for model_options, e.g. model_options={"n_layer":2})."""
    settings = {}
    types = field_types(TrainConfig)
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise ValueError(f"override {override!r} must be key=value with a TrainConfig setting as key")
        settings[key] = _parse(key, text.strip(), types[key])
    return settings


def settings_over(base: dict, settings: dict) -> dict:
    """`settings` over `base` (a preset's, a saved run's): base's where settings give none, and model_options added
    key by key."""
    merged = {**base, **settings}
    options = settings.get("model_options")
    if isinstance(options, dict):  # anything else, TrainConfig refuses with its own message
        merged["model_options"] = {**base.get("model_options", {}), **options}
    return merged


def read_settings(path: str | Path) -> dict:
    """The settings in a YAML or TOML file, with a clear error for a missing, unreadable or malformed one. A string
    given for a setting of another type is read as `--set` reads it (YAML takes 3e-4 for a string, say)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ImportError(f"reading {path} needs Python 3.11 or later (tomllib); or use a .yaml file") from None
        parse = tomllib.loads
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError(f"reading {path} needs PyYAML (pip install pyyaml); or use a .toml file") from None
        parse = yaml.safe_load
    else:
        raise ValueError(f"config file {path} must end in .yaml, .yml or .toml")
    try:
        settings = parse(path.read_text(encoding="utf-8"))
    except Exception as error:  # the parsers' own errors (TOMLDecodeError, YAMLError) and UnicodeDecodeError
        raise ValueError(f"config file {path} is malformed: {error}") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(settings).__name__}")
    types = field_types(TrainConfig)
    return {key: _parse(key, value, types[key], f"config file {path}:")
            if isinstance(value, str) and key in types and str not in types_of(types[key]) else value
            for key, value in settings.items()}


def _parse(key: str, text: str, annotation, where: str = "override"):
    optional = type(None) in typing.get_args(annotation)
    base = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return text.lower() in ("true", "1", "yes")
        if base is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object")
            return value
        return base(text)
    except ValueError as error:
        raise ValueError(f"{where} {key}={text!r}: {error}") from None
