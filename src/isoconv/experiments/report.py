"""`isoconv report RUN_OR_SWEEP_DIR`: (re)generate the plots and a report.md that embeds them."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional
from urllib.parse import quote


from ..data.provenance import data_statement, test_set_description
from ..errors import UserError
from ..fileio import atomic_write
from ..rundir import RunDir
from . import plots
from .published import FIGURE_KEYS, OUR_METRIC, figures_text, params_note
from .results import (MANIFEST, VariantResult, human_seconds, load_manifest, mean_std, pct, pct_pm,
                      results_markdown, test_split_facts, write_results)

log = logging.getLogger(__name__)

PLOTS = "plots"


def write_report(target: Path, command: Optional[str] = None) -> Path:
    """Report for a sweep directory (has sweep.json) or a run directory (has metrics.jsonl); returns report.md."""
    target = Path(target)
    if (target / MANIFEST).is_file():
        return write_sweep_report(target, regenerated_by=command)
    if RunDir(target).metrics.is_file():
        return write_run_report(target)
    if not target.exists():
        raise UserError(f"{target} does not exist; pass a run folder (from `isoconv train`) or a sweep folder "
                        f"(from `isoconv ablate`)")
    raise UserError(f"{target} is neither a run folder (no metrics.jsonl) nor a sweep folder (no {MANIFEST}); "
                    f"pass the folder `isoconv train --out` or `isoconv ablate --out` wrote")


def image(path: Path, base: Path, alt: str) -> str:
    return f"![{alt}]({quote(path.relative_to(base).as_posix())})"


# ----------------------------------------------------------------------------- one run

def run_figures(out_dir: Path, title: str, summary: Optional[dict], config: dict,
                rows: list[dict]) -> dict[str, Path]:
    """Curves, LR schedule and (when finished) confusion matrix and per-class F1 of one run: {kind: png path}."""
    figs = {"curves": plots.training_curves([(title, rows)], out_dir / "run-curves", f"{title}: training curves")[0],
            "lr": plots.lr_schedules([(title, config)], out_dir / "run-lr_schedule")[0]}
    if summary and summary.get("confusion_matrix"):
        top1 = f"top-1 {100 * summary['test_top1']:.2f}%"
        figs["confusion"] = plots.confusion_heatmap(summary, out_dir / "run-confusion",
                                                    f"{title}: confusion matrix ({top1})")[0]
        figs["f1"] = plots.per_class_f1(summary, out_dir / "run-per_class_f1", f"{title}: per-class F1")[0]
    return figs


def write_run_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    config, rows, summary = run.read_config() or {}, run.read_metrics(), run.read_summary()
    sweep = run_dir.resolve().parent.parent
    in_sweep = (sweep / MANIFEST).is_file()
    title = f"{run_dir.resolve().parent.name}/{run_dir.resolve().name}" if in_sweep else run_dir.resolve().name
    figs = run_figures(run_dir / PLOTS, title, summary, config, rows)
    resume = "." if summary else f"; continue it with `isoconv train --resume {run_dir}`."
    lines = [f"# Run `{run_dir}`", "", "Settings: [config.yaml](config.yaml) (every resolved setting). Reproduce with "
             f"`isoconv train --recipe {run_dir / 'config.yaml'} --out NEW_DIR`{resume}", ""]
    if in_sweep:
        commands = load_manifest(sweep).get("commands", [])
        lines += ["Part of the sweep in `" + str(sweep) + "`, produced by:", "", "```bash", *commands, "```", ""]
    if summary:
        lines += ["| test top-1 | test top-5 | macro F1 | params | train time | device | torch | test images |",
                  "|---:|---:|---:|---:|---:|---|---|---:|",
                  f"| {pct(summary['test_top1'])}% | {pct(summary['test_top5'])}% | "
                  f"{summary.get('macro_f1', float('nan')):.4f} | {run_params(summary, config, in_sweep)} | "
                  f"{human_seconds(summary.get('train_seconds'))} | {summary.get('device')} ({summary.get('amp')}) | "
                  f"{summary.get('torch')} | {summary.get('test_images', 0):,} |", "",
                  f"Test images: {test_set_description(*test_split_facts(summary, config))}.", "",
                  f"Data: {data_statement(summary.get('data_provenance'))}.", ""]
        published = "" if in_sweep else figures_text(config.get("published"))
        if published:
            lines += [f"Published for this recipe (the seed's own figure, not ours): {published}"
                      f" — {config['published'].get('source', 'no source given')}.", ""]
    else:
        problem = run.summary_problem()
        if problem:
            log.warning(f"{run.summary} {problem}; the run is shown as not finished")
        lines += [f"Not finished: {len(rows)} of {config.get('epochs', '?')} epochs logged"
                  f"{f' ({run.summary.name} {problem})' if problem else ''}.", ""]
    lines += metrics_table(rows) + ["", "## Training curves", "", image(figs["curves"], run_dir, "training curves"),
                                    "", "## Learning-rate schedule", "", image(figs["lr"], run_dir, "lr schedule")]
    if "confusion" in figs:
        lines += ["", "## Confusion matrix", "", image(figs["confusion"], run_dir, "confusion matrix"),
                  "", "## Per-class F1", "", image(figs["f1"], run_dir, "per-class F1")]
    path = run_dir / "report.md"
    atomic_write(path, "\n".join(lines) + "\n")
    return path


def run_params(summary: dict, config: dict, in_sweep: bool) -> str:
    """The run's exact parameter count, with the seed's stated count beside it (a recipe's `published.params`)."""
    note = "" if in_sweep else params_note(config.get("published"))
    return f"{summary.get('params', 0):,}" + (f" {note}" if note else "")


def metrics_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []

    def f(v, fmt):
        return "—" if v is None else format(v, fmt)
    out = ["| epoch | lr | train loss | train acc | test loss | test top-1 | test top-5 | seconds |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['epoch']} | {f(r.get('lr'), '.2e')} | {f(r.get('train_loss'), '.4f')} | "
                   f"{f(r.get('train_acc'), '.4f')} | {f(r.get('test_loss'), '.4f')} | "
                   f"{f(r.get('test_top1'), '.4f')} | "
                   f"{f(r.get('test_top5'), '.4f')} | {f(r.get('epoch_seconds'), '.1f')} |")
    return out


# ----------------------------------------------------------------------------- a sweep

def scatter_points(variants: list[VariantResult]) -> list[dict]:
    points = []
    for v in variants:
        top1, std = mean_std(v.values("test_top1"))
        points.append({"name": v.name, "params": v.params, "relative_time": v.relative_time, "top1": top1,
                       "top1_std": std})
    return points


def published_groups(variants: list[VariantResult]) -> list[dict]:
    """Per variant with a published figure: our mean ± std of each metric a figure compares with, then the figures."""
    groups = []
    for v in variants:
        if not v.published:
            continue
        bars = []
        for metric in dict.fromkeys(OUR_METRIC[k] for k in v.published):
            mean, std = mean_std(v.figure_values(metric))  # the evaluation the seed's figure is
            label = metric.replace("test_", "").replace("top", "top-")
            bars.append({"kind": f"ours {label}", "value": mean, "std": std,
                         "label": pct_pm(mean, std) if mean is not None else ""})
        for key, label in FIGURE_KEYS:
            if key in v.published:
                fig = v.published[key]
                kind = f"{label} (quoted)" if key.startswith("paper") else f"published {label}"
                bars.append({"kind": kind, "value": fig.value, "std": None, "label": fig.percent()})
        groups.append({"name": v.name, "bars": bars})
    return groups


def write_sweep_report(sweep_dir: Path, manifest: Optional[dict] = None, regenerated_by: Optional[str] = None) -> Path:
    sweep_dir = Path(sweep_dir)
    manifest = dict(manifest or load_manifest(sweep_dir))
    if regenerated_by:
        manifest["regenerated_by"] = regenerated_by
    variants = write_results(sweep_dir, manifest)
    out = sweep_dir / PLOTS
    points = scatter_points(variants)
    figs = {
        "params": plots.accuracy_scatter(points, "params", "parameters", out / "accuracy_vs_params",
                                         f"{manifest['spec']}: accuracy vs parameters")[0],
        "time": plots.accuracy_scatter(points, "relative_time", f"training time relative to {manifest['baseline']}",
                                       out / "accuracy_vs_relative_time",
                                       f"{manifest['spec']}: accuracy vs relative training time", log_x=False)[0],
        "lr": plots.lr_schedules([(v.name, v.config) for v in variants], out / "lr_schedule")[0],
        "curves": plots.training_curves([(v.name, RunDir(r.run_dir).read_metrics()) for v in variants for r in v.runs
                                         if r.state != "pending"], out / "curves",
                                        f"{manifest['spec']}: training curves (all runs)")[0],
    }
    groups = published_groups(variants)
    if groups:
        figs["published"] = plots.published_bars(groups, out / "ours_vs_published",
                                                 f"{manifest['spec']}: ours vs published")[0]
    lines = [results_markdown(manifest, variants).rstrip(), "",
             "## Accuracy vs parameters", "", image(figs["params"], sweep_dir, "accuracy vs parameters"), "",
             "## Accuracy vs relative training time", "", image(figs["time"], sweep_dir, "accuracy vs time"), ""]
    if groups:
        lines += ["## Ours vs published", "",
                  "Per variant with a published figure: our mean test accuracy (error bar: standard deviation over "
                  "seeds) beside the seed's figure, printed as published (`~` about, `>` more than). The seed's "
                  "figures were measured on its own data and test split; see the comparable? column above.", "",
                  image(figs["published"], sweep_dir, "ours vs published"), ""]
    lines += ["## Learning-rate schedule", "", image(figs["lr"], sweep_dir, "learning-rate schedule"), "",
              "## Training curves", "", "One colour per variant; every seed is drawn.", "",
              image(figs["curves"], sweep_dir, "training curves"), ""]
    for v in variants:
        if not v.done:
            continue
        run = v.done[0]
        name = v.dir
        top1 = f"seed {run.seed}, top-1 {100 * run.summary['test_top1']:.2f}%"
        cm = plots.confusion_heatmap(run.summary, out / f"{name}-confusion", f"{v.name}: confusion ({top1})")[0]
        f1 = plots.per_class_f1(run.summary, out / f"{name}-per_class_f1", f"{v.name}: per-class F1 ({top1})")[0]
        lines += [f"## {v.name} (seed {run.seed})", "", image(cm, sweep_dir, f"{v.name} confusion matrix"), "",
                  image(f1, sweep_dir, f"{v.name} per-class F1"), ""]
    path = sweep_dir / "report.md"
    atomic_write(path, "\n".join(lines).rstrip() + "\n")
    return path
