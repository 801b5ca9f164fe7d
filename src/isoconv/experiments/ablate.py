"""`isoconv ablate`: run every variant of a spec for N seeds, resumably, then write results, plots and a report.

Layout of a sweep directory (default `ablations/<spec name>`):

    spec.yaml                 the spec as run
    sweep.json                manifest: variants, their settings, run folders, the commands that ran
    <variant>/seed<S>/        one run folder per repetition (what `isoconv train` writes, plus ablate.log)
    results.md, results.csv   one row per variant
    plots/, report.md         figures and the report that embeds them

A run folder with `summary.json` is finished and skipped; one with `last.pt` but no summary was interrupted and
is resumed; a run that failed with a user error (e.g. divergence) leaves `error.txt` and is retried next time.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import shlex
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..config import RUNTIME_FIELDS, TrainConfig, config_differences, setting_tokens
from ..errors import Interrupted, UserError
from ..fileio import atomic_write
from ..models import build_model, with_preset_shape
from ..rundir import RunDir
from ..train import train
from ..train.tracking import check_tracking
from .launchers import LAUNCHERS, LaunchOptions, run_with_ray, run_with_slurm
from .report import write_sweep_report
from .results import MANIFEST, load_manifest, write_results
from .spec import ABLATE_FLAGS, AblationSpec, load_spec, run_config, variant_config, variant_dirname
from .tracking import open_child, open_sweep, publish_run, publish_sweep

log = logging.getLogger(__name__)

@dataclass
class PlannedRun:
    variant: str
    repetition: int
    config: TrainConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)

    @property
    def label(self) -> str:
        return f"{self.variant} seed {self.config.seed}"


def default_sweep_dir(spec: AblationSpec) -> Path:
    return Path("ablations") / spec.name


def plan_runs(spec: AblationSpec, sweep_dir: Path, seeds: int, overrides: dict) -> list[PlannedRun]:
    runs = []
    for v in spec.variants:
        base_seed = variant_config(v, overrides).seed
        for k in range(seeds):
            run_dir = sweep_dir / variant_dirname(v.name) / f"seed{base_seed + k}"
            runs.append(PlannedRun(v.name, k, run_config(v, k, run_dir, overrides)))
    return runs


def manifest_for(spec: AblationSpec, sweep_dir: Path, runs: list[PlannedRun], seeds: int, overrides: dict,
                 commands: list[str]) -> dict:
    variants = []
    for v in spec.variants:
        mine = [r for r in runs if r.variant == v.name]
        config = dataclasses.replace(mine[0].config, out=None).to_dict()
        variants.append({"name": v.name, "dir": variant_dirname(v.name), "shows_published": v.shows_published,
                         "config": config,
                         "runs": [{"repetition": r.repetition, "seed": r.config.seed,
                                   "dir": r.run_dir.relative_to(sweep_dir).as_posix()} for r in mine]})
    return {"spec": spec.name, "description": spec.description, "note": spec.note, "baseline": spec.baseline,
            "seeds": seeds, "overrides": overrides, "grid_keys": list(spec.grid_keys), "commands": commands,
            "variants": variants}


def format_command(spec_arg: str, *, seeds: int, parallel: int, out: Path, overrides: dict,
                   only: Optional[list[str]] = None, launch_args: tuple[str, ...] = ()) -> str:
    """The `isoconv ablate` command line that reproduces a sweep (launch_args: --launcher and its options)."""
    parts = ["isoconv", "ablate", str(spec_arg), "--seeds", str(seeds), *launch_args]
    if parallel != 1:
        parts += ["--parallel", str(parallel)]
    if only:
        parts += ["--variants", ",".join(only)]
    parts += ["--out", str(out)]
    for key, value in overrides.items():
        parts += setting_tokens(key, value, has_flag=lambda name: name in ABLATE_FLAGS)
    return shlex.join(parts)


# ----------------------------------------------------------------------------- checks before anything runs

def check_models(spec: AblationSpec, runs: list[PlannedRun]) -> None:
    """Build every variant's model on the meta device, so a bad shape fails now rather than hours in."""
    seen = set()
    for r in runs:
        if r.variant in seen:
            continue
        seen.add(r.variant)
        try:
            with torch.device("meta"):
                build_model(r.config, num_classes=10, image_size=None)
        except UserError as e:
            raise UserError(f"variant {r.variant!r} of spec {spec.name}: {e}") from None


