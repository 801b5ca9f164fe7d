"""Evaluate a finished run directory, a model folder (`isoconv export --format folder`) or a checkpoint file on its
dataset's test split."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..config import TrainConfig, apply_overrides
from ..data import load_data, resolve_data_root
from ..data.provenance import verify_data
from ..errors import UserError
from ..models import build_model
from ..rundir import CHECKPOINT_NAME, RunDir
from ..runtime import PRECISIONS, resolve_device, resolve_precision
from ..weights import load_checkpoint
from ..weights.checkpoint import CorruptCheckpointError, previous_path
from ..weights.files import model_format, read_model_folder
from ..weights.meta import preprocessing_of
from ..weights.model_folder import folder_summary, is_model_folder
from .evaluate import evaluate, test_report


def checkpoint_path(target: Path) -> Path:
    if target.is_dir():
        return RunDir(target).checkpoint
    if target.is_file():
        kind = model_format(target)
        if kind in ("onnx", "torchscript", "safetensors"):
            raise UserError(f"{target} is an exported {kind} model; `isoconv eval` takes a run folder or its "
                            f"checkpoint (.pt): evaluate the run it was exported from, or run the export on images "
                            f"with `isoconv predict {target} IMAGES`")
        return target
    raise UserError(f"{target} is neither a run directory nor a checkpoint file")


def read_weights(target: Path) -> tuple[Path, dict[str, Any]]:
    """(the file the weights came from, a checkpoint-like dict: model, config, data, epoch, params)."""
    if is_model_folder(target) and not RunDir(target).checkpoint.is_file():
        state, meta = read_model_folder(target)
        return target, {"model": state, "config": meta.config, "data": meta.data, "epoch": meta.epoch,
                        "params": meta.params}
    path = checkpoint_path(target)
    return path, load_run_checkpoint(path)


def load_run_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint to evaluate; when a run's last.pt is corrupt and its previous one is whole, say so and name
    it (evaluating other weights than asked for is not done silently)."""
    try:
        return load_checkpoint(path)
    except CorruptCheckpointError as e:
        previous = previous_path(path)
        if path.name != CHECKPOINT_NAME or not previous.is_file():
            raise
        try:
            epoch = load_checkpoint(previous).get("epoch")
        except UserError:
            raise e from None
        raise UserError(f"{e}; the previous checkpoint {previous} (epoch {epoch}) is whole: evaluate it with "
                        f"`isoconv eval {previous}`") from None


def evaluate_target(target: Path, *, data_dir: Optional[str] = None, download: bool = True,
                    test_subset: Optional[int] = None, tta: Optional[str] = None,
                    device: str = "auto", dataset: Optional[str] = None) -> dict[str, Any]:
    """The test report of a run's weights: the keys of summary.json plus `report_text`.

    dataset: evaluate on this dataset's whole test split instead of the run's own (same classes required)."""
    path, state = read_weights(target)
    folder = path if path.is_dir() else path.parent  # where the run's (or the model folder's) summary is
    stored = dict(state["config"])
    cfg = apply_overrides(TrainConfig(), stored, f"checkpoint {path}")
    cfg = apply_overrides(cfg, {"device": device, "download": download, "test_subset": test_subset,
                                "train_subset": None,
                                **({"dataset": dataset, "test_split": "full"}
                                   if dataset and dataset != stored.get("dataset") else {}),
                                **({"data_dir": data_dir} if data_dir else {})}, "eval flags").validate()
    dev = resolve_device(cfg.device)
    precision = eval_precision(cfg.amp, dev, folder)
    meta = state.get("data") or {}
    pre = preprocessing_of(stored, meta) if meta.get("mean") and meta.get("std") else None  # the training's
    if pre is not None:
        cfg = apply_overrides(cfg, {"pad_to": pre.pad_to}, f"checkpoint {path}")
    _, test = load_data(cfg, dev, train=False, norm=(pre.mean, pre.std) if pre else None)  # prepared as in training
    if pre is not None and test.image_size != pre.input_size:
        raise UserError(f"{path} was trained on {pre.input_size}x{pre.input_size} inputs but its {cfg.dataset} test "
                        f"data makes {test.image_size}x{test.image_size}; pass --data-dir pointing to the data it "
                        f"was trained on")
    if meta.get("classes") and list(meta["classes"]) != list(test.classes):
        raise UserError(f"{path} was trained on {len(meta['classes'])} classes ({', '.join(meta['classes'][:3])}, "
                        f"...) but the {cfg.dataset} test data has {test.num_classes} "
                        f"({', '.join(test.classes[:3])}, ...); pass --data-dir pointing to the data it was "
                        f"trained on")
    model = build_model(cfg, test.num_classes, test.image_size).to(dev)
    model.load_state_dict(state["model"])
    result = evaluate(model, test, device=dev, precision=precision, channels_last=cfg.channels_last,
                      tta_flip=tta == "flip")
    fields, report = test_report(result, test.classes)
    return {"run_dir": str(folder), "checkpoint": str(path), "model": cfg.model, "recipe": cfg.recipe,
            "dataset": cfg.dataset, "epochs": state["epoch"], "params": state.get("params"),
            "train_seconds": state.get("train_seconds"), "device": str(dev), "amp": precision,
            "torch": torch.__version__, "tta": tta, **training_facts(folder),
            "data_provenance": verify_data(cfg.dataset, resolve_data_root(cfg.data_dir)), "test_split": cfg.test_split,
            "test_subset": cfg.test_subset, "test_images_total": test.split_images, **fields, "report_text": report}


def eval_precision(amp: str, device: torch.device, run_dir: Path) -> str:
    """The precision to evaluate in. `--amp auto` means the one the run trained (and reported its test accuracy) in,
    per its summary, when it trained on the same kind of device: on a CPU auto is decided by a measurement at
    training time, which the rule in runtime.resolve_precision does not repeat. Otherwise that rule."""
    if amp == "auto":
        summary = run_summary(run_dir)
        summary = summary if isinstance(summary, dict) else {}
        trained, trained_on = summary.get("amp"), str(summary.get("device", ""))
        if trained in PRECISIONS and trained_on.split(":")[0] == device.type and (trained != "fp16" or
                                                                                  device.type == "cuda"):
            return trained
    return resolve_precision(amp, device)


def run_summary(folder: Path) -> Optional[dict[str, Any]]:
    """A run's summary.json, or the training summary a model folder carries (None when there is neither)."""
    summary = RunDir(folder).read_summary()
    return summary if summary is not None else folder_summary(folder)


def training_facts(run_dir: Path) -> dict[str, Any]:
    """What the run's own summary says about training (None when the run has no summary)."""
    summary = run_summary(run_dir)
    summary = summary if isinstance(summary, dict) else {}
    return {k: summary.get(k) for k in ("compile_seconds", "skipped_steps", "scheduled_evals")}
