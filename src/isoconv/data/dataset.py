"""In-memory image dataset: the whole split as one uint8 tensor plus labels."""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple, Union

import torch

from ..errors import ConfigError, UserError


def zero_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images (..., H, W) zero-padded to (..., size, size), centred (the extra row/column of an odd difference at
    the bottom/right), as torchvision's CenterCrop pads when the crop is larger than the image."""
    h, w = images.shape[-2:]
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(images, (left, size - w - left, top, size - h - top))


@dataclass(eq=False)  # tensors have no single truth value; compare fields explicitly
class ImageDataset:
    """A whole split held in memory.

    `images` is uint8 (N, 3, H, W) and contiguous; `labels` is int64 (N,).
    `mean`/`std` are per-channel normalization stats on the [0, 1] scale.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: List[str]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    name: str
    split: str
    skipped: Tuple[str, ...] = ()  # unreadable image files left out (--skip-bad-images)
    split_images: Optional[int] = None  # images in the whole split before a half or subset was taken (reports)
    unpadded_size: Optional[int] = None  # the side of the images before `zero_padded` (None: not padded)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"{self.name}/{self.split}: images must be uint8 (N, 3, H, W), "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"{self.name}/{self.split}: labels must be int64 (N,), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"{self.name}/{self.split}: {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )
        if not self.images.is_contiguous():
            self.images = self.images.contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def zero_padded(self, size: int) -> "ImageDataset":
        """Every image zero-padded to size x size, centred (torchvision CenterCrop's padding when the crop is larger
        than the image)."""
        h, w = self.images.shape[-2:]
        if size < max(h, w):
            raise ConfigError(f"--pad-to {size} is smaller than the {h}x{w} images of {self.name}; pass at least "
                              f"{max(h, w)} (or --image-size to resize)")
        return replace(self, images=zero_pad(self.images, size), unpadded_size=self.unpadded_size or int(h))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[2])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def subset(self, n: Optional[int]) -> "ImageDataset":
        """The first `n` images (deterministic); `None` returns self."""
        if n is None:
            return self
        try:
            k = None if isinstance(n, bool) else operator.index(n)  # int or numpy integer
        except TypeError:
            k = None
        if k is None or k < 1:
            raise UserError(
                f"{self.name} {self.split} subset size {n!r} is invalid; pass a positive whole number "
                f"(at most {len(self)})"
            )
        n = int(k)
        if n > len(self):
            raise UserError(
                f"{self.name} {self.split} subset of {n} images requested but only {len(self)} are "
                f"available; pass a number <= {len(self)} or leave it unset to use them all"
            )
        if n == len(self):
            return self
        return replace(self, images=self.images[:n].contiguous(), labels=self.labels[:n].contiguous())

    def select(self, indices: torch.Tensor) -> "ImageDataset":
        """The images at `indices` (a 1-D integer tensor), in that order."""
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        return replace(self, images=self.images[idx].contiguous(), labels=self.labels[idx.to(self.labels.device)])

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "ImageDataset":
        device = torch.device(device)
        if self.images.device == device and self.labels.device == device:
            return self
        return replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
        )

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={tuple(self.images.shape[1:])}, classes={self.num_classes}, device={self.device})"
        )
