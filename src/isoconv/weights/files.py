"""Recognising and reading weight files: which format a path holds, safetensors with isoconv metadata, and the
key prefixes that wrappers (DataParallel, torch.compile) add."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..rundir import CHECKPOINT_NAME
from .meta import META_KEY, ModelMeta
from .model_folder import CONFIG_NAME, WEIGHTS_NAME, is_model_folder, read_folder_config

INSTALL_HINT = "pip install 'isoconv[export]'"


def model_format(path: Path) -> str:
    """One of run, folder (an exported model folder), checkpoint, safetensors, onnx, pt2 (a torch.export archive),
    torchscript."""
    if path.is_dir():
        if (path / CHECKPOINT_NAME).is_file():
            return "run"
        if is_model_folder(path):
            return "folder"
        raise UserError(f"{path} is a folder without {CHECKPOINT_NAME} (a run) or {CONFIG_NAME} and {WEIGHTS_NAME} "
                        f"(an exported model folder); pass a run directory, a model folder, a checkpoint or an "
                        f"exported model file")
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a run directory, a model folder, a checkpoint, or a "
                        f".safetensors, .onnx or TorchScript file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".onnx":
        return "onnx"
    names = zip_names(path)
    if any(n.endswith("/archive_format") for n in names) and any(n.endswith("/models/model.json") for n in names):
        return "pt2"  # torch.export.save's archive
    # TorchScript archives hold compiled code and constants; torch.save archives hold only data
    return "torchscript" if any(n.endswith("/constants.pkl") or "/code/" in n for n in names) else "checkpoint"


def zip_names(path: Path) -> list[str]:
    """The member names of a zip archive (torch.save, TorchScript and torch.export files are ones); [] otherwise."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def strip_wrapper_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Drop the prefixes DataParallel (module.) and torch.compile (_orig_mod.) put on every key."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors, ModelMeta or None when the file has no isoconv metadata)."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise UserError(f"reading {path} needs the safetensors package: {INSTALL_HINT}") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError and OSError subclasses
        raise UserError(f"cannot read {path} as safetensors ({str(e).splitlines()[0][:160]}); the file is "
                        f"truncated or not a safetensors file") from None
    meta = ModelMeta.from_json(metadata[META_KEY], str(path)) if META_KEY in metadata else None
    return tensors, meta


def read_model_folder(path: Path) -> tuple[dict[str, torch.Tensor], ModelMeta]:
    """(state dict, metadata) of a model folder: the weights from model.safetensors, the metadata from config.json."""
    config_path = path / CONFIG_NAME
    meta = ModelMeta.from_json(json.dumps(read_folder_config(path)[META_KEY]), str(config_path))
    state, _ = read_safetensors(path / WEIGHTS_NAME)
    return state, meta