def check_existing_runs(runs: list[PlannedRun]) -> None:
    """A run folder that already holds a run must hold one with the same settings."""
    for r in runs:
        run = RunDir(r.run_dir)
        stored = run.read_config()
        if stored is None or run.state() not in ("done", "partial"):
            continue
        diffs = config_differences(stored, with_preset_shape(r.config).to_dict(), ignore=RUNTIME_FIELDS)
        if diffs:
            raise UserError(f"{r.run_dir} holds a run with other settings ({'; '.join(diffs[:4])}); "
                            f"delete that folder or use another --out")


# ----------------------------------------------------------------------------- running

def train_one(config: TrainConfig, stop_after: Optional[int]) -> tuple[str, str]:
    """Train or resume one run; returns (state, message). User errors (divergence, bad data) are recorded."""
    run = RunDir(config.out)
    run.path.mkdir(parents=True, exist_ok=True)
    run.error.unlink(missing_ok=True)
    resume = run.path if run.checkpoint.is_file() else None
    try:
        summary = train(config, resume=resume, stop_after=stop_after)
    except Interrupted:  # stopped by SIGINT/SIGTERM after a checkpoint: the sweep stops too
        raise
    except UserError as e:
        run.write_error(str(e))
        return "failed", str(e)
    except torch.OutOfMemoryError:
        message = "out of memory; lower --batch-size (or --parallel)"
        run.write_error(message)
        return "failed", message
    if summary is None:
        return "partial", "stopped early (resumable)"
    return "done", f"test top-1 {summary['test_top1']:.4f}, {summary['train_seconds'] / 60:.1f} min of training"


