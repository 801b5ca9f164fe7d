"""Figures for runs and sweeps, each written as PNG and SVG.

Figures are built with matplotlib's object API (`Figure`, rendered by the non-interactive Agg/SVG backends), so
nothing here touches pyplot's global state or needs a display.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import UserError
from ..fileio import atomic_write
from ..train.schedule import lr_at

FORMATS = ("png", "svg")


def figure(width: float = 6.4, height: float = 4.4):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plots need matplotlib; `pip install matplotlib` (a dependency of isoconv)") from None
    return Figure(figsize=(width, height), layout="constrained")


def save(fig, stem: Path) -> list[Path]:
    """Write stem.png and stem.svg atomically; returns the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = stem.with_name(f"{stem.name}.{fmt}")
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=120)
        atomic_write(path, buf.getvalue())
        paths.append(path)
        fig.set_layout_engine("none")  # the first save laid the figure out; the others reuse it (text is slow)
    return paths


def colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# ----------------------------------------------------------------------------- sweep figures

def accuracy_scatter(points: Sequence[dict[str, Any]], x_key: str, x_label: str, stem: Path,
                     title: str, log_x: Optional[bool] = None) -> list[Path]:
    """Test top-1 (mean, error bar = std over seeds) against x; one labelled point per variant."""
    fig = figure()
    ax = fig.add_subplot()
    pts = [p for p in points if p.get(x_key) is not None and p.get("top1") is not None]
    same_x: dict[float, int] = {}
    for p, color in zip(pts, colors(len(pts))):
        ax.errorbar(p[x_key], 100 * p["top1"], yerr=100 * (p.get("top1_std") or 0.0), fmt="o", color=color,
                    capsize=3, label=p["name"])
        k = same_x[p[x_key]] = same_x.get(p[x_key], -1) + 1  # stack the labels of points sharing an x
        ax.annotate(p["name"], (p[x_key], 100 * p["top1"]), textcoords="offset points", xytext=(5, 4 + 9 * k),
                    fontsize=7, color=color, in_layout=False)
    if pts:
        ax.legend(fontsize=7)
    xs = [p[x_key] for p in pts]
    if log_x is None:
        log_x = bool(xs) and min(xs) > 0 and max(xs) / min(xs) > 8
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if not pts:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
    return save(fig, stem)


def published_bars(groups: Sequence[dict[str, Any]], stem: Path, title: str) -> list[Path]:
    """Ours vs published (the TF replication's Fig. 5): per variant, a bar of our mean (error bar = std over seeds)
    beside the published figure(s) it compares with. `groups`: [{"name", "bars": [{"kind", "value" (a fraction),
    "std", "label" (printed on the bar, e.g. "~88.5")}]}]; a kind ("ours top-1", "published top-1", ...) keeps one
    colour across variants, and a missing value (a variant not run yet) leaves its slot empty."""
    kinds = list(dict.fromkeys(b["kind"] for g in groups for b in g["bars"]))
    color_of = dict(zip(kinds, colors(len(kinds))))
    fig = figure(max(6.4, 1.0 + 0.45 * len(kinds) * len(groups)), 4.8)
    ax = fig.add_subplot()
    width = 0.8 / max([1] + [len(g["bars"]) for g in groups])
    labelled: set[str] = set()
    for i, group in enumerate(groups):
        n = len(group["bars"])
        for j, bar in enumerate(group["bars"]):  # a variant's bars side by side, centred on its tick
            if bar.get("value") is None:
                continue
            x, top, std = i + (j - (n - 1) / 2) * width, 100 * bar["value"], bar.get("std")
            ax.bar(x, top, width, color=color_of[bar["kind"]], yerr=None if std is None else 100 * std, capsize=3,
                   label=None if bar["kind"] in labelled else bar["kind"])
            labelled.add(bar["kind"])
            ax.annotate(bar.get("label", ""), (x, top + 100 * (std or 0)), textcoords="offset points", xytext=(0, 3),
                        ha="center", va="bottom", fontsize=7, rotation=90, in_layout=False)
    ax.set_xticks(range(len(groups)), [g["name"] for g in groups], rotation=30 if len(groups) > 3 else 0,
                  ha="right" if len(groups) > 3 else "center", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 110)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    if labelled:
        ax.legend(fontsize=7, loc="lower right")
    if not any(b.get("value") is not None for g in groups for b in g["bars"]):
        ax.text(0.5, 0.5, "no figures yet", ha="center", va="center", transform=ax.transAxes)
    return save(fig, stem)


