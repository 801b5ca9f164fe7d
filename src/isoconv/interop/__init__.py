"""Inference and export: `isoconv.load`, `isoconv predict` and `isoconv export` (weight files: isoconv.weights)."""
from .export import FORMATS, ExportResult, export_model, export_target
from .load import LoadedModel, OnnxModel, load
from .predict import PredictResult, Prediction, predict_files
from .preprocess import Preprocess, collect_image_paths
from ..weights.pretrained import load_pretrained_into  # isoconv.interop.load_pretrained_into, as the README says

__all__ = [
    "FORMATS",
    "ExportResult",
    "LoadedModel",
    "OnnxModel",
    "PredictResult",
    "Prediction",
    "Preprocess",
    "collect_image_paths",
    "export_model",
    "export_target",
    "load",
    "load_pretrained_into",
    "predict_files",
]
