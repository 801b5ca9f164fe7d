"""Mixup / CutMix with soft targets (timm ``Mixup`` semantics, ``mode="batch"`` or ``mode="elem"``).

``mix_mode="batch"``: one mixing decision and one ``lam`` per batch.  ``mix_mode="elem"`` (what
simple-convnext uses): every sample gets its own apply-or-not decision (probability ``prob``), its
own mixup-or-cutmix choice and its own ``lam`` (and CutMix box), as timm's ``_params_per_elem`` /
``_mix_elem``.  In both modes the partner of sample ``i`` is sample ``B-1-i``
(``x.flip(0)``), so odd batch sizes work (the middle sample pairs with itself).

Randomness: each call draws one 63-bit seed from the passed ``torch.Generator`` and takes every
other random number (apply?, mixup-vs-cutmix, ``lam ~ Beta(alpha, alpha)``, the CutMix box
centre; per sample in elem mode) from ``numpy.random.default_rng(seed)``.  The result is therefore a deterministic
function of the generator state (reproducible and resumable with it), and ``lam`` is a host-side
float as in timm.  Calls with mixing disabled (both alphas 0) draw nothing.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["MIX_MODES", "one_hot_smooth", "MixupCutmix", "MixThenErase", "mix_elem_apply"]

MIX_MODES = ("batch", "elem")


def one_hot_smooth(targets: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """``(B,)`` class indices -> ``(B, num_classes)`` float32 soft targets (timm convention):
    off value ``smoothing / C``, on value ``1 - smoothing + smoothing / C``; rows sum to 1."""
    if targets.ndim != 1:
        raise ValueError(f"targets must be a 1-D tensor of class indices, got shape {tuple(targets.shape)}")
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    out = torch.full((targets.shape[0], num_classes), off, dtype=torch.float32, device=targets.device)
    return out.scatter_(1, targets.long().view(-1, 1), on)


class MixupCutmix:
    """Mixup / CutMix on a whole batch, returning ``(mixed x, soft targets (B, C))``.

    With probability ``prob`` a batch is mixed, otherwise returned unchanged with label-smoothed
    one-hot targets.  If both alphas are > 0, CutMix is chosen with probability ``switch_prob``.
    ``lam ~ Beta(alpha, alpha)``.  Mixup: ``lam * x + (1 - lam) * x.flip(0)``.  CutMix: a box of
    side ``int(H * sqrt(1 - lam))`` x ``int(W * sqrt(1 - lam))`` centred at a uniform random pixel,
    clipped to the image, is pasted from ``x.flip(0)`` and ``lam`` is corrected to
    ``1 - box_area / (H * W)``.  Targets: ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))``.

    The caller's ``x`` is never modified.  After each call ``last_lam`` (float; 1.0 when not
    mixed), ``last_mode`` (``"mixup"``, ``"cutmix"`` or ``None``) and ``last_box``
    (``(y0, y1, x0, x1)`` for CutMix, else ``None``) describe what was done.
    """

    def __init__(
        self,
        *,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
        num_classes: int = 10,
        mix_mode: str = "batch",
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        if not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if mix_mode not in MIX_MODES:
            raise ValueError(f"mix_mode must be one of {', '.join(MIX_MODES)}, got {mix_mode!r}")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.label_smoothing = float(label_smoothing)
        self.num_classes = int(num_classes)
        self.mix_mode = mix_mode
        self.last_lam: float = 1.0  # elem mode: the mean of last_lams
        self.last_lams: Optional[Tensor] = None  # elem mode: float32 (B,) per-sample lam (1.0 = not mixed)
        self.last_use_cutmix: Optional[Tensor] = None  # elem mode: bool (B,)
        self.last_boxes: Optional[Tensor] = None  # elem mode: int64 (B, 4) y0, y1, x0, x1 (empty where no CutMix)
        self.last_mode: Optional[str] = None
        self.last_box: Optional[tuple[int, int, int, int]] = None

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __repr__(self) -> str:
        return (
            f"MixupCutmix(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, "
            f"switch_prob={self.switch_prob}, label_smoothing={self.label_smoothing}, num_classes={self.num_classes}, "
            f"mix_mode={self.mix_mode!r})"
        )

    def _sample(self, generator: torch.Generator, height: int, width: int):
        """-> (mode, lam, box) for one batch."""
        if not self.enabled:
            return None, 1.0, None
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device).item())
        rng = np.random.default_rng(seed)
        if not rng.random() < self.prob:
            return None, 1.0, None
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not use_cutmix:
            return "mixup", lam, None
        ratio = np.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        y0, y1 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
        x0, x1 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
        return "cutmix", lam, (y0, y1, x0, x1)

    def _sample_elem(self, generator: torch.Generator, batch: int, height: int, width: int):
        """-> (lam float32 (B,), use_cutmix bool (B,), boxes int64 (B, 4)) as timm's _params_per_elem plus the
        per-sample CutMix boxes (lam corrected to the clipped box area, timm's correct_lam)."""
        lam = np.ones(batch, dtype=np.float32)
        use_cutmix = np.zeros(batch, dtype=bool)
        boxes = np.zeros((batch, 4), dtype=np.int64)
        if not self.enabled:
            return lam, use_cutmix, boxes
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device).item())
        rng = np.random.default_rng(seed)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = rng.random(batch) < self.switch_prob
            lam_mix = np.where(use_cutmix, rng.beta(self.cutmix_alpha, self.cutmix_alpha, size=batch),
                               rng.beta(self.mixup_alpha, self.mixup_alpha, size=batch))
        elif self.mixup_alpha > 0:
            lam_mix = rng.beta(self.mixup_alpha, self.mixup_alpha, size=batch)
        else:
            use_cutmix = np.ones(batch, dtype=bool)
            lam_mix = rng.beta(self.cutmix_alpha, self.cutmix_alpha, size=batch)
        lam = np.where(rng.random(batch) < self.prob, lam_mix.astype(np.float32), lam)
        cy = rng.integers(0, height, size=batch)
        cx = rng.integers(0, width, size=batch)
        for i in np.flatnonzero(use_cutmix & (lam != 1.0)):
            ratio = np.sqrt(1.0 - float(lam[i]))
            cut_h, cut_w = int(height * ratio), int(width * ratio)
            y0, y1 = np.clip(cy[i] - cut_h // 2, 0, height), np.clip(cy[i] + cut_h // 2, 0, height)
            x0, x1 = np.clip(cx[i] - cut_w // 2, 0, width), np.clip(cx[i] + cut_w // 2, 0, width)
            boxes[i] = (y0, y1, x0, x1)
            lam[i] = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
        return lam, use_cutmix, boxes

    def _call_elem(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        B, _, H, W = x.shape
        lam, use_cutmix, boxes = self._sample_elem(generator, B, H, W)
        lam_t = torch.from_numpy(lam).to(x.device)
        cut_t = torch.from_numpy(use_cutmix).to(x.device)
        boxes_t = torch.from_numpy(boxes).to(x.device)
        self.last_mode, self.last_box = "elem", None
        self.last_lams, self.last_use_cutmix, self.last_boxes = lam_t, cut_t, boxes_t
        self.last_lam = float(lam.mean())
        x = mix_elem_apply(x, lam_t, cut_t, boxes_t)
        t = one_hot_smooth(y, self.num_classes, self.label_smoothing)
        lam_col = lam_t.to(t.dtype).unsqueeze(1)
        return x, t * lam_col + t.flip(0) * (1.0 - lam_col)

    @torch.no_grad()
    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"MixupCutmix expects a float (B, C, H, W) batch, got {x.dtype} {tuple(x.shape)}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"targets must be (B,) class indices for a batch of {x.shape[0]}, got {tuple(y.shape)}")
        if self.mix_mode == "elem":
            return self._call_elem(x, y, generator)
        mode, lam, box = self._sample(generator, x.shape[-2], x.shape[-1])
        self.last_mode, self.last_lam, self.last_box = mode, lam, box
        if mode == "mixup":
            x = x * lam + x.flip(0) * (1.0 - lam)
        elif mode == "cutmix":
            y0, y1, x0, x1 = box
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        t = one_hot_smooth(y, self.num_classes, self.label_smoothing)
        if mode is not None:
            t = t * lam + t.flip(0) * (1.0 - lam)
        return x, t


def mix_elem_apply(x: Tensor, lam: Tensor, use_cutmix: Tensor, boxes: Tensor) -> Tensor:
    """timm's ``_mix_elem`` without the Python loop: sample i is mixed with sample ``B-1-i`` of the *unmixed*
    batch; Mixup samples become ``x_i * lam_i + x_j * (1 - lam_i)``, CutMix samples get the box
    ``boxes[i] = (y0, y1, x0, x1)`` pasted from ``x_j``; samples with ``lam_i == 1`` are unchanged.
    ``lam`` float (B,), ``use_cutmix`` bool (B,), ``boxes`` int64 (B, 4)."""
    B, _, H, W = x.shape
    partner = x.flip(0)
    mixed = lam != 1.0
    lam_mix = torch.where(mixed & ~use_cutmix, lam, torch.ones_like(lam)).to(x.dtype).view(B, 1, 1, 1)
    out = x * lam_mix + partner * (1.0 - lam_mix)
    rows = torch.arange(H, device=x.device).view(1, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    y0, y1, x0, x1 = (boxes[:, k].view(B, 1, 1) for k in range(4))
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1) & (mixed & use_cutmix).view(B, 1, 1)
    return torch.where(inside.unsqueeze(1), partner, out)


class MixThenErase:
    """Mixup/CutMix, then RandomErasing on the mixed batch (timm's order; `erase` is e.g.
    ``BatchAugment.erase_stage``). Same interface as :class:`MixupCutmix`; every batch gets soft targets."""

    enabled = True

    def __init__(self, mix: MixupCutmix, erase: Callable[[Tensor, torch.Generator], Tensor]):
        self.mix, self.erase = mix, erase

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.mix.enabled:
            x, targets = self.mix(x, y, generator)
        else:
            targets = one_hot_smooth(y, self.mix.num_classes, self.mix.label_smoothing)
        return self.erase(x, generator), targets
