"""`isoconv tune SPEC`: an Optuna study over TrainConfig settings whose trials are ordinary isoconv runs.

Layout of a study folder (default `tunes/<spec name>`):

    spec.yaml, tune.json      the spec as run; the study's name, storage and the commands that ran
    journal.log               Optuna's journal (the default storage: no server, survives a kill)
    trials/NNNN/              one run folder per trial (what `isoconv train` writes, plus ablate.log)
    results.md, results.csv   every trial: state, parameters, validation top-1, epochs, training time
    plots/                    optimisation history, parameter importances, slice and parallel coordinates
    best.yaml                 the best trial's settings as a recipe (`isoconv train --recipe best.yaml`)
    best/                     the best configuration retrained on the whole training set, tested once

Trials are scored on a fixed-seed validation split held out from the training images (`--val-split`, spec
`val_split`, default 10%); the test set is read once, by the retraining of the best configuration. Each trial
reports its validation top-1 after every epoch; the pruner (successive halving by default) stops poor ones.

Rerunning the same command continues the study: finished and pruned trials are kept; a trial whose process died
(same host, process gone) is closed as failed and re-run as a new trial with the same parameters in the same run
folder, so it resumes from its last checkpoint; no trial runs twice and the study stops at the requested number.
Workers on several processes (`--parallel`, `--launcher ray|slurm`, or separate commands on one `--storage`) share
one study; each asks the storage for its next trial, so none is duplicated.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import random
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from ..config import RUNTIME_FIELDS, SETTINGS, TrainConfig
from ..errors import Interrupted, UserError
from ..fileio import atomic_write
from ..rundir import RunDir
from ..train import train
from .ablate import available_cores, execute, train_one, training_log_copy
from .launchers import LaunchOptions, run_with_ray, run_with_slurm
from .tracking import open_child, open_sweep, publish_run, publish_sweep
from .tune_spec import TuneSpec, trial_config

log = logging.getLogger(__name__)

MANIFEST = "tune.json"
JOURNAL = "journal.log"
STORAGE_ATTEMPTS = 8
TRIALS = "trials"
BEST_RECIPE = "best.yaml"
BEST_RUN = "best"
PROVENANCE = ("recipe", "description", "note", "published")
EVALUATION = ("val_split", "test_subset", "test_split")  # what scores a run, not how it trains: not in best.yaml
TEST_NOTE = {False: "the test set was read once, after tuning on the validation split",
             True: "the trials were scored on the test set too, so this figure is optimistic"}


def optuna_module():
    try:
        import optuna
    except ImportError:
        raise UserError("isoconv tune needs Optuna; `pip install 'isoconv[tune]'` (or `pip install optuna`)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def default_study_dir(spec: TuneSpec) -> Path:
    return Path("tunes") / spec.name


# ----------------------------------------------------------------------------- storage and study

@dataclass(frozen=True)
class StudyJob:
    """What a worker needs to join the study and run trials, wherever it runs (picklable)."""

    spec: TuneSpec
    study_dir: str
    storage: Optional[str]  # None: the journal file in the study folder
    study_name: str
    overrides: dict
    worker: int = 0
    tracking: Optional[tuple] = None  # (MLflow URI, parent run id) with --track mlflow


def open_storage(optuna, job: StudyJob):
    if job.storage is None:
        from_file = optuna.storages.journal
        return optuna.storages.JournalStorage(from_file.JournalFileBackend(str(Path(job.study_dir) / JOURNAL)))
    if job.storage.startswith("sqlite"):  # several processes write: wait for the lock instead of failing
        return optuna.storages.RDBStorage(job.storage, engine_kwargs={"connect_args": {"timeout": 120}})
    return job.storage


def make_sampler(optuna, spec: TuneSpec, salt: int):
    seed = spec.seed + salt
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "qmc":  # the same scrambled sequence in every process: each trial takes its own point
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(seed=spec.seed, scramble=True, warn_asynchronous_seeding=False)
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({n: list(p.choices) for n, p in spec.space.items()}, seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(optuna, spec: TuneSpec):
    if spec.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.min_epochs, reduction_factor=3)
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=spec.min_epochs - 1)
    return optuna.pruners.NopPruner()


def open_study(job: StudyJob, salt: int = 0):
    optuna = optuna_module()
    spec = job.spec
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            study = optuna.create_study(study_name=job.study_name, storage=open_storage(optuna, job),
                                        direction="maximize", sampler=make_sampler(optuna, spec, salt),
                                        pruner=make_pruner(optuna, spec), load_if_exists=True)
            break
        except (ImportError, ValueError) as e:  # an unusable --storage URL or a missing database driver
            raise UserError(f"--storage {job.storage}: {str(e).splitlines()[0]}; pass sqlite:///PATH.db or another "
                            f"SQLAlchemy URL") from None
        except Exception as e:  # two processes creating one new database's tables at once: the later one retries
            if attempt + 1 == STORAGE_ATTEMPTS or not any(w in str(e) for w in ("already exists", "locked",
                                                                                 "UNIQUE constraint")):
                raise
            time.sleep(0.2 + random.random())
    space = study.user_attrs.get("space")
    if space is None:
        study.set_user_attr("space", spec.space_record())
        study.set_user_attr("trials", spec.trials)
    elif space != json.loads(json.dumps(spec.space_record())):
        raise UserError(f"study {job.study_name!r} in {job.storage or Path(job.study_dir) / JOURNAL} searches another "
                        f"space ({space}); pass --study NAME or another --out for this spec")
    return optuna, study


def owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def process_gone(record: Any) -> bool:
    """True when `record` (a trial's owner) names a process of this host that no longer exists."""
    if not isinstance(record, dict) or record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, KeyError, TypeError):
        return False
    return False


