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
import os
import shlex
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from ..config import TrainConfig
from ..errors import UserError
from .results import MANIFEST, atomic_write, load_manifest, run_state, write_results
from .spec import AblationSpec, load_spec, run_config, variant_config, variant_dirname

# Settings that may differ between a finished run and the sweep asking for it without changing the result.
RUNTIME_KEYS = {"device", "workers", "data_dir", "download", "out", "description", "published", "recipe",
                "ckpt_every_steps", "tensorboard", "skip_bad_images", "compile"}
# CLI flags of `isoconv ablate` for overrides, in the order the reconstructed command lists them.
OVERRIDE_FLAGS = {"data_dir": "--data-dir", "device": "--device", "amp": "--amp", "test_split": "--test-split"}


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
                   only: Optional[list[str]] = None) -> str:
    """The `isoconv ablate` command line that reproduces a sweep."""
    parts = ["isoconv", "ablate", str(spec_arg), "--seeds", str(seeds)]
    if parallel != 1:
        parts += ["--parallel", str(parallel)]
    if only:
        parts += ["--variants", ",".join(only)]
    parts += ["--out", str(out)]
    for key, value in overrides.items():
        if key in OVERRIDE_FLAGS:
            parts += [OVERRIDE_FLAGS[key], str(value)]
        elif key == "tensorboard" and value is True:
            parts.append("--tensorboard")
        elif key == "download" and value is False:
            parts.append("--no-download")
        else:
            parts += ["--set", f"{key}={cli_value(value)}"]
    return shlex.join(parts)


def cli_value(value: Any) -> str:
    """A value as `--set KEY=VALUE` reads it back (YAML): plain strings stay plain, the rest is JSON."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


# ----------------------------------------------------------------------------- checks before anything runs

def check_models(spec: AblationSpec, runs: list[PlannedRun]) -> None:
    """Build every variant's model on the meta device, so a bad shape fails now rather than hours in."""
    import torch

    from ..models import create_model

    seen = set()
    for r in runs:
        if r.variant in seen:
            continue
        seen.add(r.variant)
        try:
            with torch.device("meta"):
                create_model(r.config.model, **r.config.model_overrides())
        except UserError as e:
            raise UserError(f"variant {r.variant!r} of spec {spec.name}: {e}") from None


def setting_differences(stored: dict, planned: dict) -> list[str]:
    defaults = TrainConfig().to_dict()
    keys = [k for k in planned if k not in RUNTIME_KEYS]
    return [f"{k}: {stored.get(k, defaults.get(k))!r} -> {planned[k]!r}" for k in keys
            if stored.get(k, defaults.get(k)) != planned[k]]


def check_existing_runs(runs: list[PlannedRun]) -> None:
    """A run folder that already holds a run must hold one with the same settings."""
    for r in runs:
        stored_path = r.run_dir / "config.yaml"
        started = (r.run_dir / "summary.json").is_file() or (r.run_dir / "last.pt").is_file()
        if not started or not stored_path.is_file():
            continue
        stored = yaml.safe_load(stored_path.read_text()) or {}
        diffs = setting_differences(stored, r.config.to_dict())
        if diffs:
            raise UserError(f"{r.run_dir} holds a run with other settings ({'; '.join(diffs[:4])}); "
                            f"delete that folder or use another --out")


# ----------------------------------------------------------------------------- running

def train_one(config: TrainConfig, log: Callable[[str], None], stop_after: Optional[int]) -> tuple[str, str]:
    """Train or resume one run; returns (state, message). User errors (divergence, bad data) are recorded."""
    from ..train import train

    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").unlink(missing_ok=True)
    resume = run_dir if (run_dir / "last.pt").is_file() else None
    try:
        summary = train(config, resume=resume, log=log, stop_after=stop_after)
    except UserError as e:
        if hasattr(e, "exit_code"):  # stopped by SIGINT/SIGTERM after a checkpoint: the sweep stops too
            raise
        (run_dir / "error.txt").write_text(f"{e}\n")
        return "failed", str(e)
    except Exception as e:
        if type(e).__name__ != "OutOfMemoryError":
            raise
        message = "out of memory; lower --batch-size (or --parallel)"
        (run_dir / "error.txt").write_text(message + "\n")
        return "failed", message
    if summary is None:
        return "partial", "stopped early (resumable)"
    return "done", f"test top-1 {summary['test_top1']:.4f}, {summary['train_seconds'] / 60:.1f} min of training"


def file_logger(run_dir: Path, echo: Optional[Callable[[str], None]] = None, prefix: str = ""):
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / "ablate.log", "a")

    def log(message: str) -> None:
        f.write(message + "\n")
        f.flush()
        if echo is not None:
            echo(f"{prefix}{message}")
    return log, f


