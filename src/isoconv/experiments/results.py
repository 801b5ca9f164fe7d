"""A sweep's results: per-variant statistics over seeds, written as results.md and results.csv.

Everything is read back from the sweep directory: `sweep.json` (the manifest ablate writes: variants, their
settings and run folders, the commands) and each run's `summary.json`, so `isoconv report` can regenerate the
tables at any time.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config import MODEL_KWARGS, RUNTIME_FIELDS
from ..data.provenance import comparable, data_statement, test_set_description
from ..errors import UserError
from ..fileio import atomic_write
from ..models import count_params, create_model, model_info
from ..models.flops import forward_flops
from ..rundir import RunDir
from ..weights import load_checkpoint
from .published import FIGURE_KEYS, Figure, params_note, published_figures
from .spec import format_value

MANIFEST = "sweep.json"
# Settings that never appear as "varied" columns: those that do not change what is computed, and the seed (the
# repetition index's business).
NOT_SETTINGS = RUNTIME_FIELDS | {"seed"}
DEFAULT_IMAGE_SIZE = {"tiny-imagenet": 64}
DEFAULT_CLASSES = {"cifar10": 10, "cifar100": 100, "tiny-imagenet": 200}


def test_split_facts(summary: Optional[dict], config: dict) -> tuple[str, Optional[int], Optional[int]]:
    """(split, subset, images in the whole test split) of a run: summary.json's record, else its config."""
    summary = summary or {}
    split = summary.get("test_split") or config.get("test_split") or "full"
    subset = summary["test_subset"] if "test_subset" in summary else config.get("test_subset")
    return split, subset, summary.get("test_images_total")


def published_split(config: dict) -> str:
    """The test split a config's published figure was measured on (`published.test_split`, default full)."""
    return (config.get("published") or {}).get("test_split") or "full"


def published_comparability(v: "VariantResult") -> tuple[bool, str]:
    """Whether every finished run of `v` compares with its published figure, and if not, why not."""
    if not v.done:
        return False, "no finished run"
    reasons = []
    for r in v.done:
        ok, why = comparable(r.summary.get("data_provenance"), *test_split_facts(r.summary, v.config),
                             published_split(v.config))
        if not ok and why not in reasons:
            reasons.append(why)
    return not reasons, "; ".join(reasons)


@dataclass
class RunResult:
    repetition: int
    seed: int
    run_dir: Path
    state: str  # done | failed | partial | pending
    summary: Optional[dict] = None
    error: str = ""


@dataclass
class VariantResult:
    name: str
    dir: str
    config: dict  # the variant's resolved settings (seed of repetition 0)
    settings: dict  # the varied settings shown as columns
    runs: list[RunResult] = field(default_factory=list)
    # the seed's figures for this variant (`published:` keys test_top1, test_top5, paper_top1), markers kept
    published: dict[str, Figure] = field(default_factory=dict)
    published_params: str = ""  # a parameter count the seed states ("22M"), shown beside ours
    params: Optional[int] = None
    flops: Optional[int] = None
    relative_time: Optional[float] = None

    @property
    def done(self) -> list[RunResult]:
        return [r for r in self.runs if r.state == "done"]

    def values(self, key: str) -> list[float]:
        return [float(r.summary[key]) for r in self.done if r.summary.get(key) is not None]

    def figure_values(self, key: str) -> list[float]:
        """`key` (test_top1, test_top5) of each finished run from the evaluation the seed's figure is
        (`published.figure`): the last or best scheduled evaluation (summary `scheduled_evals`), else the final."""
        which = {"last-eval": "last", "best-eval": "best"}.get((self.config.get("published") or {}).get("figure"))
        if which is None:
            return self.values(key)
        picked = [((r.summary.get("scheduled_evals") or {}).get(which) or {}).get(key) for r in self.done]
        return [float(x) for x in picked if x is not None]

    @property
    def train_seconds(self) -> Optional[float]:
        v = self.values("train_seconds")
        return statistics.fmean(v) if v else None


def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n - 1); the std is None for fewer than two values."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# ----------------------------------------------------------------------------- reading a sweep