def replaced(trials) -> set:
    """Numbers of trials closed because their process died (each was re-run as a newer trial)."""
    return {t.user_attrs["resumes"] for t in trials if "resumes" in t.user_attrs}


def requeue_orphans(optuna, study) -> int:
    """Queue again, for the same run folder, each trial that was interrupted: one stopped by a signal (closed as
    failed with `interrupted`) or one still marked running whose process died (on this host; closed here first).
    Returns how many were requeued. Of two processes doing this at once, only the one whose `tell` closed a
    running trial queues it."""
    trials = study.get_trials(deepcopy=False)
    gone, count = replaced(trials), 0
    for t in trials:
        if t.number in gone:
            continue
        if t.state == optuna.trial.TrialState.RUNNING and process_gone(t.user_attrs.get("owner")):
            try:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            except (ValueError, RuntimeError):  # another process closed it first
                continue
        elif not (t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("interrupted")):
            continue
        study.enqueue_trial(t.params, user_attrs={"resumes": t.number, "run_dir": t.user_attrs.get("run_dir")},
                            skip_if_exists=False)
        log.info(f"trial {t.number} was interrupted; it runs again as a new trial, resuming from its last "
                 f"checkpoint")
        count += 1
    return count


def counted(trials, below: Optional[int] = None) -> int:
    """Trials that count towards the requested number (not replaced, not surplus, not merely queued)."""
    gone = replaced(trials)
    return sum(1 for t in trials if (below is None or t.number < below) and t.number not in gone
               and not t.user_attrs.get("surplus") and t.state.name != "WAITING")


def study_complete(trials, n_trials: int) -> bool:
    return counted(trials) >= n_trials and not any(t.state.name == "WAITING" for t in trials)


# ----------------------------------------------------------------------------- one trial

class Pruned(Exception):
    """Raised from the training loop's epoch callback when the pruner stops a trial."""


class TrialFailed(Exception):
    """A trial's training failed with a user error (divergence, out of memory): recorded, the study goes on."""


