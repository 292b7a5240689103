"""Checks that the configuration dataclasses (GPTConfig, Seq2SeqConfig, LSTMConfig, TrainConfig) share: each
raises a ValueError that names the class, the setting, what it needs and what it got. And `is_integer`, which the
argument checks elsewhere share."""

import functools
import math
import numbers
import typing
from collections.abc import Sequence


def is_integer(value) -> bool:
    """Whether `value` is an integer (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@functools.cache
def field_types(config_class: type) -> dict[str, type]:
    """A config dataclass's fields and their annotations, evaluated (the modules' annotations are strings)."""
    return typing.get_type_hints(config_class)


def types_of(annotation) -> tuple[type, ...]:
    """The types an annotation allows: (int,) for int, (float, NoneType) for float | None."""
    return typing.get_args(annotation) or (annotation,)


def require_types(config) -> None:
    """Each field of the type its annotation names (an int for a float too, never a bool for a number; no NaN or
    infinity, which the range checks would let by: a run with learning rate inf ended "done" with NaN weights), so
    that a value read from a file or a --set fails here, naming the field, rather than as a traceback mid-run or,
    for a bool given as the string "false", silently as true."""
    for name, annotation in field_types(type(config)).items():
        value, allowed = getattr(config, name), types_of(annotation)
        if isinstance(value, bool):
            ok = bool in allowed
        elif isinstance(value, int):
            ok = int in allowed or float in allowed
        elif isinstance(value, float) and float in allowed and not math.isfinite(value):
            raise ValueError(f"{type(config).__name__}: `{name}` must be a finite number, got {value!r}")
        else:
            ok = isinstance(value, tuple(t for t in allowed if t is not bool))
        if not ok:
            need = " or ".join("None" if t is type(None) else "an integer" if t is int else "a number" if t is float
                               else "true or false" if t is bool else "a mapping" if t is dict else "a string"
                               for t in allowed)
            raise ValueError(f"{type(config).__name__}: `{name}` must be {need}, got {value!r}")


def require_at_least(config, minimum: int, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            raise ValueError(f"{type(config).__name__}: `{name}` must be >= {minimum}, got {value}")


def require_one_of(config, choices: dict[str, Sequence[str]]) -> None:
    for name, allowed in choices.items():
        value = getattr(config, name)
        if value not in allowed:
            raise ValueError(f"{type(config).__name__}: `{name}` must be one of {', '.join(allowed)}, got {value!r}")


def require_dropout(config) -> None:
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"{type(config).__name__}: `dropout` must be in [0, 1), got {config.dropout}")
