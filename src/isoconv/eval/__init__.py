"""Evaluation metrics."""
from .metrics import (
    classification_report,
    confusion_matrix,
    per_class_metrics,
    summary_metrics,
    topk_correct,
)

__all__ = [
    "classification_report",
    "confusion_matrix",
    "per_class_metrics",
    "summary_metrics",
    "topk_correct",
]
