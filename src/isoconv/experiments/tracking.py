"""What `--track mlflow` adds once a run or a sweep has finished: the summary as metrics, the plots, and the run
(or sweep) folder as artifacts. The per-epoch part is the training loop's sink, `isoconv.train.tracking`.

A sweep is one parent MLflow run (recorded in SWEEP_DIR/tracking.json) with a child per variant x seed (each
recorded in its run folder before it trains, so the process that trains it, wherever it runs, logs to the child).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ..rundir import RunDir
from ..train.tracking import check_tracking, log_scalars, mlflow_client, open_run
from .report import write_run_report

log = logging.getLogger(__name__)

# files a run folder's artifacts leave out: the checkpoint before the last one, and the tracking record itself
SKIPPED = ("last.prev.pt", "tracking.json")
SWEEP_FILES = ("results.md", "results.csv", "report.md", "sweep.json", "spec.yaml")


def tracked(config: Optional[dict]) -> bool:
    return bool(config) and config.get("track") == "mlflow"


def log_folder(client, run_id: str, folder: Path, names: Optional[tuple[str, ...]] = None) -> None:
    """The files and subfolders of `folder` (or only `names`) as artifacts, under the same relative paths."""
    for path in sorted(folder.iterdir()):
        if path.name in SKIPPED or path.name.startswith(".") or (names is not None and path.name not in names
                                                                 and path.name != "plots"):
            continue
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=path.name)
        elif path.is_file():
            client.log_artifact(run_id, str(path))


def publish_run(run_dir: Path) -> Optional[str]:
    """For a finished run trained with --track mlflow: draw its plots (RUN_DIR/plots, report.md), log the summary's
    numbers as `summary.*` metrics and the run folder as artifacts, and mark the MLflow run finished. Returns the
    MLflow run id (None when the run is not tracked or not finished)."""
    run = RunDir(run_dir)
    record, summary = run.read_tracking(), run.read_summary()
    if not tracked(run.read_config()) or not record or summary is None:
        return None
    write_run_report(run.path)
    client, run_id = mlflow_client(record["uri"]), record["run_id"]
    log_scalars(client, run_id, summary, prefix="summary.")
    log_folder(client, run_id, run.path)
    client.set_terminated(run_id, "FINISHED")
    log.info(f"tracked in MLflow run {run_id} at {record['uri']}")
    return run_id


def open_sweep(sweep_dir: Path, name: str, params: dict, uri: Optional[str]) -> tuple[str, str]:
    """(tracking URI, parent run id) of a sweep, reopened when SWEEP_DIR/tracking.json records one."""
    uri = check_tracking(uri)
    _, run_id = open_run(RunDir(sweep_dir), uri, name, params,
                         tags={"isoconv.sweep_dir": str(Path(sweep_dir).resolve())})
    return uri, run_id


def open_child(run_dir: Path, name: str, config: dict, uri: str, parent_id: str) -> str:
    """The child run of one variant x seed, created (and recorded in its run folder) before it trains."""
    _, run_id = open_run(RunDir(run_dir), uri, name, config, parent_id=parent_id,
                         tags={"isoconv.run_dir": str(Path(run_dir).resolve())})
    return run_id


def publish_sweep(sweep_dir: Path, failed: int) -> None:
    """The sweep's results tables, report, manifest and plots as artifacts of its parent run."""
    record = RunDir(sweep_dir).read_tracking()
    if not record:
        return
    client, run_id = mlflow_client(record["uri"]), record["run_id"]
    log_folder(client, run_id, Path(sweep_dir), names=SWEEP_FILES)
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
    log.info(f"sweep tracked in MLflow run {run_id} (one child run per variant x seed) at {record['uri']}")


def publish_tracked(summary: Optional[dict]) -> None:
    """After `isoconv train` (summary None: stopped early, or not rank 0): publish the run if it is tracked."""
    if summary:
        publish_run(Path(summary["run_dir"]))
