"""`isoconv predict`: top-k classes for image files, from a run or any exported model file."""
from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from ..data.images import BadImageError
from ..errors import UserError
from ..eval.evaluate import predict_logits
from ..eval.run import eval_precision
from ..runtime import resolve_device
from ..weights.files import model_format
from ..zoo import resolve_model_path
from .load import preprocess_for, read_model
from .preprocess import Preprocess, collect_image_paths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    file: str
    classes: list[str]  # best first
    indices: list[int]
    probabilities: list[float]


@dataclass(frozen=True)
class ReadyModel:
    """A model ready to predict as `isoconv predict` does: its preprocessing, device and precision."""

    model: torch.nn.Module
    preprocess: Preprocess
    device: torch.device
    precision: str

    def probabilities(self, images: torch.Tensor, tta_flip: bool = False) -> torch.Tensor:
        """Softmax probabilities (on the CPU) for a uint8 (B, 3, S, S) batch made by `preprocess.image_to_uint8`."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*padding='same' with even kernel")  # a note on speed only
            logits = predict_logits(self.model, images, self.preprocess.mean, self.preprocess.std, device=self.device,
                                    precision=self.precision, tta_flip=tta_flip)
        return logits.softmax(1).cpu()


def ready_model(target: Union[str, Path], device: str = "auto") -> ReadyModel:
    """Load a run, model folder, exported file or zoo model for prediction (the precision as in predict_precision)."""
    dev = resolve_device(device)
    path = resolve_model_path(target)  # a zoo name: its checked file
    model, meta = read_model(path, dev)
    return ReadyModel(model, preprocess_for(meta), dev, predict_precision(model, meta.config.get("amp", "off"), dev,
                                                                           path))


@dataclass
class PredictResult:
    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file or input, reason)


def predict_files(target: Union[str, Path], inputs: Iterable[Union[str, Path]], *, top_k: int = 5,
                  batch_size: int = 64, tta_flip: bool = False, device: str = "auto",
                  warn: Optional[Callable[[str], None]] = None) -> PredictResult:
    """Predict every image that `inputs` (files, folders, glob patterns) name; unreadable ones are skipped.

    Each skipped file or input is passed to `warn` as it happens (default: logged as a warning).
    """
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    warn = warn or log.warning
    inputs = list(inputs)
    paths, problems = collect_image_paths(inputs)
    result = PredictResult()
    for item, reason in problems:
        result.skipped.append((item, reason))
        warn(f"skipped {item}: {reason}")
    if not paths:
        raise UserError(f"no image files found in {', '.join(map(str, inputs))}; pass image files, folders or glob "
                        f"patterns")
    ready = ready_model(target, device)
    for start in range(0, len(paths), batch_size):
        images, names = decode_batch(paths[start:start + batch_size], ready.preprocess, result, warn)
        if names:
            probs = ready.probabilities(torch.stack(images), tta_flip=tta_flip)
            result.predictions.extend(top_predictions(names, probs, ready.preprocess.classes, top_k))
    return result


def predict_precision(model: torch.nn.Module, amp: str, device: torch.device, target: Path) -> str:
    """Exported graphs run as exported (fp32); a run folder, or weights inside one, in the precision `isoconv eval`
    would use (for `--amp auto`, the one the run trained in)."""
    if model_format(target) in ("onnx", "pt2", "torchscript"):
        return "fp32"
    return eval_precision(amp, device, target if target.is_dir() else target.parent)


def decode_batch(paths: Sequence[Path], preprocess: Preprocess, result: PredictResult,
                 warn: Callable[[str], None]) -> tuple[list[torch.Tensor], list[str]]:
    images, names = [], []
    for path in paths:
        try:
            images.append(preprocess.image_to_uint8(path))
            names.append(str(path))
        except BadImageError as e:
            reason = str(e).replace(" (or pass --skip-bad-images)", "")
            result.skipped.append((str(path), reason))
            warn(f"skipped {path}: {reason}")
    return images, names


def top_predictions(names: Sequence[str], probs: torch.Tensor, classes: Sequence[str],
                    top_k: int) -> list[Prediction]:
    values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [Prediction(name, [classes[i] for i in idx.tolist()], idx.tolist(), vals.tolist())
            for name, vals, idx in zip(names, values, indices)]


# ----------------------------------------------------------------------------- output formats

def format_table(result: PredictResult) -> str:
    if not result.predictions:
        return ""
    k = max(len(p.classes) for p in result.predictions)
    rows = [["file"] + [f"top-{i + 1}" for i in range(k)]]
    for p in result.predictions:
        rows.append([p.file] + [f"{c} {v:.3f}" for c, v in zip(p.classes, p.probabilities)])
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(k + 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def format_json(result: PredictResult) -> str:
    doc = {"predictions": [{"file": p.file, "top": [{"class": c, "index": i, "probability": v}
                                                    for c, i, v in zip(p.classes, p.indices, p.probabilities)]}
                           for p in result.predictions],
           "skipped": [{"file": f, "reason": r} for f, r in result.skipped]}
    return json.dumps(doc, indent=2)


def format_csv(result: PredictResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "rank", "class", "index", "probability"])
    for p in result.predictions:
        for rank, (c, i, v) in enumerate(zip(p.classes, p.indices, p.probabilities), start=1):
            writer.writerow([p.file, rank, c, i, f"{v:.6g}"])
    return buf.getvalue().rstrip("\n")
