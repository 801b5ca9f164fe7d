"""Fixed-seed index splits and per-channel normalization statistics.

The seeds are constants, independent of `--seed`, so changing the training seed never changes
which images are held out or evaluated; the random order is a hash order, so it is also the same
under every torch and numpy version.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from typing import Tuple

import numpy as np
import torch

from ..config import TEST_SPLIT_CHOICES
from ..errors import ConfigError
from .dataset import ImageDataset

HALF_SPLIT_SEED = 0  # --test-split half: the same 5,000 CIFAR-10 test images in every run
HOLDOUT_SEED = 0  # --val-split: the same held-out images in every run

# The ConvMixer-XL study's test half, stored so it never depends on torch's randperm: its train.py runs
# torch.manual_seed(1204) at import and then `valset, testset = random_split(testvalset, [5000, 5000])` with
# no torch random number drawn in between, so the test half is torch.randperm(10000)[5000:] (in that order).
XL_HALF_FILE = "xl_test_half.txt"  # one index per line, in random_split's order
XL_HALF_SHA256 = "0494510873c235a55c7ffe92eb2e87b59a14036299c3c6a6760921b7a6201046"
XL_HALF_SEED = 1204
XL_TEST_SIZE = 10_000

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


def xl_half_indices() -> torch.Tensor:
    """The 5,000 CIFAR-10 test indices the ConvMixer-XL study tested on (int64, in random_split's order).

    Read from the packaged index file, whose sha256 is checked, so the split is the same under every torch version.
    """
    data = resources.files(__package__).joinpath(XL_HALF_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != XL_HALF_SHA256:
        raise RuntimeError(f"{XL_HALF_FILE} is corrupt: sha256 {digest}, expected {XL_HALF_SHA256}; reinstall isoconv")
    return torch.tensor([int(line) for line in data.decode("ascii").split()], dtype=torch.int64)


def xl_half_from_torch(seed: int = XL_HALF_SEED, n: int = XL_TEST_SIZE) -> torch.Tensor:
    """Recompute the XL test half as the study did (global seed, then random_split into halves) with the installed
    torch; restores the global RNG state afterwards.  Only for checking the stored file."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        _, test = torch.utils.data.random_split(range(n), [n // 2, n - n // 2])
        return torch.tensor(list(test.indices), dtype=torch.int64)
    finally:
        torch.random.set_rng_state(state)


def select_test_split(ds: ImageDataset, split: str) -> ImageDataset:
    """The evaluated part of a test set: `full`, `half` (a fixed hash-ordered half of any test set) or `xl-half`
    (the exact 5,000 CIFAR-10 test images of the ConvMixer-XL study; needs the 10,000-image CIFAR-10 test set)."""
    if split == "full":
        return ds
    if split == "half":
        return seeded_half(ds)
    if split == "xl-half":
        if len(ds) != XL_TEST_SIZE:
            raise ConfigError(f"--test-split xl-half selects from the 10,000-image CIFAR-10 test set, but this test "
                              f"set has {len(ds):,} images; use --test-split half for other datasets")
        return ds.select(xl_half_indices())
    raise ConfigError(f"unknown test split {split!r}; choose from {', '.join(TEST_SPLIT_CHOICES)}")


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
    CPU), from which the mean and variance follow in float64. A constant channel (grey images stored as RGB, a
    one-colour background) has no spread to normalise by: its std is reported as 1, so it normalises to 0.
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
    return tuple(float(m) / 255 for m in mean), tuple(float(v) ** 0.5 / 255 if v > 0 else 1.0 for v in var)
