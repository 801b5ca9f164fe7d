"""Classification metrics: top-k counts, confusion matrix, per-class and summary scores, text report.

Conventions follow scikit-learn: confusion-matrix rows are the true class and columns the
predicted class; undefined ratios (zero division) are reported as 0.0 (`zero_division=0`);
macro averages are taken over *all* classes of the matrix (like sklearn with
`labels=range(num_classes)`), weighted averages are weighted by support (true count).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

import torch
from torch import Tensor

__all__ = [
    "topk_correct",
    "confusion_matrix",
    "per_class_metrics",
    "summary_metrics",
    "classification_report",
]


def _check_targets(targets: Tensor, n: int, name: str = "targets") -> None:
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"{name} must be an integer tensor of class indices, got {targets.dtype}")


def topk_correct(logits: Tensor, targets: Tensor, ks: Iterable[int] = (1, 5)) -> Dict[int, int]:
    """Number of samples whose target is among the top-k scores, for each k in `ks`.

    k larger than the number of classes is clipped to it (so top-k is then always correct);
    the returned dict is keyed by the k that was asked for.

    Ties are broken deterministically by class index (lower index ranks first), which matches
    `logits.argmax(1)`; so `topk_correct(...)[1] == (logits.argmax(1) == targets).sum()`.
    A NaN score ranks below every number.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    n, c = logits.shape
    _check_targets(targets, n)
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {ks}")
    if n == 0:
        return {k: 0 for k in ks}
    if c == 0:
        raise ValueError("logits have zero classes")
    targets = targets.to(device=logits.device, dtype=torch.int64)
    if int(targets.min()) < 0 or int(targets.max()) >= c:
        raise ValueError(f"targets must lie in 0..{c - 1}, found {int(targets.min())}..{int(targets.max())}")
    scores = logits.detach()
    if scores.is_floating_point():
        scores = torch.nan_to_num(scores, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    target_score = scores.gather(1, targets[:, None])  # (N, 1)
    # Stable descending rank of the target: classes scoring strictly higher, plus tied classes
    # with a lower index. NaN targets became -inf; -inf ties rank by index like any other tie.
    higher = (scores > target_score).sum(1)
    idx = torch.arange(c, device=scores.device)
    tied_before = ((scores == target_score) & (idx[None, :] < targets[:, None])).sum(1)
    rank = higher + tied_before  # 0 = top-1
    return {k: int((rank < min(k, c)).sum()) for k in ks}


def confusion_matrix(preds: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """int64 (C, C) matrix; entry [i, j] counts samples of true class i predicted as class j.

    Returned on the device of `preds`.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if preds.dim() != 1:
        raise ValueError(f"preds must be class indices of shape (N,), got {tuple(preds.shape)}; "
                         f"take logits.argmax(1) first")
    _check_targets(preds, preds.shape[0], "preds")
    _check_targets(targets, preds.shape[0])
    preds = preds.to(torch.int64)
    targets = targets.to(device=preds.device, dtype=torch.int64)
    for name, t in (("preds", preds), ("targets", targets)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}, found {int(t.min())}..{int(t.max())}")
    flat = targets * num_classes + preds
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _check_cm(cm: Tensor) -> Tensor:
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got {tuple(cm.shape)}")
    return cm.detach().to("cpu", torch.float64)


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def per_class_metrics(cm: Tensor, class_names: Sequence[str]) -> List[dict]:
    """Per class: {"class", "index", "precision", "recall", "f1", "support"}.

    precision/recall/f1 are floats, 0.0 where undefined (sklearn `zero_division=0`); f1 is
    2*TP / (2*TP + FP + FN) as in sklearn. support (the true count) is an int.
    """
    m = _check_cm(cm)
    c = m.shape[0]
    if len(class_names) != c:
        raise ValueError(f"got {len(class_names)} class names for a {c}x{c} confusion matrix")
    tp = m.diagonal().tolist()
    true_count = m.sum(1).tolist()  # row sums: support
    pred_count = m.sum(0).tolist()  # column sums
    rows = []
    for i in range(c):
        fp = pred_count[i] - tp[i]
        fn = true_count[i] - tp[i]
        rows.append({
            "class": str(class_names[i]),
            "index": i,
            "precision": _div(tp[i], pred_count[i]),
            "recall": _div(tp[i], true_count[i]),
            "f1": _div(2 * tp[i], 2 * tp[i] + fp + fn),
            "support": int(round(true_count[i])),
        })
    return rows


def summary_metrics(cm: Tensor) -> dict:
    """accuracy, macro_precision/recall/f1 (over all C classes), weighted_precision/recall/f1, support."""
    m = _check_cm(cm)
    rows = per_class_metrics(cm, [str(i) for i in range(m.shape[0])])
    total = float(m.sum())
    c = len(rows)
    out = {"accuracy": _div(float(m.diagonal().sum()), total)}
    for key in ("precision", "recall", "f1"):
        out[f"macro_{key}"] = sum(r[key] for r in rows) / c
    for key in ("precision", "recall", "f1"):
        out[f"weighted_{key}"] = _div(sum(r[key] * r["support"] for r in rows), total)
    out["support"] = int(round(total))
    return out


def classification_report(cm: Tensor, class_names: Sequence[str], digits: int = 4) -> str:
    """Text report laid out like `sklearn.metrics.classification_report`."""
    rows = per_class_metrics(cm, class_names)
    s = summary_metrics(cm)
    headers = ["precision", "recall", "f1-score", "support"]
    width = max([len(r["class"]) for r in rows] + [len("weighted avg"), digits])
    head_fmt = "{:>{width}s} " + " {:>9}" * len(headers)
    row_fmt = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"
    report = head_fmt.format("", *headers, width=width) + "\n\n"
    for r in rows:
        report += row_fmt.format(r["class"], r["precision"], r["recall"], r["f1"], r["support"],
                                 width=width, digits=digits)
    report += "\n"
    acc_fmt = "{:>{width}s} " + " {:>9}" * 2 + " {:>9.{digits}f}" + " {:>9}\n"
    report += acc_fmt.format("accuracy", "", "", s["accuracy"], s["support"], width=width, digits=digits)
    for label, prefix in (("macro avg", "macro"), ("weighted avg", "weighted")):
        report += row_fmt.format(label, s[f"{prefix}_precision"], s[f"{prefix}_recall"], s[f"{prefix}_f1"],
                                 s["support"], width=width, digits=digits)
    return report
