"""Learning-rate schedules, evaluated at fractional epoch t = epoch + (i + 1) / iters_per_epoch."""
from __future__ import annotations

import math

import numpy as np


def onecycle_knots(epochs: int, exact: bool = True) -> list[float]:
    """Knots of the reference ConvMixer one-cycle schedule.

    exact=True keeps the reference's integer division (E*2//5, E*4//5), which is what published
    runs used; for very short runs those knots collapse (E=1 never reaches lr_max), so short
    recipes use exact=False (fractional knots 0.4E and 0.8E).
    """
    if exact:
        return [0, epochs * 2 // 5, epochs * 4 // 5, epochs]
    return [0.0, epochs * 0.4, epochs * 0.8, float(epochs)]


def lr_at(t: float, *, schedule: str, lr_max: float, epochs: int, warmup_epochs: float = 0.0) -> float:
    if schedule in ("onecycle", "onecycle-frac"):
        knots = onecycle_knots(epochs, exact=schedule == "onecycle")
        return float(np.interp(t, knots, [0, lr_max, lr_max / 20, 0]))
    if schedule == "cosine":
        if warmup_epochs > 0 and t < warmup_epochs:
            return lr_max * t / warmup_epochs
        span = max(epochs - warmup_epochs, 1e-12)
        progress = min(max((t - warmup_epochs) / span, 0.0), 1.0)
        return 0.5 * lr_max * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")
