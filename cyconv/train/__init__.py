"""Training: the loop (Trainer), its state in checkpoints, the run folder, LR schedules,
metrics and a signal guard."""
from cyconv.train.loop import Trainer, TrainingDiverged
from cyconv.train.metrics import (
           confusion_matrix,
           evaluate,
           format_confusion,
           metrics_from_confusion,
)
from cyconv.train.run_folder import HISTORY_FIELDS, RunFolder, plot_confusion, plot_curves
from cyconv.train.schedules import LRSchedule
from cyconv.train.signals import SignalGuard

__all__ = ["Trainer", "TrainingDiverged", "confusion_matrix", "evaluate", "format_confusion",
           "metrics_from_confusion", "HISTORY_FIELDS", "RunFolder", "plot_confusion",
           "plot_curves", "LRSchedule", "SignalGuard"]
