"""Sampled frequencies of every random choice, over many draws, against the reference implementations.

The batched pipeline draws its random numbers differently from torchvision/timm (one generator, whole
batches), so only the distributions can match: each test draws thousands of choices from both sides with
fixed seeds and compares the frequencies with a two-sample test at about 4.5 standard errors (chi-square
at p ~ 1e-4 for many cells). The draws are seeded, so a pass or fail is reproducible.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2 as T

from isoconv.augment import BatchAugment, MixupCutmix
from isoconv.augment.batched import RA_OPS, RA_SIGNED, random_translate

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
ALL_OFF = dict(scale=1.0, hflip=False, ra_n=0, jitter=0.0, reprob=0.0)
Z = 4.5  # standard errors allowed between two sampled frequencies


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_same_rate(k1: int, n1: int, k2: int, n2: int) -> None:
    """Two binomial samples are consistent with one success probability (two-proportion z-test)."""
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    assert abs(k1 / n1 - k2 / n2) <= Z * se, (k1, n1, k2, n2)


def assert_rate(k: int, n: int, p: float) -> None:
    assert abs(k / n - p) <= Z * math.sqrt(p * (1 - p) / n), (k, n, p)


def two_sample_chi2(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square statistic for "two count vectors come from one distribution" (cells empty in both dropped)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    ka, kb = math.sqrt(b.sum() / a.sum()), math.sqrt(a.sum() / b.sum())
    return float((((ka * a - kb * b) ** 2) / (a + b)).sum())


# ----------------------------------------------------------------------------- RandAugment

def torchvision_ra_draws(num_ops: int, magnitude: int, calls: int) -> list[tuple[str, bool]]:
    """(op, negative) of every op torchvision's RandAugment applies, recorded instead of applied."""
    ra = T.RandAugment(num_ops=num_ops, magnitude=magnitude)
    draws = []

    def record(image, op, mag, **_):
        draws.append((op, mag < 0))
        return image

    ra._apply_image_or_video_transform = record  # private hook; the sampling stays torchvision's own
    torch.manual_seed(0)
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    for _ in range(calls):
        ra(img)
    return draws


def test_randaugment_op_and_sign_frequencies_match_torchvision():
    outcomes = [(op, neg) for op, signed in zip(RA_OPS, RA_SIGNED) for neg in ((False, True) if signed else (False,))]
    tv = torchvision_ra_draws(num_ops=2, magnitude=9, calls=3000)
    assert len(tv) == 6000
    tv_counts = np.array([tv.count(o) for o in outcomes])

    aug = BatchAugment(image_size=8, mean=MEAN, std=STD, **dict(ALL_OFF, ra_n=2, ra_m=9))
    x = torch.randint(0, 256, (6000, 3, 8, 8), dtype=torch.uint8, generator=gen(1))
    aug(x, gen(2))
    ops, neg = aug.last_params["ra_ops"], aug.last_params["ra_negative"]
    assert ops.shape == (6000, 2)
    ours = [(RA_OPS[int(o)], bool(n) and RA_SIGNED[int(o)]) for o, n in zip(ops.flatten(), neg.flatten())]
    our_counts = np.array([ours.count(o) for o in outcomes])

    assert tv_counts.sum() == 6000 and our_counts.sum() == 12000  # every draw is one of the 23 outcomes
    assert two_sample_chi2(our_counts, tv_counts) < 50.0  # 22 degrees of freedom; p ~ 1e-4
    # ... and both as specified: each op 1/14, a signed op's sign a fair coin
    expected = np.array([1 / 28 if RA_SIGNED[RA_OPS.index(op)] else 1 / 14 for op, _ in outcomes])
    assert expected.sum() == pytest.approx(1.0)
    for counts, n in ((our_counts, 12000), (tv_counts, 6000)):
        assert ((counts - n * expected) ** 2 / (n * expected)).sum() < 50.0
    # the two rounds of one image are independent draws: the same op twice with probability 1/14
    assert_rate(int((ops[:, 0] == ops[:, 1]).sum()), 6000, 1 / 14)


# ----------------------------------------------------------------------------- flip

def test_flip_frequency_matches_torchvision():
    ramp = torch.arange(48, dtype=torch.uint8).view(1, 3, 4, 4)
    assert not torch.equal(ramp, ramp.flip(-1))  # a flip is visible
    n = 20000
    aug = BatchAugment(image_size=4, mean=MEAN, std=STD, **dict(ALL_OFF, hflip=True))
    out = aug(ramp.expand(n, 3, 4, 4).contiguous(), gen(3))
    mirrored = BatchAugment(image_size=4, mean=MEAN, std=STD, **ALL_OFF)(ramp.flip(-1), gen(0))
    ours = int((out == mirrored).all(dim=3).all(dim=2).all(dim=1).sum())
    assert ours == int(aug.last_params["flip"].sum())  # the recorded choice is the applied one

    torch.manual_seed(0)
    flip = T.RandomHorizontalFlip(p=0.5)
    tv = sum(bool(torch.equal(flip(ramp[0]), ramp[0].flip(-1))) for _ in range(4000))
    assert_same_rate(ours, n, tv, 4000)
    assert_rate(ours, n, 0.5)