def schedule_signature(config: dict) -> tuple:
    return (config.get("schedule", "onecycle"), float(config.get("lr_max", 0.01)), int(config.get("epochs", 1)),
            float(config.get("warmup_epochs") or 0.0))


def lr_schedules(configs: Sequence[tuple[str, dict]], stem: Path) -> list[Path]:
    """The learning rate against (fractional) epoch, one line per distinct schedule, labelled with its users."""
    groups: dict[tuple, list[str]] = {}
    for name, config in configs:
        groups.setdefault(schedule_signature(config), []).append(name)
    fig = figure()
    ax = fig.add_subplot()
    for (schedule, lr_max, epochs, warmup), color in zip(groups, colors(len(groups))):
        t = np.linspace(0, epochs, 1001)
        # 1000 steps over the run: fine enough for the picture (onecycle-torch is defined per step)
        lr = [lr_at(x, schedule=schedule, lr_max=lr_max, epochs=epochs, warmup_epochs=warmup,
                    iters_per_epoch=max(1, round(1000 / epochs))) for x in t]
        names = groups[(schedule, lr_max, epochs, warmup)]
        who = ", ".join(names) if len(names) <= 3 else f"{len(names)} variants"
        ax.plot(t, lr, color=color, label=f"{schedule}, lr_max {lr_max:g}, {epochs} ep ({who})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title("learning-rate schedule")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, stem)


CURVE_PANELS = (("train_loss", "train loss"), ("test_loss", "test loss"),
                ("train_acc", "train accuracy (augmented batches)"), ("test_top1", "test top-1"))


def training_curves(runs: Sequence[tuple[str, list[dict]]], stem: Path, title: str) -> list[Path]:
    """Train/test loss and accuracy per epoch; runs sharing a label (the seeds of a variant) share a colour."""
    from matplotlib.ticker import MaxNLocator

    labels = list(dict.fromkeys(label for label, _ in runs))
    color_of = dict(zip(labels, colors(len(labels))))
    fig = figure(10, 7)
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, name) in zip(axes, CURVE_PANELS):
        labelled = set()
        for label, rows in runs:
            pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if not pts:
                continue
            ep, val = zip(*pts)
            ax.plot(ep, val, marker="o" if len(pts) < 15 else None, markersize=3, color=color_of[label],
                    label=None if label in labelled else label, alpha=0.85)
            labelled.add(label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    fig.suptitle(title)
    return save(fig, stem)


# ----------------------------------------------------------------------------- per-run figures

def confusion_heatmap(summary: dict, stem: Path, title: str) -> list[Path]:
    cm = np.asarray(summary["confusion_matrix"], dtype=float)
    classes = summary.get("classes") or [str(i) for i in range(len(cm))]
    n = len(classes)
    size = min(4 + 0.45 * n, 16)
    fig = figure(size + 1.2, size)
    ax = fig.add_subplot()
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    if n <= 20:
        ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black", in_layout=False)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return save(fig, stem)


def per_class_f1(summary: dict, stem: Path, title: str) -> list[Path]:
    rows = summary["per_class"]
    n = len(rows)
    fig = figure(max(6.4, 0.35 * n + 2), 4.4)
    ax = fig.add_subplot()
    ax.bar(range(n), [r["f1"] for r in rows], color=colors(1)[0])
    macro = summary.get("macro_f1")
    if macro is not None:
        ax.axhline(macro, color="black", linestyle="--", linewidth=1, label=f"macro F1 {macro:.3f}")
        ax.legend(fontsize=8)
    if n <= 40:
        ax.set_xticks(range(n), [r["class"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    return save(fig, stem)
