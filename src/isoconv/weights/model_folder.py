"""The self-contained model folder (`isoconv export --format folder`), in the Hugging Face Hub layout:

    config.json        the architecture (isoconv's stored config), the preprocessing, the class names, and the
                       facts the run measured (its summary.json, without machine paths)
    model.safetensors  the weights (with the same isoconv metadata inside, so the file also loads on its own)
    README.md          the model card

This module defines the names and reads config.json; `weights.files.read_model_folder` reads the whole folder and
`isoconv.interop.model_folder` writes it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from .meta import META_KEY

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
MODEL_TYPE = "isoconv"
SUMMARY_KEY = "training_summary"  # the run's summary.json (metrics, device, precision, data verdict)


def is_model_folder(path: Path) -> bool:
    """A folder holding config.json and model.safetensors (what the Hub layout needs to load a model)."""
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def read_folder_config(path: Path) -> dict[str, Any]:
    """config.json of a model folder, checked to be one isoconv wrote."""
    config_path = path / CONFIG_NAME
    try:
        doc = json.loads(config_path.read_text())
    except OSError as e:
        raise UserError(f"cannot read {config_path}: {e.strerror or e}") from None
    except ValueError:
        raise UserError(f"{config_path} is not valid JSON; export the model folder again with `isoconv export "
                        f"RUN --format folder`") from None
    if not isinstance(doc, dict) or doc.get("model_type") != MODEL_TYPE or not isinstance(doc.get(META_KEY), dict):
        raise UserError(f"{config_path} is not an isoconv model config (no \"model_type\": \"{MODEL_TYPE}\" with an "
                        f"\"{META_KEY}\" entry); export the model folder with `isoconv export RUN --format folder`")
    return doc


def folder_summary(path: Path) -> Optional[dict[str, Any]]:
    """The training summary a model folder carries (None for anything else)."""
    if not is_model_folder(path):
        return None
    try:
        doc = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    summary = doc.get(SUMMARY_KEY) if isinstance(doc, dict) else None
    return summary if isinstance(summary, dict) else None