@contextmanager
def training_log_copy(run_dir: Path) -> Iterator[None]:
    """While active, the training log (isoconv.train, INFO and up) is also appended to RUN_DIR/ablate.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "ablate.log")
    handler.setFormatter(logging.Formatter("%(message)s"))
    train_log = logging.getLogger("isoconv.train")
    level = train_log.level
    train_log.setLevel(logging.INFO)
    train_log.addHandler(handler)
    try:
        yield
    finally:
        train_log.removeHandler(handler)
        train_log.setLevel(level)
        handler.close()


def run_in_subprocess(config: TrainConfig, threads: int, stop_after: Optional[int]) -> tuple[str, str]:
    """Worker of `--parallel N`: a fresh process with its share of the CPU threads, logging to its run folder."""
    torch.set_num_threads(threads)
    with training_log_copy(Path(config.out)):
        return train_one(config, stop_after)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def execute(todo: list[PlannedRun], *, parallel: int, stop_after, on_finish,
            work=run_in_subprocess) -> list[tuple[PlannedRun, str, str]]:
    """Run `work(r.config, threads, stop_after)` for each run, `parallel` processes at a time (`isoconv tune` passes
    its study workers as the runs)."""
    outcomes = []
    if parallel <= 1 or len(todo) <= 1:
        for r in todo:
            log.info(f"[{r.label}] training in {r.run_dir}")
            with training_log_copy(r.run_dir):
                state, message = (train_one(r.config, stop_after) if work is run_in_subprocess
                                  else work(r.config, torch.get_num_threads(), stop_after))
            outcomes.append((r, state, message))
            on_finish(r, state, message)
        return outcomes
    workers = min(parallel, len(todo))
    threads = max(1, available_cores() // workers)
    log.info(f"running {len(todo)} runs, {workers} at a time with {threads} CPU thread(s) each; "
        f"logs in each run folder's ablate.log")
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(work, r.config, threads, stop_after): r for r in todo}
        try:
            for fut in as_completed(futures):
                r = futures[fut]
                state, message = fut.result()
                outcomes.append((r, state, message))
                on_finish(r, state, message)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return outcomes


def run_ablation(spec: Any, *, out: Optional[Path] = None, seeds: Optional[int] = None, parallel: int = 1,
                 overrides: Optional[dict] = None, command: Optional[str] = None,
                 stop_after: Optional[int] = None, plots: bool = True, dry_run: bool = False,
                 only: Optional[list[str]] = None, launcher: str = "local",
                 launch: Optional[LaunchOptions] = None) -> Path:
    """Run (or continue) a sweep and write its results; returns the sweep directory.

    spec: a shipped spec name, a YAML path or an AblationSpec. overrides: TrainConfig settings applied to every
    run after the spec's. only: train just these variants now (the results still list every variant).
    stop_after: stop every run after that epoch (resumable; for staged runs and tests).
    launcher: local (this machine, --parallel processes), ray or slurm (`launchers`), with `launch`'s resources.
    """
    spec_arg = str(spec.path) if isinstance(spec, AblationSpec) else str(spec)
    spec = spec if isinstance(spec, AblationSpec) else load_spec(spec)
    seeds = spec.seeds if seeds is None else seeds
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    if parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {parallel}")
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    launch = launch or LaunchOptions()
    launch.check()
    overrides = dict(overrides or {})
    sweep_dir = Path(out) if out else default_sweep_dir(spec)
    runs = plan_runs(spec, sweep_dir, seeds, overrides)
    check_models(spec, runs)
    check_existing_runs(runs)
    if overrides.get("track") == "mlflow":
        check_tracking(overrides.get("tracking_uri"))
    command = command or format_command(spec_arg, seeds=seeds, parallel=parallel, out=sweep_dir, overrides=overrides,
                                        only=only)

    states = {r.run_dir: RunDir(r.run_dir).state() for r in runs}
    chosen = set(spec.variant(name).name for name in only) if only else None
    todo = [r for r in runs if states[r.run_dir] != "done" and (chosen is None or r.variant in chosen)]
    log.info(f"sweep {sweep_dir}: {len(spec.variants)} variants x {seeds} seed(s) = {len(runs)} runs; "
        f"{sum(s == 'done' for s in states.values())} finished (skipped), "
        f"{sum(states[r.run_dir] == 'partial' for r in todo)} to resume, "
        f"{sum(states[r.run_dir] != 'partial' for r in todo)} to start"
        + (f" (only {', '.join(sorted(chosen))})" if chosen else ""))
    if dry_run:
        for r in runs:
            later = chosen is not None and r.variant not in chosen
            log.info(f"  {states[r.run_dir]:<8} {r.run_dir}" + (" (not now)" if later else ""))
        return sweep_dir

    sweep_dir.mkdir(parents=True, exist_ok=True)
    previous = load_manifest(sweep_dir).get("commands", []) if (sweep_dir / MANIFEST).is_file() else []
    commands = previous if previous[-1:] == [command] else previous + [command]
    manifest = manifest_for(spec, sweep_dir, runs, seeds, overrides, commands)
    if spec.text:
        atomic_write(sweep_dir / "spec.yaml", spec.text)
    atomic_write(sweep_dir / MANIFEST, json.dumps(manifest, indent=2))

    track = overrides.get("track") == "mlflow"
    if track:  # one parent MLflow run, a child per variant x seed made before it trains (wherever that is)
        uri, parent = open_sweep(sweep_dir, spec.name, {"spec": spec.name, "seeds": seeds, "command": command},
                                 overrides.get("tracking_uri"))
        todo = [dataclasses.replace(r, config=dataclasses.replace(r.config, tracking_uri=uri)) for r in todo]
        for r in todo:
            open_child(r.run_dir, f"{r.variant}/seed{r.config.seed}", r.config.to_dict(), uri, parent)

    def on_finish(r: PlannedRun, state: str, message: str) -> None:
        log.info(f"[{r.label}] {state}: {message}")
        write_results(sweep_dir, manifest)
        if track and state == "done":
            publish_run(r.run_dir)

    started = time.perf_counter()
    if launcher == "ray" and todo:
        outcomes = run_with_ray(todo, run_in_subprocess, stop_after=stop_after, on_finish=on_finish, options=launch)
    elif launcher == "slurm" and todo:
        outcomes = run_with_slurm(todo, run_in_subprocess, stop_after=stop_after, on_finish=on_finish,
                                  options=launch, folder=sweep_dir / "slurm", name=f"isoconv-{spec.name}",
                                  parallel=parallel)
    else:
        outcomes = execute(todo, parallel=parallel, stop_after=stop_after, on_finish=on_finish)
    write_results(sweep_dir, manifest)
    if plots:
        write_sweep_report(sweep_dir, manifest)
    if track:
        publish_sweep(sweep_dir, failed=sum(s == "failed" for _, s, _ in outcomes))
    log.info(f"sweep {sweep_dir}: {len(outcomes)} run(s) in {(time.perf_counter() - started) / 60:.1f} min; "
        f"results in {sweep_dir / 'results.md'}")
    failed = [(r, m) for r, s, m in outcomes if s == "failed"]
    if failed:
        r, message = failed[0]
        raise UserError(f"{len(failed)} of {len(outcomes)} run(s) failed (first: {r.label}: {message}); "
                        f"they are listed in {sweep_dir / 'results.md'}; rerun the command to retry them")
    return sweep_dir
