"""What travels with a model's weights: its training config and the data meta inference needs.

The same JSON document is stored under the key ``isoconv`` in every exported format (safetensors metadata,
ONNX ``metadata_props``, a TorchScript extra file), so any exported file is self-contained.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..config import TrainConfig, apply_overrides
from ..errors import UserError
from ..models import build_model

META_KEY = "isoconv"
FORMAT_VERSION = 1
DATA_KEYS = ("classes", "mean", "std", "image_size")


@dataclass(frozen=True)
class ModelMeta:
    """A model's TrainConfig (as a dict) and data meta: classes, mean, std, image_size, dataset."""

    config: dict[str, Any]
    data: dict[str, Any]
    params: Optional[int] = None
    epoch: Optional[int] = None

    @property
    def classes(self) -> list[str]:
        return list(self.data["classes"])

    @property
    def image_size(self) -> int:
        return int(self.data["image_size"])

    def train_config(self, source: str) -> TrainConfig:
        return apply_overrides(TrainConfig(), self.config, source)

    def build_model(self, source: str) -> torch.nn.Module:
        """The architecture with fresh weights, on the current default device."""
        return build_model(self.train_config(source), len(self.classes), self.image_size)

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, "config": self.config, "data": self.data,
                           "params": self.params, "epoch": self.epoch})

    @classmethod
    def from_json(cls, text: str, source: str) -> "ModelMeta":
        try:
            doc = json.loads(text)
        except (TypeError, ValueError):
            raise UserError(f"{source}: the stored isoconv metadata is not valid JSON; re-export the model "
                            f"with `isoconv export`") from None
        if not isinstance(doc, dict):
            raise UserError(f"{source}: the stored isoconv metadata is not a JSON object; re-export the model")
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"{source}: isoconv metadata format {version!r} is not supported (this isoconv reads "
                            f"{FORMAT_VERSION}); export it again with this version")
        return cls.from_parts(doc.get("config"), doc.get("data"), source, doc.get("params"), doc.get("epoch"))

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], source: str) -> "ModelMeta":
        if "data" not in state:
            raise UserError(f"checkpoint {source} has no stored data meta (classes, mean/std, image size): it was "
                            f"written by an older isoconv; train it again or evaluate it with `isoconv eval`")
        return cls.from_parts(state["config"], state["data"], source, state.get("params"), state.get("epoch"))

    @classmethod
    def from_parts(cls, config: Any, data: Any, source: str, params=None, epoch=None) -> "ModelMeta":
        if not isinstance(config, dict) or not isinstance(data, dict) or any(k not in data for k in DATA_KEYS):
            raise UserError(f"{source}: incomplete isoconv metadata (needs a config and data "
                            f"{', '.join(DATA_KEYS)}); re-export the model with `isoconv export`")
        meta = cls(dict(config), dict(data), params, epoch)
        meta.train_config(source)  # unknown settings fail here, naming the file
        return meta