# ----------------------------------------------------------------------------- random erasing

@pytest.mark.parametrize("p", [0.25, 0.2])
def test_erasing_frequency_matches_torchvision(p):
    n = 8000
    white = torch.full((n, 3, 16, 16), 255, dtype=torch.uint8)  # normalizes to 2.0: an erased pixel is the only 0
    aug = BatchAugment(image_size=16, mean=MEAN, std=STD, **dict(ALL_OFF, reprob=p))
    out = aug(white, gen(4))
    ours = int((out == 0).flatten(1).any(1).sum())
    assert ours == int(aug.last_params["erase"][4].sum())

    torch.manual_seed(1)
    erasing = T.RandomErasing(p=p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)
    ones = torch.ones(3, 16, 16)
    tv = sum(bool((erasing(ones) == 0).any()) for _ in range(4000))
    assert_same_rate(ours, n, tv, 4000)
    assert_rate(ours, n, p)


# ----------------------------------------------------------------------------- translation

def test_translation_offsets_are_uniform_per_image():
    pad, n = 2, 20000
    _, dy, dx = random_translate(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), pad, gen(5))
    for offsets in (dy, dx):
        counts = torch.bincount(offsets, minlength=2 * pad + 1).double()
        assert len(counts) == 2 * pad + 1  # offsets stay in [0, 2 * pad], like torchvision's RandomCrop
        expected = n / (2 * pad + 1)
        assert float(((counts - expected) ** 2 / expected).sum()) < 23.5  # 4 degrees of freedom; p ~ 1e-4
    assert_rate(int((dy == dx).sum()), n, 1 / (2 * pad + 1))  # independent axes


# ----------------------------------------------------------------------------- Mixup / CutMix

def timm_mix_draws(calls: int, **kw) -> list[tuple[str, float]]:
    """(mode, lam) of timm's own per-batch sampling (its private `_params_per_batch`)."""
    from timm.data import Mixup

    mixer = Mixup(mode="batch", num_classes=10, **kw)
    np.random.seed(0)
    draws = []
    for _ in range(calls):
        lam, use_cutmix = mixer._params_per_batch()
        draws.append(("cutmix" if use_cutmix else ("mixup" if lam != 1.0 else None), float(lam)))
    return draws


@pytest.mark.parametrize("prob, switch_prob", [(0.6, 0.3), (1.0, 0.5)])
def test_mix_and_switch_frequencies_and_mixup_lambda_match_timm(prob, switch_prob):
    kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=prob, switch_prob=switch_prob)
    n = 3000
    mix = MixupCutmix(**kw, num_classes=10)
    x, y, g = torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), gen(6)
    ours = []
    for _ in range(n):
        mix(x, y, g)
        ours.append((mix.last_mode, mix.last_lam))
    theirs = timm_mix_draws(n, mixup_alpha=0.8, cutmix_alpha=1.0, prob=prob, switch_prob=switch_prob)

    our_mixed = sum(m is not None for m, _ in ours)
    their_mixed = sum(m is not None for m, _ in theirs)
    if prob < 1:
        assert_rate(our_mixed, n, prob)
        assert_same_rate(our_mixed, n, their_mixed, n)
    else:
        assert our_mixed == their_mixed == n
    our_cut = sum(m == "cutmix" for m, _ in ours)
    their_cut = sum(m == "cutmix" for m, _ in theirs)
    assert_same_rate(our_cut, our_mixed, their_cut, their_mixed)
    assert_rate(our_cut, our_mixed, switch_prob)
    # Mixup's lam ~ Beta(0.8, 0.8): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 0.0962
    our_lam = np.array([lam for m, lam in ours if m == "mixup"])
    their_lam = np.array([lam for m, lam in theirs if m == "mixup"])
    se = math.sqrt(0.0962 / len(our_lam) + 0.0962 / len(their_lam))
    assert abs(our_lam.mean() - their_lam.mean()) <= Z * se
    assert abs(our_lam.var() - 0.0962) < 0.012 and abs(their_lam.var() - 0.0962) < 0.012
    assert ((0 < our_lam) & (our_lam < 1)).all()
