"""Published figures as the seeds give them: a value, a marker (`~0.885` "about", `>0.94` "more than") and the digits.

A recipe's `published:` block holds the seed documents' own figures, as fractions: a number (`0.9452`) or a string
with a marker (`"~0.885"`, `">0.94"`); `%` figures (`"~88.5%"`) are read too. Tables print a figure with its marker
and the digits the seed gave (`~88.5`, `>94`, `94.52`); plots use the value.

Keys read (each optional): `test_top1`, `test_top5` (the seed's own result), `paper_top1` (the original paper's
figure the seed compared itself with), `params` (a parameter count the seed states, e.g. "22M", shown beside
the true count) and `figure`: which evaluation the seed's number is (FIGURES: the final weights', the last or
the best of its fixed-interval evaluations -- a run's summary has both as `scheduled_evals` --, not stated, or
curves only).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Optional

from ..errors import ConfigError

# (key in `published:`, what it is) in the order tables and plots show them
FIGURE_KEYS = (("test_top1", "top-1"), ("test_top5", "top-5"), ("paper_top1", "paper top-1"))
# the metric of our own runs each figure compares with
OUR_METRIC = {"test_top1": "test_top1", "test_top5": "test_top5", "paper_top1": "test_top1"}
# `figure:` values: which of a run's evaluations the seed's number corresponds to
FIGURES = {"final": "final weights", "last-eval": "last scheduled eval", "best-eval": "best scheduled eval",
           "unstated": "epoch not stated", "curves": "curves only"}
MARKERS = ("~", "≈", ">=", "<=", "≥", "≤", ">", "<")
_FIGURE = re.compile(r"^\s*(" + "|".join(re.escape(m) for m in MARKERS) + r")?\s*([0-9]*\.?[0-9]+)\s*(%?)\s*$")


@dataclass(frozen=True)
class Figure:
    """One published figure. `value` is a fraction (0.885); `marker` is "" for an exact figure."""

    value: float
    marker: str
    percent_digits: str  # the value in percent with the digits the source gave: "88.5", "94", "94.52"

    def percent(self) -> str:
        """`~88.5`, `>94`, `94.52`: the figure in percent as published."""
        return f"{self.marker}{self.percent_digits}"

    def fraction(self) -> str:
        """`~0.885`, `0.9452`: the figure as a fraction, as the recipe holds it."""
        return f"{self.marker}{format(Decimal(self.percent_digits) / 100, 'f')}"


def parse_figure(raw: Any, where: str = "published figure") -> Figure:
    """A number or a marked string (`~0.885`, `>0.94`, `~88.5%`) -> Figure; ConfigError for anything else."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ConfigError(f"{where} must be a fraction such as 0.9452, '~0.885' or '>0.94', got {raw!r}")
    m = _FIGURE.match(str(raw))
    if not m:
        raise ConfigError(f"{where} must be a fraction such as 0.9452, '~0.885' or '>0.94', got {raw!r}")
    marker, digits, percent = m.groups()
    try:
        number = Decimal(digits)
    except InvalidOperation:  # pragma: no cover - the pattern only lets decimals through
        raise ConfigError(f"{where}: {raw!r} is not a number") from None
    pct = number if percent else number * 100
    if not 0 <= pct <= 100:
        raise ConfigError(f"{where} must be a fraction of 1 (0.9452) or a percentage ('94.52%'), got {raw!r}")
    text = format(pct.normalize(), "f") if pct != pct.to_integral() else str(int(pct))
    return Figure(float(pct / 100), marker or "", text)


def published_figures(published: Optional[dict], where: str = "published") -> dict[str, Figure]:
    """{key: Figure} of the figures in a `published:` block (keys of FIGURE_KEYS only, in their order)."""
    published = published or {}
    return {key: parse_figure(published[key], f"{where}.{key}") for key, _ in FIGURE_KEYS
            if published.get(key) is not None}


def figures_text(published: Optional[dict], percent_sign: str = "%") -> str:
    """`top-1 ~88.5%; paper top-1 91.26%`, or "" when the block holds no figure."""
    figures = published_figures(published)
    return "; ".join(f"{label} {figures[key].percent()}{percent_sign}" for key, label in FIGURE_KEYS
                     if key in figures)


def figure_note(published: Optional[dict]) -> str:
    """`(last scheduled eval)`: which evaluation the seed's own number is, when the block says and holds one."""
    figure = (published or {}).get("figure")
    if figure is None or not {"test_top1", "test_top5"} & set(published_figures(published)):
        return ""  # no number of the seed's own (a paper's figure is not one of its evaluations)
    if figure not in FIGURES:
        raise ConfigError(f"published.figure must be one of {', '.join(FIGURES)}, got {figure!r}")
    return f"({FIGURES[figure]})"


def params_note(published: Optional[dict]) -> str:
    """`(the seed says 22M)` when the `published:` block states a parameter count, else ""."""
    stated = (published or {}).get("params")
    return f"(the seed says {stated})" if stated else ""
