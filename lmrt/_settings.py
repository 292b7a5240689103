"""Checks that the configuration dataclasses (GPTConfig, Seq2SeqConfig, LSTMConfig, TrainConfig) share: each
raises a ValueError that names the class, the setting, what it needs and what it got."""

from collections.abc import Sequence


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
