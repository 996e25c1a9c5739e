"""Training engine: device/seed helpers, atomic safetensors checkpoints, the epoch loop."""

from landmark3d.engine.checkpoint import (
    FORMAT_VERSION,
    checkpoint_exists,
    load_checkpoint,
    load_weights_only,
    read_checkpoint_meta,
    save_checkpoint,
)
from landmark3d.engine.device import (
    amp_enabled,
    autocast,
    seed_everything,
    select_device,
    set_num_threads,
)
from landmark3d.engine.trainer import (
    Stage,
    TrainerConfig,
    TrainingInterrupted,
    TrainResult,
    fit,
)

__all__ = [
    "FORMAT_VERSION",
    "Stage",
    "TrainResult",
    "TrainerConfig",
    "TrainingInterrupted",
    "amp_enabled",
    "autocast",
    "checkpoint_exists",
    "fit",
    "load_checkpoint",
    "load_weights_only",
    "read_checkpoint_meta",
    "save_checkpoint",
    "seed_everything",
    "select_device",
    "set_num_threads",
]