def run_trial(optuna, study, trial, job: StudyJob) -> float:
    """Train one trial, reporting each epoch's validation top-1; returns its final top-1, or raises
    optuna.TrialPruned or TrialFailed (Optuna records the state)."""
    spec = job.spec
    params = {}
    for name, p in spec.space.items():
        if p.kind == "log":
            params[name] = trial.suggest_float(name, p.low, p.high, log=True)
        elif p.kind == "float":
            params[name] = trial.suggest_float(name, p.low, p.high)
        elif p.kind == "int":
            params[name] = trial.suggest_int(name, p.low, p.high)
        else:
            params[name] = trial.suggest_categorical(name, list(p.choices))
    rel = trial.user_attrs.get("run_dir") or f"{TRIALS}/{trial.number:04d}"
    run_dir = Path(job.study_dir) / rel
    trial.set_user_attr("run_dir", rel)
    trial.set_user_attr("owner", owner())
    cfg = dataclasses.replace(trial_config(spec, params, job.overrides), out=str(run_dir))
    if job.tracking:
        uri, parent = job.tracking
        cfg = dataclasses.replace(cfg, tracking_uri=uri)
        if RunDir(run_dir).read_tracking() is None:
            open_child(run_dir, f"trial{trial.number}", cfg.to_dict(), uri, parent)
    run = RunDir(run_dir)
    reported = set()

    def report(row: dict) -> None:
        if row.get("test_top1") is None or row["epoch"] in reported:
            return
        reported.add(row["epoch"])
        trial.report(float(row["test_top1"]), row["epoch"])
        if trial.should_prune():
            raise Pruned(row["epoch"])

    log.info(f"trial {trial.number}: {', '.join(f'{k}={fmt(v)}' for k, v in params.items())} in {run_dir}")
    state, value, message = "complete", None, ""
    with training_log_copy(run_dir):
        try:
            for row in run.read_metrics() if run.checkpoint.is_file() else []:
                report(row)  # a resumed trial: the epochs it had already trained
            resume = run_dir if run.checkpoint.is_file() else None
            summary = train(cfg, resume=resume, on_epoch=report)
            rows = run.read_metrics()
            value = summary["test_top1"] if summary else last_top1(rows)
            if value is None:
                raise UserError(f"trial {trial.number} stopped before its first evaluation")
        except Pruned:
            state = "pruned"
        except (Interrupted, KeyboardInterrupt):
            trial.set_user_attr("interrupted", True)  # the next command requeues it; it resumes from its checkpoint
            raise
        except UserError as e:  # divergence, out of memory: the trial failed, the study goes on
            state, message = "failed", str(e)
        except torch.OutOfMemoryError:
            state, message = "failed", "out of memory; lower batch_size"
    rows = run.read_metrics()
    trial.set_user_attr("epochs", len(rows))
    trial.set_user_attr("train_seconds", sum(r.get("epoch_seconds") or 0 for r in rows))
    trial.set_user_attr("epochs_planned", cfg.epochs)
    if state == "pruned":
        log.info(f"trial {trial.number}: pruned after epoch {len(rows)} (top-1 {last_top1(rows):.4f})")
        raise optuna.TrialPruned()
    if state == "failed":
        run.write_error(message)
        trial.set_user_attr("error", message)
        log.info(f"trial {trial.number}: failed: {message}")
        raise TrialFailed(message)
    log.info(f"trial {trial.number}: {'test' if spec.on_test else 'validation'} top-1 {value:.4f} after "
             f"{len(rows)} epoch(s)")
    if job.tracking:
        publish_run(run_dir)
    return float(value)


def last_top1(rows: list) -> Optional[float]:
    values = [r["test_top1"] for r in rows if r.get("test_top1") is not None]
    return values[-1] if values else None


