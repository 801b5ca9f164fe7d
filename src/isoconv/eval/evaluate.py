"""The one inference path: logits for uint8 images (training's evaluation, `isoconv eval`, `isoconv predict`),
and the test metrics and report made from them."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..augment import normalize
from ..runtime import autocast
from .metrics import classification_report, confusion_matrix, per_class_metrics, summary_metrics, topk_correct

EVAL_BATCH = 500


@torch.no_grad()
def predict_logits(model, images: torch.Tensor, mean: Sequence[float], std: Sequence[float], *,
                   device: torch.device, precision: str = "fp32", channels_last: bool = False,
                   batch_size: int = EVAL_BATCH, tta_flip: bool = False) -> torch.Tensor:
    """Float32 logits (with tta_flip, the log of the mean of the plain and mirrored softmax) for uint8 images,
    in eval mode and the given precision."""
    model.eval()
    outs = []
    for s in range(0, len(images), batch_size):
        x = normalize(images[s:s + batch_size].to(device), mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x).float()
            if tta_flip:
                probs = (logits.softmax(1) + model(x.flip(3)).float().softmax(1)) / 2
                logits = probs.clamp_min(1e-12).log()
        outs.append(logits)
    if not outs:
        return torch.empty((0, 0), device=device)
    return torch.cat(outs)


def score(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Loss, top-1 and top-5 of logits against labels, plus the predictions for the report."""
    labels = labels.to(logits.device)
    correct = topk_correct(logits, labels, ks=(1, 5))
    n = len(labels)
    return {"test_loss": F.cross_entropy(logits, labels).item(), "test_top1": correct[1] / n,
            "test_top5": correct[5] / n, "preds": logits.argmax(1).cpu(), "labels": labels.cpu()}


def evaluate(model, ds, *, device: torch.device, precision: str, channels_last: bool,
             tta_flip: bool = False) -> dict[str, Any]:
    """Test metrics of `model` on a dataset (uint8 images, labels, mean/std) in one process."""
    logits = predict_logits(model, ds.images, ds.mean, ds.std, device=device, precision=precision,
                            channels_last=channels_last, tta_flip=tta_flip)
    return score(logits, ds.labels)


def test_report(result: dict, classes: list[str]) -> tuple[dict[str, Any], str]:
    """The summary.json fields for a test result, and the human-readable classification report."""
    cm = confusion_matrix(result["preds"], result["labels"], len(classes))
    fields = {"test_top1": result["test_top1"], "test_top5": result["test_top5"], "test_loss": result["test_loss"],
              "test_images": len(result["labels"]), "classes": classes,
              **{k: v for k, v in summary_metrics(cm).items() if k not in ("accuracy", "support")},
              "per_class": per_class_metrics(cm, classes), "confusion_matrix": cm.tolist()}
    return fields, classification_report(cm, classes)
