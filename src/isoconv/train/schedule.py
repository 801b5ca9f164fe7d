"""Learning-rate schedules, evaluated at fractional epoch t = epoch + (i + 1) / iters_per_epoch.

``t`` is the progress *after* the step that uses the rate, so the k-th optimizer step of a run
(k = 0, 1, ...) is evaluated at ``t = (k + 1) / iters_per_epoch``.

* ``onecycle`` / ``onecycle-frac``: the reference ConvMixer triangle (np.interp over 4 knots).
* ``cosine``: optional linear warm-up, then cosine from ``lr_max`` to 0.
* ``constant``: ``lr_max`` throughout (the Keras seed; the TF replication's first phase).
* ``stlr``: slanted triangular learning rates (Howard & Ruder 2018), ``cut_frac`` 0.1, ``ratio`` 32.
* ``onecycle-torch``: ``torch.optim.lr_scheduler.OneCycleLR`` (pct_start 0.3, div_factor 25,
  final_div_factor 1e4, cosine annealing, two phases), with :func:`beta1_at` giving the beta1
  (Adam's "momentum") that OneCycleLR's ``cycle_momentum`` sets, 0.95 -> 0.85 -> 0.95.  Needs
  ``iters_per_epoch``, because OneCycleLR's phases end at whole step numbers.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..config import SCHEDULE_CHOICES

SCHEDULES = SCHEDULE_CHOICES

STLR_CUT_FRAC = 0.1
STLR_RATIO = 32.0

# torch.optim.lr_scheduler.OneCycleLR defaults (what simple-convnext uses)
TORCH_PCT_START = 0.3
TORCH_DIV_FACTOR = 25.0
TORCH_FINAL_DIV_FACTOR = 1e4
TORCH_BASE_MOMENTUM = 0.85
TORCH_MAX_MOMENTUM = 0.95


def onecycle_knots(epochs: int, exact: bool = True) -> list[float]:
    """Knots of the reference ConvMixer one-cycle schedule.

    exact=True keeps the reference's integer division (E*2//5, E*4//5), which is what published
    runs used; for very short runs those knots collapse (E=1 never reaches lr_max), so short
    recipes use exact=False (fractional knots 0.4E and 0.8E).
    """
    if exact:
        return [0, epochs * 2 // 5, epochs * 4 // 5, epochs]
    return [0.0, epochs * 0.4, epochs * 0.8, float(epochs)]


def stlr(t: float, *, lr_max: float, epochs: int, cut_frac: float = STLR_CUT_FRAC, ratio: float = STLR_RATIO) -> float:
    """Slanted triangular rate at fractional epoch ``t`` (Howard & Ruder 2018, eq. 3).

    With T = epochs (in epoch units) and cut = cut_frac * T: p = t / cut before the cut, else
    1 - (t - cut) / (T - cut); rate = lr_max * (1 + p * (ratio - 1)) / ratio.  So it rises
    linearly from lr_max / ratio to lr_max over the first cut_frac of training and falls linearly
    back to lr_max / ratio at the end.  The paper counts in iterations with cut = floor(T * cut_frac);
    this is the same whenever epochs * iters_per_epoch * cut_frac is a whole number.
    """
    if not 0.0 < cut_frac < 1.0:
        raise ValueError(f"cut_frac must be in (0, 1), got {cut_frac}")
    if ratio < 1.0:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    total = float(epochs)
    cut = cut_frac * total
    t = min(max(t, 0.0), total)
    p = t / cut if t < cut else 1.0 - (t - cut) / (total - cut)
    return lr_max * (1.0 + p * (ratio - 1.0)) / ratio


def _torch_step(t: float, epochs: int, iters_per_epoch: Optional[int]) -> tuple[int, int]:
    """(OneCycleLR step number of the step evaluated at ``t``, total_steps)."""
    if iters_per_epoch is None or int(iters_per_epoch) < 1:
        raise ValueError("schedule 'onecycle-torch' needs iters_per_epoch (optimizer steps per epoch, >= 1)")
    total = int(epochs) * int(iters_per_epoch)
    # t = (k + 1) / iters_per_epoch for the k-th step; round() absorbs the float error of the division
    step = int(round(t * iters_per_epoch)) - 1
    return min(max(step, 0), total), total


def _torch_phase(step: int, total: int, pct_start: float) -> tuple[int, float]:
    """(phase 0 or 1, fraction of that phase done) exactly as OneCycleLR.get_lr computes them."""
    end0 = float(pct_start * total) - 1
    end1 = float(total - 1)
    if step <= end0:
        return 0, step / end0
    return 1, (step - end0) / (end1 - end0)


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)  # torch's _annealing_cos


def onecycle_torch_lr(step: int, total_steps: int, *, lr_max: float, pct_start: float = TORCH_PCT_START,
                      div_factor: float = TORCH_DIV_FACTOR, final_div_factor: float = TORCH_FINAL_DIV_FACTOR) -> float:
    """Learning rate OneCycleLR (anneal cos, three_phase False) sets at step number ``step``."""
    initial = lr_max / div_factor
    low = initial / final_div_factor
    phase, pct = _torch_phase(step, total_steps, pct_start)
    return _cos_anneal(initial, lr_max, pct) if phase == 0 else _cos_anneal(lr_max, low, pct)


def onecycle_torch_beta1(step: int, total_steps: int, *, pct_start: float = TORCH_PCT_START,
                         base_momentum: float = TORCH_BASE_MOMENTUM, max_momentum: float = TORCH_MAX_MOMENTUM) -> float:
    """beta1 OneCycleLR (cycle_momentum, cos) sets at step number ``step``: max -> base -> max."""
    phase, pct = _torch_phase(step, total_steps, pct_start)
    if phase == 0:
        return _cos_anneal(max_momentum, base_momentum, pct)
    return _cos_anneal(base_momentum, max_momentum, pct)


def lr_at(t: float, *, schedule: str, lr_max: float, epochs: int, warmup_epochs: float = 0.0,
          iters_per_epoch: Optional[int] = None) -> float:
    """Learning rate of the step evaluated at fractional epoch ``t``.

    ``iters_per_epoch`` is needed (and only used) by ``onecycle-torch``.
    """
    if schedule in ("onecycle", "onecycle-frac"):
        knots = onecycle_knots(epochs, exact=schedule == "onecycle")
        return float(np.interp(t, knots, [0, lr_max, lr_max / 20, 0]))
    if schedule == "cosine":
        if warmup_epochs > 0 and t < warmup_epochs:
            return lr_max * t / warmup_epochs
        span = max(epochs - warmup_epochs, 1e-12)
        progress = min(max((t - warmup_epochs) / span, 0.0), 1.0)
        return 0.5 * lr_max * (1 + math.cos(math.pi * progress))
    if schedule == "constant":
        return float(lr_max)
    if schedule == "stlr":
        return stlr(t, lr_max=lr_max, epochs=epochs)
    if schedule == "onecycle-torch":
        step, total = _torch_step(t, epochs, iters_per_epoch)
        return onecycle_torch_lr(step, total, lr_max=lr_max)
    raise ValueError(f"unknown schedule {schedule!r}")


def beta1_at(t: float, *, schedule: str, epochs: int, beta1: float = 0.9,
             iters_per_epoch: Optional[int] = None) -> float:
    """Adam beta1 of the step evaluated at fractional epoch ``t``.

    ``onecycle-torch`` cycles it as OneCycleLR does (0.95 -> 0.85 -> 0.95, ignoring ``beta1``);
    every other schedule leaves it at ``beta1``.
    """
    if schedule == "onecycle-torch":
        step, total = _torch_step(t, epochs, iters_per_epoch)
        return onecycle_torch_beta1(step, total)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}")
    return float(beta1)