def run_worker(job: StudyJob, threads: int, stop_after: Optional[int] = None) -> tuple[str, str]:
    """One worker: run the study's trials until it has its number (counted over every process). Signature of a
    launcher's work function (`launchers.run_with_ray/slurm`, `ablate.execute`); `stop_after` is unused."""
    torch.set_num_threads(threads)
    # reproducible in one process; separate commands sharing a --storage draw different points
    optuna, study = open_study(job, salt=1000 * job.worker + (os.getpid() % 1000 if job.storage else 0))
    n_trials, mine = job.spec.trials, []

    def objective(trial):
        if counted(study.get_trials(deepcopy=False), below=trial.number) >= n_trials:
            trial.set_user_attr("surplus", True)  # another process took the last trial first
            study.stop()
            raise optuna.TrialPruned()
        mine.append(trial.number)
        return run_trial(optuna, study, trial, job)

    def stop_when_complete(study, _trial) -> None:
        if study_complete(study.get_trials(deepcopy=False), n_trials):
            study.stop()

    if not study_complete(study.get_trials(deepcopy=False), n_trials):
        study.optimize(objective, callbacks=[stop_when_complete], catch=(TrialFailed,), gc_after_trial=False)
    return "done", f"{len(mine)} trial(s) run"


@dataclass
class WorkerRun:
    """A worker as the launchers see a run: a label, a folder for its logs and errors, and its job."""

    label: str
    run_dir: Path
    config: StudyJob


# ----------------------------------------------------------------------------- the study

def run_study(spec: TuneSpec, *, out: Optional[Path] = None, storage: Optional[str] = None,
              study_name: Optional[str] = None, overrides: Optional[dict] = None, parallel: int = 1,
              launcher: str = "local", launch: Optional[LaunchOptions] = None, retrain: bool = True,
              command: str = "") -> dict:
    """Run (or continue) a study, then write its results, plots, best.yaml and the retrained best; returns the
    summary (also in tune.json)."""
    optuna_module()
    if parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {parallel}")
    launch = launch or LaunchOptions()
    launch.check()
    overrides = dict(overrides or {})
    study_dir = Path(out) if out else default_study_dir(spec)
    name = study_name or spec.name
    study_dir.mkdir(parents=True, exist_ok=True)
    if spec.text:
        atomic_write(study_dir / "spec.yaml", spec.text)
    manifest_path = study_dir / MANIFEST
    previous = json.loads(manifest_path.read_text()).get("commands", []) if manifest_path.is_file() else []
    commands = previous if previous[-1:] == [command] else previous + [command]
    atomic_write(manifest_path, json.dumps({"spec": spec.name, "study": name, "storage": storage or JOURNAL,
                                            "commands": commands}, indent=2))
    job = StudyJob(spec=spec, study_dir=str(study_dir), storage=storage, study_name=name, overrides=overrides)
    optuna, study = open_study(job)
    requeue_orphans(optuna, study)
    if overrides.get("track") == "mlflow":
        job = dataclasses.replace(job, tracking=open_sweep(study_dir, name, {"spec": spec.name, "trials": spec.trials,
                                                                             "command": command},
                                                           overrides.get("tracking_uri")))
    done = counted([t for t in study.get_trials(deepcopy=False) if t.state.is_finished()])
    log.info(f"study {name} in {study_dir}: {spec.trials} trial(s) requested, {done} finished; "
             + (f"trials are scored on the test set (the spec says `tune_on_test: true`)" if spec.on_test else
                f"trials are scored on {spec.val_split:.0%} of the training images held out as a validation split "
                f"(fixed seed); " + ("the test set is used once, for the retrained best configuration" if retrain
                                     else "the test set is not read (--no-retrain)")))
    started = time.perf_counter()
    workers = parallel if launcher == "local" else max(1, parallel)
    if not study_complete(study.get_trials(deepcopy=False), spec.trials):
        runs = [WorkerRun(f"worker {i}", study_dir / "workers" / f"w{i}", dataclasses.replace(job, worker=i))
                for i in range(workers)]
        if launcher == "ray":
            outcomes = run_with_ray(runs, run_worker, stop_after=None, on_finish=worker_done, options=launch)
        elif launcher == "slurm":
            outcomes = run_with_slurm(runs, run_worker, stop_after=None, on_finish=worker_done, options=launch,
                                      folder=study_dir / "slurm", name=f"isoconv-tune-{spec.name}", parallel=parallel)
        elif workers == 1:
            outcomes = [(runs[0], *run_worker(job, torch.get_num_threads()))]
        else:
            outcomes = execute(runs, parallel=workers, stop_after=None, on_finish=worker_done, work=run_worker)
        failed = [(r, m) for r, s, m in outcomes if s == "failed"]
        if failed:
            raise UserError(f"{len(failed)} tuning worker(s) failed (first: {failed[0][1]}); rerun the command to "
                            f"continue the study")
    _, study = open_study(job)
    summary = summarise(optuna, study, spec, study_dir)
    summary["tuning_minutes_this_command"] = (time.perf_counter() - started) / 60
    write_results(study_dir, summary)
    write_plots(optuna, study, study_dir)
    if summary["best"] is not None:
        write_best_recipe(spec, summary, study_dir, overrides, command)
        if retrain:
            summary["retrained"] = retrain_best(spec, summary, study_dir, overrides)
    atomic_write(manifest_path, json.dumps({"spec": spec.name, "study": name, "storage": storage or JOURNAL,
                                            "commands": commands, "summary": summary}, indent=2, default=str))
    if job.tracking:
        publish_sweep(study_dir, failed=summary["failed"])
    return summary


