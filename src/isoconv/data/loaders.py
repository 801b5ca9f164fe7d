"""Batch sources for training: the device-resident fast path and the conventional DataLoader baseline.

Both yield (normalized float images, int64 labels) on the training device.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .dataset import ImageDataset


def batch_slices(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batch boundaries over n items; a trailing batch of one is dropped (BatchNorm cannot train on it)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds.pop()
    return bounds


class DeviceLoader:
    """uint8 data already on the device; batches by permutation; augmentation as batched tensor ops.

    All randomness (order and augmentation) comes from `generator`, so saving its state at an epoch
    boundary is enough to resume exactly.
    """

    def __init__(self, ds: ImageDataset, batch_size: int, augment: Callable, generator: torch.Generator):
        self.ds, self.augment, self.generator = ds, augment, generator
        self.slices = batch_slices(len(ds), batch_size)

    def __len__(self) -> int:
        return len(self.slices)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(self.ds), generator=self.generator, device=self.ds.images.device)
        for s, e in self.slices:
            idx = perm[s:e]
            yield self.augment(self.ds.images[idx], self.generator), self.ds.labels[idx]


class _TransformedImages(Dataset):
    def __init__(self, ds: ImageDataset, transform: Callable):
        self.images, self.labels, self.transform = ds.images.cpu(), ds.labels.cpu(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


class TorchvisionLoader:
    """The conventional path: a DataLoader with per-image torchvision transforms in worker processes."""

    def __init__(self, ds: ImageDataset, batch_size: int, transform: Callable, generator: torch.Generator,
                 device: torch.device, workers: int = 2):
        self.device = device
        drop_last = len(ds) % batch_size == 1
        self.order_generator = generator  # one draw per epoch seeds the shuffle, so resuming restores the order
        self.loader = DataLoader(_TransformedImages(ds, transform), batch_size=batch_size, shuffle=True,
                                 num_workers=workers, drop_last=drop_last, pin_memory=device.type == "cuda",
                                 persistent_workers=workers > 0,
                                 generator=torch.Generator())

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = self.order_generator
        seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
        self.loader.generator.manual_seed(seed)
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
