"""Seed-recipe augmentation options: per-sample (elem) Mixup/CutMix, pixel-mode erasing, vflip/rotate/zoom/shift."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from isoconv.augment import MixupCutmix, one_hot_smooth
from isoconv.augment.mix import mix_elem_apply


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- elem mixing

def test_elem_mode_each_sample_has_its_own_lam_and_choice():
    B, C = 64, 10
    x = torch.randn(B, 3, 16, 16, generator=gen(0))
    x_before = x.clone()
    y = torch.arange(B) % C
    mix = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, num_classes=C, mix_mode="elem")
    xm, t = mix(x, y, gen(1))
    assert torch.equal(x, x_before)
    lam, cut, boxes = mix.last_lams, mix.last_use_cutmix, mix.last_boxes
    assert mix.last_mode == "elem" and lam.shape == (B,) and len(torch.unique(lam)) > B // 2
    assert 0 < int(cut.sum()) < B  # both kinds in one batch
    xf = x.flip(0)
    for i in range(B):
        if lam[i] == 1.0:
            assert torch.equal(xm[i], x[i])
        elif cut[i]:
            y0, y1, x0, x1 = boxes[i].tolist()
            inside = torch.zeros(16, 16, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            assert torch.equal(xm[i][:, inside], xf[i][:, inside]) and torch.equal(xm[i][:, ~inside], x[i][:, ~inside])
            assert float(lam[i]) == pytest.approx(1 - inside.float().mean().item(), abs=1e-6)
        else:
            assert torch.allclose(xm[i], x[i] * lam[i] + xf[i] * (1 - lam[i]), atol=1e-6)
    # soft targets: rows sum to 1, own class gets lam_i, partner's class 1 - lam_i
    assert torch.allclose(t.sum(1), torch.ones(B), atol=1e-6)
    want = lam[:, None] * one_hot_smooth(y, C) + (1 - lam[:, None]) * one_hot_smooth(y.flip(0), C)
    assert torch.allclose(t, want, atol=1e-6)
    i = int((lam < 1).nonzero()[0])
    assert float(t[i, y[i]]) == pytest.approx(float(lam[i]), abs=1e-6)


def test_elem_mode_frequencies_and_smoothing():
    B = 4000
    x = torch.zeros(B, 3, 8, 8)
    y = torch.zeros(B, dtype=torch.long)
    mix = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.4, switch_prob=0.5, label_smoothing=0.1,
                      num_classes=10, mix_mode="elem")
    _, t = mix(x, y, gen(2))
    mixed = mix.last_lams < 1.0
    assert 0.36 < mixed.float().mean().item() < 0.44  # about 40% of *each* batch is mixed
    share = mix.last_use_cutmix[mixed].float().mean().item()
    assert 0.44 < share < 0.56
    assert torch.allclose(t[~mixed], one_hot_smooth(y[~mixed], 10, 0.1))  # unmixed samples still smoothed
    assert torch.allclose(t.sum(1), torch.ones(B), atol=1e-5)
    # reproducible from the generator; batch mode still draws one lam per batch
    _, t2 = mix(x, y, gen(2))
    assert torch.equal(t, t2)
    with pytest.raises(ValueError):
        MixupCutmix(mixup_alpha=1.0, mix_mode="pair")


def test_mix_elem_apply_matches_a_per_sample_loop():
    B = 7  # odd: the middle sample pairs with itself
    x = torch.randn(B, 3, 10, 10, generator=gen(3))
    lam = torch.tensor([1.0, 0.3, 0.7, 0.5, 0.64, 1.0, 0.2])
    cut = torch.tensor([False, False, True, True, True, True, False])
    boxes = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [2, 5, 1, 8], [0, 10, 0, 5], [3, 9, 3, 9], [1, 2, 1, 2],
                          [0, 0, 0, 0]])
    out = mix_elem_apply(x, lam, cut, boxes)
    ref = x.clone()
    for i in range(B):  # timm's _mix_elem
        j = B - 1 - i
        if lam[i] != 1.0:
            if cut[i]:
                y0, y1, x0, x1 = boxes[i].tolist()
                ref[i][:, y0:y1, x0:x1] = x[j][:, y0:y1, x0:x1]
            else:
                ref[i] = x[i] * lam[i] + x[j] * (1 - lam[i])
    assert torch.equal(out, ref)
