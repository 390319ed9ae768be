"""Training circuit breakers: `train()` runs a whole recipe; the pieces are the Trainer (`trainer`), its base
with atomic checkpoints and signal stops (`base`), the RR + LAT adversaries (`adversary`), the callbacks
(`callbacks`) and the step's small utilities (`utils`)."""

from .adversary import LatentAdversary, LatSettings
from .base import BaseTrainer, CheckpointError, TrainingInterrupted
from .callbacks import StallCheck, StepEnd, TrainingDiverged
from .run import TrainResult, setup_model, train
from .trainer import LAT_SUFFIX_FILE, LAYER_WEIGHTS_FILE, CircuitBreakerTrainer, resolve_retain_layers
from .utils import EpochLengthGroupedSampler, chunk_rows, insert_slots

__all__ = [
    "LAT_SUFFIX_FILE",
    "LAYER_WEIGHTS_FILE",
    "BaseTrainer",
    "CheckpointError",
    "CircuitBreakerTrainer",
    "EpochLengthGroupedSampler",
    "LatSettings",
    "LatentAdversary",
    "StallCheck",
    "StepEnd",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "chunk_rows",
    "insert_slots",
    "resolve_retain_layers",
    "setup_model",
    "train",
]
