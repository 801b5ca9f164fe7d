"""Every weight-file concern in one place, below training and inference: isoconv checkpoints, the metadata that
travels with weights, safetensors and format detection, and foreign layouts for `--pretrained`."""
from .checkpoint import CorruptCheckpointError, load_checkpoint, load_latest_checkpoint, save_checkpoint
from .meta import ModelMeta
from .pretrained import PretrainedReport, load_pretrained_into

__all__ = ["CorruptCheckpointError", "ModelMeta", "PretrainedReport", "load_checkpoint", "load_latest_checkpoint",
           "load_pretrained_into", "save_checkpoint"]