def worker_done(r: WorkerRun, state: str, message: str) -> None:
    log.info(f"[{r.label}] {state}: {message}")


def summarise(optuna, study, spec: TuneSpec, study_dir: Path) -> dict:
    trials = study.get_trials(deepcopy=False)
    gone = replaced(trials)
    rows = []
    for t in trials:
        if t.number in gone or t.user_attrs.get("surplus") or not t.state.is_finished():
            continue
        a = t.user_attrs
        value = t.value if t.state.name == "COMPLETE" else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        rows.append({"trial": t.number, "state": t.state.name.lower(), "top1": value, **t.params,
                     "epochs": a.get("epochs"), "epochs_planned": a.get("epochs_planned"),
                     "train_seconds": a.get("train_seconds"), "run_dir": a.get("run_dir"),
                     "error": a.get("error", "")})
    pruned = [r for r in rows if r["state"] == "pruned"]
    saved = sum((r["epochs_planned"] - r["epochs"]) * r["train_seconds"] / r["epochs"]
                for r in pruned if r["epochs"])
    complete = [r for r in rows if r["state"] == "complete"]
    best = max(complete, key=lambda r: r["top1"]) if complete else None
    return {"trials": rows, "params": list(spec.space), "requested": spec.trials, "finished": len(rows),
            "complete": len(complete), "pruned": len(pruned), "failed": sum(r["state"] == "fail" for r in rows),
            "train_minutes": sum(r["train_seconds"] or 0 for r in rows) / 60, "saved_minutes": saved / 60,
            "scored_on": "test" if spec.on_test else "validation",
            "split": ("the test set (the spec says `tune_on_test: true`)" if spec.on_test else
                      f"a validation split of {spec.val_split:.0%} of the training images (fixed seed)"),
            "best": best, "pruner": spec.pruner}


def fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_results(study_dir: Path, summary: dict) -> None:
    cols = ["trial", "state", "top1", *summary["params"], "epochs", "train_seconds", "run_dir", "error"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(cols)
    for r in summary["trials"]:
        writer.writerow([r.get(c) if r.get(c) is not None else "" for c in cols])
    atomic_write(study_dir / "results.csv", buf.getvalue())
    score = "test top-1" if summary["scored_on"] == "test" else "val top-1"
    lines = [f"# Tuning results: {summary['finished']} of {summary['requested']} trials", "",
             f"Trials scored on {summary['split']}. {summary_line(summary)}", "",
             "| " + " | ".join(score if c == "top1" else c for c in cols[:-1]) + " |",
             "|" + "---|" * (len(cols) - 1)]
    for r in sorted(summary["trials"], key=lambda r: (r["top1"] is None, -(r["top1"] or 0))):
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols[:-1]) + " |")
    atomic_write(study_dir / "results.md", "\n".join(lines) + "\n")


