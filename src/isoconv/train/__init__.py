from .checkpoint import load_checkpoint, save_checkpoint
from .loop import evaluate, resolve_amp, resolve_device, train
from .schedule import lr_at, onecycle_knots

__all__ = ["train", "evaluate", "resolve_device", "resolve_amp", "lr_at", "onecycle_knots",
           "load_checkpoint", "save_checkpoint"]
