"""Training: the run configuration, presets, checkpoints and the trainer that `lmrt train` drives."""

from lmrt.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    apply_model_state,
    apply_optimizer_state,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from lmrt.train.config import TrainConfig
from lmrt.train.trainer import NonFiniteLossError, Trainer, TrainResult

__all__ = ["CheckpointError", "CheckpointManager", "apply_model_state", "apply_optimizer_state", "capture_rng_state",
           "load_checkpoint", "restore_rng_state", "NonFiniteLossError", "TrainConfig", "TrainResult", "Trainer"]
