"""Training: the run configuration and checkpoints (the trainer and its metrics come next)."""

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

__all__ = ["CheckpointError", "CheckpointManager", "apply_model_state", "apply_optimizer_state", "capture_rng_state",
           "load_checkpoint", "restore_rng_state", "TrainConfig"]