def duration(minutes: float) -> str:
    return f"{minutes * 60:.1f} s" if minutes < 2 else f"{minutes:.1f} min"


def summary_line(summary: dict) -> str:
    return (f"{summary['complete']} complete, {summary['pruned']} pruned ({summary['pruner']}), {summary['failed']} "
            f"failed; the trials trained {duration(summary['train_minutes'])}, and pruning saved about "
            f"{duration(summary['saved_minutes'])} against running the pruned trials to their last epoch "
            f"(estimated from each pruned trial's own time per epoch).")


def write_plots(optuna, study, study_dir: Path) -> list[Path]:
    """Optuna's matplotlib views: history, importances, slice, parallel coordinates (those the trials allow)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    views = optuna.visualization.matplotlib
    paths = []
    (study_dir / "plots").mkdir(exist_ok=True)
    for stem, plot in (("history", views.plot_optimization_history), ("importances", views.plot_param_importances),
                       ("slice", views.plot_slice), ("parallel", views.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # too few complete trials for this view
            log.info(f"plot {stem} skipped: {e}")
            continue
        ax = axes.flat[0] if hasattr(axes, "flat") else axes
        fig = ax.figure
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        matplotlib.pyplot.close(fig)
        path = study_dir / "plots" / f"{stem}.png"
        atomic_write(path, buf.getvalue())
        paths.append(path)
    return paths


def recipe_dict(cfg: TrainConfig, description: str, tuned: tuple = ()) -> dict:
    """The settings of cfg that a recipe carries: the tuned ones, and those not at TrainConfig's default (runtime
    ones and the choice of evaluation images aside)."""
    default = TrainConfig()
    out = {"description": description}
    for name in SETTINGS:
        if name in RUNTIME_FIELDS or name in PROVENANCE or name in EVALUATION:
            continue
        value = getattr(cfg, name)
        if value != getattr(default, name) or name in tuned:
            out[name] = value
    return out


def write_best_recipe(spec: TuneSpec, summary: dict, study_dir: Path, overrides: dict, command: str) -> Path:
    best = summary["best"]
    params = {n: best[n] for n in spec.space}
    cfg = trial_config(spec, params, {k: v for k, v in overrides.items() if k not in RUNTIME_FIELDS}, final=True)
    text = recipe_dict(cfg, f"{spec.base or 'defaults'} tuned by `{command or 'isoconv tune ' + str(spec.path)}`: "
                            f"trial {best['trial']}, {summary['scored_on']} top-1 {best['top1']:.4f}", tuple(spec.space))
    path = study_dir / BEST_RECIPE
    atomic_write(path, yaml.safe_dump(text, sort_keys=False))
    log.info(f"best trial {best['trial']}: {', '.join(f'{n}={fmt(best[n])}' for n in spec.space)} "
             f"({summary['scored_on']} top-1 {best['top1']:.4f}); recipe in {path}")
    return path


def retrain_best(spec: TuneSpec, summary: dict, study_dir: Path, overrides: dict) -> dict:
    """Train the best configuration on the whole training set and test it once (kept if already done)."""
    best = summary["best"]
    cfg = dataclasses.replace(trial_config(spec, {n: best[n] for n in spec.space}, overrides, final=True),
                              out=str(study_dir / BEST_RUN))
    run = RunDir(cfg.out)
    if run.read_summary() is None:
        log.info(f"retraining the best configuration on the whole training set in {run.path}; the test set is "
                 f"read now, once")
        with training_log_copy(run.path):
            state, message = train_one(cfg, None)
        if state != "done":
            raise UserError(f"retraining the best configuration in {run.path} {state}: {message}; rerun the command")
    result = run.read_summary()
    log.info(f"test top-1 of the retrained best configuration: {result['test_top1']:.4f} "
             f"({TEST_NOTE[spec.on_test]}); run folder {run.path}")
    return {"run_dir": str(run.path), "test_top1": result["test_top1"], "test_top5": result.get("test_top5")}
