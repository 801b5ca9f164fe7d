"""Fixed-seed index splits and per-channel normalization statistics.

The seeds are constants, independent of `--seed`, so changing the training seed never changes
which images are held out or evaluated; the random order is a hash order, so it is also the same
under every torch and numpy version.
"""
from __future__ import annotations

import hashlib
from typing import Tuple

import numpy as np
import torch

from ..errors import ConfigError
from .dataset import ImageDataset

HALF_SPLIT_SEED = 0  # --test-split half: the same 5,000 CIFAR-10 test images in every run
HOLDOUT_SEED = 0  # --val-split: the same held-out images in every run

Stats = Tuple[Tuple[float, float, float], Tuple[float, float, float]]


def _permutation(n: int, seed: int) -> torch.Tensor:
    """0..n-1 ordered by sha256 of "seed:index": the same on every platform and torch/numpy version."""
    keys = [hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8] for i in range(n)]
    return torch.tensor(sorted(range(n), key=keys.__getitem__), dtype=torch.int64)


def half_split_indices(n: int, seed: int = HALF_SPLIT_SEED) -> torch.Tensor:
    """n // 2 distinct indices drawn at random with a fixed seed, in increasing order."""
    return _permutation(n, seed)[: n // 2].sort().values


def seeded_half(ds: ImageDataset, seed: int = HALF_SPLIT_SEED) -> ImageDataset:
    """A fixed random half of a split (`--test-split half`), like the ConvMixer-XL study's 5,000-image test half."""
    return ds.select(half_split_indices(len(ds), seed))


def holdout_indices(n: int, fraction: float, seed: int = HOLDOUT_SEED) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kept, held-out) indices, each increasing: round(n * fraction) images held out at random, fixed seed."""
    k = int(round(n * fraction))
    if k < 1 or k >= n:
        raise ConfigError(f"--val-split {fraction} of {n} images holds out {k}; at least one image must land in "
                          f"each part: pass a fraction between {1 / n:.3g} and {1 - 1 / n:.3g}")
    perm = _permutation(n, seed)
    return perm[k:].sort().values, perm[:k].sort().values


def channel_stats(images: torch.Tensor) -> Stats:
    """Per-channel mean and (population) std of uint8 (N, 3, H, W) images on the [0, 1] scale.

    Exact: a per-channel histogram of the 256 values (numpy's bincount, the fastest exact reduction on a
    CPU), from which the mean and variance follow in float64.
    """
    if images.shape[0] == 0:
        raise ValueError("channel_stats of an empty image tensor")
    arr = images.cpu().numpy()
    hist = np.zeros((3, 256), dtype=np.int64)
    chunk = max(1, (1 << 22) // arr[0, 0].size)  # about 4M values of one channel at a time
    for s in range(0, arr.shape[0], chunk):
        for c in range(3):
            hist[c] += np.bincount(arr[s:s + chunk, c].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64)
    count = hist.sum(axis=1).astype(np.float64)
    mean = (hist * values).sum(axis=1) / count
    var = (hist * (values - mean[:, None]) ** 2).sum(axis=1) / count
    return tuple(float(m) / 255 for m in mean), tuple(float(v) ** 0.5 / 255 for v in var)
