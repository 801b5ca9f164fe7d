"""Batch sources for training: the device-resident fast path and the conventional DataLoader baseline.

Both yield (normalized float images, int64 labels) on the training device. Under torchrun (world_size > 1) the
device loader still yields whole global batches (the training loop slices them after Mixup/CutMix), while the
torchvision loader yields only this process's slice of each global batch (see `shard_bounds`).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .dataset import ImageDataset


def batch_slices(n: int, batch_size: int, world_size: int = 1) -> list[tuple[int, int]]:
    """Batch boundaries over n items; a trailing batch of one is dropped (BatchNorm cannot train on it), and with
    several processes so is a trailing batch too small to give each of them an image."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < max(2, world_size):
        bounds.pop()
    return bounds


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Process `rank`'s contiguous part [lo, hi) of n items: equal parts, or the first n % world_size one larger."""
    size, extra = divmod(n, world_size)
    lo = rank * size + min(rank, extra)
    return lo, lo + size + (rank < extra)


class DeviceLoader:
    """uint8 data already on the device; batches by permutation; augmentation as batched tensor ops.

    All randomness (order and augmentation) comes from `generator`: an epoch is `epoch_order()` (one
    permutation) followed by `batches(order)`, so the generator state plus the order and the step index
    are enough to resume exactly, even mid-epoch.
    """

    def __init__(self, ds: ImageDataset, batch_size: int, augment: Callable, generator: torch.Generator,
                 world_size: int = 1):
        self.ds, self.augment, self.generator = ds, augment, generator
        self.slices = batch_slices(len(ds), batch_size, world_size)
        self.yields_global_batches = True

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


class _EpochBatches(Sampler):
    """A batch sampler: for every batch from `start` on, the (epoch_seed, position, index) keys of this process's
    share of it (the whole batch in a single process) in the epoch's permutation."""

    def __init__(self, n: int, slices: list[tuple[int, int]], rank: int = 0, world_size: int = 1):
        self.n, self.slices, self.rank, self.world_size = n, slices, rank, world_size
        self.seed, self.start = 0, 0

    def __len__(self) -> int:
        return len(self.slices) - self.start

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))
        for s, e in self.slices[self.start:]:
            lo, hi = shard_bounds(e - s, self.world_size, self.rank)
            yield [(self.seed, pos, int(perm[pos])) for pos in range(s + lo, s + hi)]


class TorchvisionLoader:
    """The conventional path: a DataLoader with per-image torchvision transforms in worker processes."""

    def __init__(self, ds: ImageDataset, batch_size: int, transform: Callable, generator: torch.Generator,
                 device: torch.device, workers: int = 2, rank: int = 0, world_size: int = 1):
        self.device = device
        self.slices = batch_slices(len(ds), batch_size, world_size)
        self.yields_global_batches = world_size == 1
        self.order_generator = generator  # one draw per epoch seeds the shuffle and the augmentation
        self.sampler = _EpochBatches(len(ds), self.slices, rank, world_size)
        self.loader = DataLoader(_TransformedImages(ds, transform), batch_sampler=self.sampler, num_workers=workers,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    def __len__(self) -> int:
        return len(self.slices)

    def epoch_order(self) -> int:
        gen = self.order_generator
        return int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())

    def batches(self, order: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.seed, self.sampler.start = int(order), start
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(self.epoch_order())
