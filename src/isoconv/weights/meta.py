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
PREPROCESS_KEY = "preprocess"  # data[PREPROCESS_KEY]: Preprocessing.to_dict(); derived from the config when absent
# the side images of a dataset are decoded at without --image-size (a padded run's size before padding)
DECODED_SIZES = {"cifar10": 32, "cifar100": 32, "tiny-imagenet": 64}


@dataclass(frozen=True)
class Preprocessing:
    """How training prepared an image for the model; the one description that `isoconv eval`, `isoconv.load`,
    `isoconv predict` and every export's metadata follow. An image is decoded to RGB, resized to `image_size`
    (bicubic; skipped when it already has that size), zero-padded centred to `pad_to` (None: no padding), scaled to
    [0, 1] and normalized with `mean`/`std` (0 and 1: no normalization)."""

    image_size: int
    pad_to: Optional[int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_size(self) -> int:
        """The side of the model's input."""
        return self.pad_to or self.image_size

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "pad_to": self.pad_to, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, doc: Any, source: str) -> "Preprocessing":
        try:
            pre = cls(int(doc["image_size"]), None if doc["pad_to"] is None else int(doc["pad_to"]),
                      tuple(float(v) for v in doc["mean"]), tuple(float(v) for v in doc["std"]))
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{source}: the stored preprocessing {doc!r} is incomplete (needs image_size, pad_to, "
                            f"mean, std); re-export the model with `isoconv export`") from None
        if len(pre.mean) != 3 or len(pre.std) != 3 or pre.image_size < 1 or pre.input_size < pre.image_size:
            raise UserError(f"{source}: the stored preprocessing {doc!r} is not valid; re-export the model")
        return pre


def preprocessing_of(config: dict[str, Any], data: dict[str, Any]) -> Preprocessing:
    """The training preprocessing stored in a checkpoint's data meta; for checkpoints written before it was stored,
    derived from their config (`pad_to`, `image_size`, the dataset's decoded size) and data meta (mean, std)."""
    if data.get(PREPROCESS_KEY) is not None:
        return Preprocessing.from_dict(data[PREPROCESS_KEY], "the checkpoint")
    size, pad_to = int(data["image_size"]), config.get("pad_to")
    if pad_to:  # data["image_size"] is the padded size
        size = config.get("image_size") or DECODED_SIZES.get(config.get("dataset", "cifar10"), size)
    return Preprocessing(int(size), int(pad_to) if pad_to else None, tuple(data["mean"]), tuple(data["std"]))


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

    @property
    def preprocessing(self) -> Preprocessing:
        return preprocessing_of(self.config, self.data)

    def train_config(self, source: str) -> TrainConfig:
        return apply_overrides(TrainConfig(), self.config, source)

    def build_model(self, source: str) -> torch.nn.Module:
        """The architecture with fresh weights, on the current default device."""
        return build_model(self.train_config(source), len(self.classes), self.image_size)

    def to_json(self) -> str:
        data = {**self.data, PREPROCESS_KEY: self.preprocessing.to_dict()}  # derived for an older checkpoint
        return json.dumps({"format_version": FORMAT_VERSION, "config": self.config, "data": data,
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
        if data.get(PREPROCESS_KEY) is not None:
            pre = Preprocessing.from_dict(data[PREPROCESS_KEY], source)
            if pre.input_size != meta.image_size:
                raise UserError(f"{source}: the stored preprocessing makes {pre.input_size}x{pre.input_size} "
                                f"inputs but the model takes {meta.image_size}; re-export the model")
        return meta
