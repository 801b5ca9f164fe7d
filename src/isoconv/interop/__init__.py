"""Inference and interoperability: `isoconv.load`, `isoconv predict`, `isoconv export` and `--pretrained`."""
from .export import FORMATS, ExportResult, export_model, export_target
from .load import LoadedModel, OnnxModel, load
from .meta import ModelMeta
from .predict import PredictResult, Prediction, predict_files
from .preprocess import Preprocess, collect_image_paths
from .pretrained import PretrainedReport, load_pretrained_into

__all__ = [
    "FORMATS",
    "ExportResult",
    "LoadedModel",
    "ModelMeta",
    "OnnxModel",
    "PredictResult",
    "Prediction",
    "Preprocess",
    "PretrainedReport",
    "collect_image_paths",
    "export_model",
    "export_target",
    "load",
    "load_pretrained_into",
    "predict_files",
]
