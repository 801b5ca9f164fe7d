"""Batch sources for training: the device-resident fast path and the conventional DataLoader baseline.

Both yield (normalized float images, int64 labels) on the training device.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .dataset import ImageDataset


def batch_slices(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batch boundaries over n items; a trailing batch of one is dropped (BatchNorm cannot train on it)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds.pop()
    return bounds


class DeviceLoader:
    """uint8 data already on the device; batches by permutation; augmentation as batched tensor ops.

    All randomness (order and augmentation) comes from `generator`: an epoch is `epoch_order()` (one
    permutation) followed by `batches(order)`, so the generator state plus the order and the step index
    are enough to resume exactly, even mid-epoch.
    """

    def __init__(self, ds: ImageDataset, batch_size: int, augment: Callable, generator: torch.Generator):
        self.ds, self.augment, self.generator = ds, augment, generator
        self.slices = batch_slices(len(ds), batch_size)

    def __len__(self) -> int:
        return len(self.slices)

    def epoch_order(self) -> torch.Tensor:
        return torch.randperm(len(self.ds), generator=self.generator, device=self.ds.images.device)

    def batches(self, order: torch.Tensor, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from step `start` on."""
        order = order.to(self.ds.images.device)
        for s, e in self.slices[start:]:
            idx = order[s:e]
            yield self.augment(self.ds.images[idx], self.generator), self.ds.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(self.epoch_order())


def _sample_seed(epoch_seed: int, position: int) -> int:
    return (epoch_seed * 1_000_003 + position) % (2**63 - 1)


class _TransformedImages(Dataset):
    """Items are (epoch_seed, position, index): each image's augmentation is seeded by its place in the
    epoch, so results do not depend on the number of workers and an epoch can be resumed mid-way."""

    def __init__(self, ds: ImageDataset, transform: Callable):
        self.images, self.labels, self.transform = ds.images.cpu(), ds.labels.cpu(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        epoch_seed, position, i = key
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone when workers=0
            torch.manual_seed(_sample_seed(epoch_seed, position))
            return self.transform(self.images[i]), self.labels[i]


class _EpochSampler(Sampler):
    """Yields (epoch_seed, position, index) for the positions start.. of the epoch's permutation."""

    def __init__(self, n: int):
        self.n, self.seed, self.start = n, 0, 0

    def __len__(self) -> int:
        return self.n - self.start

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))
        for pos in range(self.start, self.n):
            yield self.seed, pos, int(perm[pos])


class TorchvisionLoader:
    """The conventional path: a DataLoader with per-image torchvision transforms in worker processes."""

    def __init__(self, ds: ImageDataset, batch_size: int, transform: Callable, generator: torch.Generator,
                 device: torch.device, workers: int = 2):
        self.device = device
        self.batch_size = batch_size
        self.n_batches = len(batch_slices(len(ds), batch_size))
        self.order_generator = generator  # one draw per epoch seeds the shuffle and the augmentation
        self.sampler = _EpochSampler(len(ds))
        self.loader = DataLoader(_TransformedImages(ds, transform), batch_size=batch_size, sampler=self.sampler,
                                 num_workers=workers, drop_last=len(ds) % batch_size == 1,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    def __len__(self) -> int:
        return self.n_batches

    def epoch_order(self) -> int:
        gen = self.order_generator
        return int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())

    def batches(self, order: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.seed, self.sampler.start = int(order), start * self.batch_size
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(self.epoch_order())