def load_manifest(sweep_dir: Path) -> dict:
    path = Path(sweep_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{sweep_dir} is not a sweep directory (no {MANIFEST}); run `isoconv ablate SPEC` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; rerun the `isoconv ablate` command to rewrite it") from None


def read_run(run_dir: Path, repetition: int, seed: int) -> RunResult:
    run = RunDir(run_dir)
    state = run.state()
    result = RunResult(repetition, seed, run_dir, state)
    if state == "done":
        result.summary = run.read_summary()
    elif state == "failed":
        result.error = run.error.read_text().strip()
    return result


def collect(sweep_dir: Path, manifest: Optional[dict] = None) -> list[VariantResult]:
    sweep_dir = Path(sweep_dir)
    manifest = manifest or load_manifest(sweep_dir)
    configs = [v["config"] for v in manifest["variants"]]
    shown = varied_settings(configs, manifest.get("grid_keys", []))
    variants = []
    for v, settings in zip(manifest["variants"], shown):
        result = VariantResult(name=v["name"], dir=v["dir"], config=v["config"], settings=settings)
        result.runs = [read_run(sweep_dir / r["dir"], r["repetition"], r["seed"]) for r in v["runs"]]
        if v.get("shows_published"):
            block = v["config"].get("published") or {}
            result.published = published_figures(block, f"`published` of variant {v['name']}")
            result.published_params = str(block.get("params") or "")
        fill_model_numbers(result)
        variants.append(result)
    baseline = next((v for v in variants if v.name == manifest.get("baseline")), variants[0])
    for v in variants:
        if v.train_seconds is not None and baseline.train_seconds:
            v.relative_time = v.train_seconds / baseline.train_seconds
    return variants


# ----------------------------------------------------------------------------- settings and model numbers

def effective_settings(config: dict) -> dict:
    """The config with model-shape fields left None filled from the model preset's defaults."""
    out = dict(config)
    try:
        defaults = model_info(config["model"])["defaults"]
    except Exception:  # an unknown or custom model: show the settings as given
        return out
    for name, kw in MODEL_KWARGS.items():
        if out.get(name) is None and kw in defaults:
            out[name] = defaults[kw]
    return out


def varied_settings(configs: list[dict], grid_keys=()) -> list[dict]:
    """Per variant, the settings whose values differ between variants (grid keys first, then config order)."""
    effective = [effective_settings(c) for c in configs]
    keys = list(grid_keys) + [k for k in effective[0] if k not in grid_keys and k not in NOT_SETTINGS]
    varied = [k for k in keys if len({json.dumps(e.get(k), sort_keys=True) for e in effective}) > 1]
    if not varied and len(configs) == 1:
        varied = list(grid_keys)
    return [{k: e.get(k) for k in varied} for e in effective]


def fill_model_numbers(v: VariantResult) -> None:
    """Params (measured by the run, else counted) and forward FLOPs per image of the variant's model."""
    summary = v.done[0].summary if v.done else None
    classes = len(summary["classes"]) if summary and summary.get("classes") else \
        DEFAULT_CLASSES.get(v.config.get("dataset"), 10)
    image_size = v.config.get("image_size") or checkpoint_image_size(v) or \
        DEFAULT_IMAGE_SIZE.get(v.config.get("dataset"), 32)
    overrides = {kw: v.config[f] for f, kw in MODEL_KWARGS.items() if v.config.get(f) is not None}
    try:
        params, flops = model_numbers(v.config["model"], classes, image_size, json.dumps(overrides, sort_keys=True))
    except Exception:  # a model this isoconv cannot build: leave the columns empty rather than fail the report
        params, flops = None, None
    v.params = int(summary["params"]) if summary and summary.get("params") is not None else params
    v.flops = flops


def checkpoint_image_size(v: VariantResult) -> Optional[int]:
    """The image size a run trained at, from its checkpoint's data meta (None when unknown)."""
    for r in v.runs:
        path = RunDir(r.run_dir).checkpoint
        if path.is_file():
            return stored_image_size(str(path), path.stat().st_mtime_ns)
    return None


@functools.lru_cache(maxsize=64)
def stored_image_size(path: str, mtime_ns: int) -> Optional[int]:  # mtime_ns: reread a rewritten checkpoint
    try:
        return int(load_checkpoint(Path(path)).get("data", {})["image_size"])
    except (UserError, KeyError, TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=256)
def model_numbers(model: str, num_classes: int, image_size: int, overrides_json: str) -> tuple[int, int]:
    with torch.device("meta"):  # no memory, no init cost
        net = create_model(model, num_classes=num_classes, **json.loads(overrides_json))
    return count_params(net), forward_flops(net, image_size)


# ----------------------------------------------------------------------------- formatting

def pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def pct_pm(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def human_seconds(s: Optional[float]) -> str:
    if s is None:
        return "—"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def human_count(n: Optional[int], unit: str = "") -> str:
    if n is None:
        return "—"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g} {suffix}{unit}"
    return f"{n} {unit}".strip()


def seeds_cell(v: VariantResult) -> str:
    done = len(v.done)
    cell = f"{done}/{len(v.runs)}"
    failed = [r for r in v.runs if r.state == "failed"]
    if failed:
        cell += f" ({len(failed)} failed)"
    return cell


# ----------------------------------------------------------------------------- writing

# published figures: the figure as published (a fraction with its marker: "~0.885", ">0.94") and its value
CSV_PUBLISHED = {"test_top1": "published_top1", "test_top5": "published_top5", "paper_top1": "paper_top1"}
CSV_FIXED = ["seeds_done", "seeds_planned", "seeds", "params", "published_params", "flops", "train_seconds",
             "relative_train_time", "test_top1_mean", "test_top1_std", "test_top5_mean", "test_top5_std",
             "test_top1_per_seed",
             *(c for key, _ in FIGURE_KEYS for c in (CSV_PUBLISHED[key], f"{CSV_PUBLISHED[key]}_value")),
             "published_comparable", "failed"]


def csv_text(variants: list[VariantResult]) -> str:
    setting_keys = list(variants[0].settings) if variants else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", *setting_keys, *CSV_FIXED])
    for v in variants:
        top1, top1_std = mean_std(v.values("test_top1"))
        top5, top5_std = mean_std(v.values("test_top5"))
        published = [c for key, _ in FIGURE_KEYS for c in
                     ((v.published[key].fraction(), v.published[key].value) if key in v.published else ("", None))]
        w.writerow([v.name, *(format_value(v.settings[k]) for k in setting_keys), len(v.done), len(v.runs),
                    ";".join(str(r.seed) for r in v.runs), blank(v.params), v.published_params, blank(v.flops),
                    blank(v.train_seconds), blank(v.relative_time), blank(top1), blank(top1_std), blank(top5),
                    blank(top5_std), ";".join(f"{r.seed}:{r.summary['test_top1']}" for r in v.done),
                    *(blank(c) for c in published), comparable_cell(v),
                    ";".join(f"{r.seed}:{r.error}" for r in v.runs if r.state == "failed")])
    return buf.getvalue()


def blank(x) -> str:
    return "" if x is None else str(x)


def comparable_cell(v: VariantResult) -> str:
    """"yes", "no: why", or "" when the variant has no published figure."""
    if not v.published:
        return ""
    ok, why = published_comparability(v)
    return "yes" if ok else f"no: {why}"


def table_markdown(variants: list[VariantResult]) -> str:
    setting_keys = list(variants[0].settings) if variants else []
    shown = [(key, label) for key, label in FIGURE_KEYS if any(key in v.published for v in variants)]
    header = ["variant", *setting_keys, "params", "FLOPs", "train time", "rel. time", "top-1 %", "top-5 %"]
    align = ["---"] * (1 + len(setting_keys)) + ["---:"] * 6
    if shown:
        header += [f"{label} % (quoted)" if key.startswith("paper") else f"published {label} %"
                   for key, label in shown] + ["comparable?"]
        align += ["---:"] * len(shown) + ["---"]
    header.append("seeds")
    align.append("---:")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for v in variants:
        cells = [v.name, *(format_value(v.settings[k]) for k in setting_keys), params_cell(v), human_count(v.flops),
                 human_seconds(v.train_seconds), "—" if v.relative_time is None else f"{v.relative_time:.2f}",
                 pct_pm(*mean_std(v.values("test_top1"))), pct_pm(*mean_std(v.values("test_top5")))]
        if shown:
            cells += [v.published[key].percent() if key in v.published else "—" for key, _ in shown]
            cells.append(comparable_cell(v) or "—")
        cells.append(seeds_cell(v))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def params_cell(v: VariantResult) -> str:
    """`27,970,472 (the seed says 22M)`: our exact count, and beside it the seed's stated one when it has one."""
    if v.params is None:
        return "—"
    note = params_note({"params": v.published_params})
    return f"{v.params:,} {note}" if note else f"{v.params:,}"


def unique(values) -> list:
    out = []
    for v in values:
        if v is not None and v not in out:
            out.append(v)
    return out


def test_split_text(variants: list[VariantResult]) -> str:
    """Which test images the numbers are on, from each finished run's record (else the variant's config)."""
    facts = [test_split_facts(r.summary, v.config) for v in variants for r in v.done]
    facts = facts or [test_split_facts(None, v.config) for v in variants]
    return "; ".join(unique(test_set_description(*f) for f in facts))


def setup_lines(manifest: dict, variants: list[VariantResult]) -> list[str]:
    """The facts a reader needs to judge the numbers: command, software, hardware, split, seeds."""
    summaries = [r.summary for v in variants for r in v.done]
    commands = manifest.get("commands") or []
    lines = ["Produced by " + ("these commands, in order" if len(commands) > 1 else "the command") + ":", "",
             "```bash", *commands, "```", ""]
    if manifest.get("regenerated_by"):
        lines += [f"Tables and plots regenerated from the run folders by `{manifest['regenerated_by']}`.", ""]
    seeds_per = unique(len(v.runs) for v in variants)
    first_seeds = ", ".join(f"{v.name}: {', '.join(str(r.seed) for r in v.runs)}" for v in variants[:1])
    facts = [
        ("torch", ", ".join(unique(s.get("torch") for s in summaries)) or "—"),
        ("device", ", ".join(unique(f"{s.get('device')} ({s.get('amp')})" for s in summaries)) or "—"),
        ("dataset", ", ".join(unique(v.config.get("dataset") for v in variants))),
        ("training images", ", ".join(unique(
            f"first {v.config['train_subset']:,}" if v.config.get("train_subset") else "all"
            for v in variants))),
        ("test split", test_split_text(variants)),
        ("epochs", ", ".join(str(e) for e in unique(v.config.get("epochs") for v in variants))),
        ("seeds", f"{'/'.join(map(str, seeds_per))} per variant; repetition k trains with seed = the variant's "
                  f"seed + k (e.g. {first_seeds})"),
        ("statistics", "top-1/top-5 are mean ± sample standard deviation (n − 1) over the finished seeds; "
                       "train time is the mean training time (evaluation excluded); rel. time divides it by "
                       f"the baseline variant's ({manifest.get('baseline')})"),
        ("FLOPs", "forward FLOPs of one image (a multiply-add counts 2), PyTorch's FLOP counter"),
    ]
    lines += [f"- **{k}**: {v}" for k, v in facts]
    statements = unique(data_statement(s.get("data_provenance")) for s in summaries)
    if statements:
        lines += [f"- **data**: {'; '.join(statements)}"]
    sources = unique((v.config.get("published") or {}).get("source") for v in variants if v.published)
    if sources:
        markers = unique(f.marker for v in variants for f in v.published.values() if f.marker)
        marked = (f" ({', '.join(f'`{m}`' for m in markers)}: as the source gives it, e.g. `~` about, `>` more "
                  f"than)") if markers else ""
        lines += [f"- **published**: the seed documents' own figures{marked}, not ours: {'; '.join(sources)}. A "
                  f"row is comparable only when its data is the official release and it was evaluated on the "
                  f"published figure's test split"]
    return lines


def results_markdown(manifest: dict, variants: list[VariantResult]) -> str:
    parts = [f"# Ablation `{manifest['spec']}`", ""]
    if manifest.get("description"):
        parts += [manifest["description"], ""]
    parts += setup_lines(manifest, variants) + ["", table_markdown(variants)]
    if manifest.get("note"):
        parts += [manifest["note"], ""]
    failed = [(v.name, r) for v in variants for r in v.runs if r.state == "failed"]
    for name, r in failed:
        parts.append(f"- {name} seed {r.seed} failed: {r.error}")
    pending = sum(1 for v in variants for r in v.runs if r.state in ("partial", "pending"))
    if pending:
        parts.append(f"- {pending} run(s) not finished yet; rerun the command above to continue them.")
    return "\n".join(parts).rstrip() + "\n"


def write_results(sweep_dir: Path, manifest: Optional[dict] = None) -> list[VariantResult]:
    """(Re)write results.md and results.csv from the run folders; returns the per-variant results."""
    sweep_dir = Path(sweep_dir)
    manifest = manifest or load_manifest(sweep_dir)
    variants = collect(sweep_dir, manifest)
    atomic_write(sweep_dir / "results.csv", csv_text(variants))
    atomic_write(sweep_dir / "results.md", results_markdown(manifest, variants))
    return variants
