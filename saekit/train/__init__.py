"""Architecture-agnostic SAE training: loop, schedules, dead-latent tracking, checkpoints, logging."""

from saekit.train.config import TrainConfig
from saekit.train.dead import DeadLatentTracker
from saekit.train.geometric_median import geometric_median
from saekit.train.schedules import lr_factor, sparsity_scale
from saekit.train.trainer import Trainer

__all__ = [
    "DeadLatentTracker",
    "TrainConfig",
    "Trainer",
    "geometric_median",
    "lr_factor",
    "sparsity_scale",
]
