"""Training: `Recipe` (every knob), `train()` (the loop), checkpoints that resume bit for bit."""

from vitkit.train.recipe import Recipe
from vitkit.train.trainer import TrainingDiverged, TrainResult, build_model, evaluate_model, train

__all__ = ["Recipe", "TrainResult", "TrainingDiverged", "build_model", "evaluate_model", "train"]
