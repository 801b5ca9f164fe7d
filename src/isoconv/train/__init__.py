"""Training: the loop (`train`), its setup, the bound step, schedules, signals and torchrun support."""
from .loop import train
from .schedule import lr_at, onecycle_knots

__all__ = ["train", "lr_at", "onecycle_knots"]