def run_in_subprocess(config: TrainConfig, threads: int, stop_after: Optional[int]) -> tuple[str, str]:
    """Worker of `--parallel N`: a fresh process with its share of the CPU threads, logging to its run folder."""
    import torch

    torch.set_num_threads(threads)
    log, f = file_logger(Path(config.out))
    try:
        return train_one(config, log, stop_after)
    finally:
        f.close()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def execute(todo: list[PlannedRun], *, parallel: int, log, stop_after, on_finish) -> list[tuple[PlannedRun, str, str]]:
    outcomes = []
    if parallel <= 1 or len(todo) <= 1:
        for r in todo:
            run_log, f = file_logger(r.run_dir, echo=log, prefix=f"[{r.label}] ")
            try:
                state, message = train_one(r.config, run_log, stop_after)
            finally:
                f.close()
            outcomes.append((r, state, message))
            on_finish(r, state, message)
        return outcomes
    import multiprocessing

    workers = min(parallel, len(todo))
    threads = max(1, available_cores() // workers)
    log(f"running {len(todo)} runs, {workers} at a time with {threads} CPU thread(s) each; "
        f"logs in each run folder's ablate.log")
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_in_subprocess, r.config, threads, stop_after): r for r in todo}
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
                 overrides: Optional[dict] = None, command: Optional[str] = None, log=print,
                 stop_after: Optional[int] = None, plots: bool = True, dry_run: bool = False,
                 only: Optional[list[str]] = None) -> Path:
    """Run (or continue) a sweep and write its results; returns the sweep directory.

    spec: a shipped spec name, a YAML path or an AblationSpec. overrides: TrainConfig settings applied to every
    run after the spec's. only: train just these variants now (the results still list every variant).
    stop_after: stop every run after that epoch (resumable; for staged runs and tests).
    """
    spec_arg = str(spec.path) if isinstance(spec, AblationSpec) else str(spec)
    spec = spec if isinstance(spec, AblationSpec) else load_spec(spec)
    seeds = spec.seeds if seeds is None else seeds
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    if parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {parallel}")
    overrides = dict(overrides or {})
    sweep_dir = Path(out) if out else default_sweep_dir(spec)
    runs = plan_runs(spec, sweep_dir, seeds, overrides)
    check_models(spec, runs)
    check_existing_runs(runs)
    command = command or format_command(spec_arg, seeds=seeds, parallel=parallel, out=sweep_dir, overrides=overrides,
                                        only=only)

    states = {r.run_dir: run_state(r.run_dir) for r in runs}
    chosen = set(spec.variant(name).name for name in only) if only else None
    todo = [r for r in runs if states[r.run_dir] != "done" and (chosen is None or r.variant in chosen)]
    log(f"sweep {sweep_dir}: {len(spec.variants)} variants x {seeds} seed(s) = {len(runs)} runs; "
        f"{sum(s == 'done' for s in states.values())} finished (skipped), "
        f"{sum(states[r.run_dir] == 'partial' for r in todo)} to resume, "
        f"{sum(states[r.run_dir] != 'partial' for r in todo)} to start"
        + (f" (only {', '.join(sorted(chosen))})" if chosen else ""))
    if dry_run:
        for r in runs:
            later = chosen is not None and r.variant not in chosen
            log(f"  {states[r.run_dir]:<8} {r.run_dir}" + (" (not now)" if later else ""))
        return sweep_dir

    sweep_dir.mkdir(parents=True, exist_ok=True)
    previous = load_manifest(sweep_dir).get("commands", []) if (sweep_dir / MANIFEST).is_file() else []
    commands = previous if previous[-1:] == [command] else previous + [command]
    manifest = manifest_for(spec, sweep_dir, runs, seeds, overrides, commands)
    if spec.text:
        atomic_write(sweep_dir / "spec.yaml", spec.text)
    atomic_write(sweep_dir / MANIFEST, json.dumps(manifest, indent=2))

    def on_finish(r: PlannedRun, state: str, message: str) -> None:
        log(f"[{r.label}] {state}: {message}")
        write_results(sweep_dir, manifest)

    started = time.perf_counter()
    outcomes = execute(todo, parallel=parallel, log=log, stop_after=stop_after, on_finish=on_finish)
    write_results(sweep_dir, manifest)
    if plots:
        from .report import write_sweep_report

        write_sweep_report(sweep_dir, manifest)
    log(f"sweep {sweep_dir}: {len(outcomes)} run(s) in {(time.perf_counter() - started) / 60:.1f} min; "
        f"results in {sweep_dir / 'results.md'}")
    failed = [(r, m) for r, s, m in outcomes if s == "failed"]
    if failed:
        r, message = failed[0]
        raise UserError(f"{len(failed)} of {len(outcomes)} run(s) failed (first: {r.label}: {message}); "
                        f"they are listed in {sweep_dir / 'results.md'}; rerun the command to retry them")
    return sweep_dir
