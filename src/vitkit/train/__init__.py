"""Training: `Recipe` (every knob), `train()` (the one loop), objectives that plug into it, and
checkpoints that resume bit for bit."""

from vitkit.train.objectives import OBJECTIVES, Objective, build_objective
from vitkit.train.recipe import PRETRAIN_DEFAULTS, Recipe
from vitkit.train.trainer import TrainingDiverged, TrainResult, train

__all__ = [
    "OBJECTIVES",
    "PRETRAIN_DEFAULTS",
    "Objective",
    "Recipe",
    "TrainResult",
    "TrainingDiverged",
    "build_objective",
    "train",
]
