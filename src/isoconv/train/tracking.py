"""MLflow sink of the training loop (`--track mlflow`), beside the TensorBoard one: the resolved settings as
params once, and every per-epoch scalar as a metric at step = epoch.

Which MLflow run tracks a run folder is recorded in RUN_DIR/tracking.json (tracking URI and run id), so a resumed
run, or one retried on another machine, continues the same MLflow run; a sweep creates that record beforehand to
make each run a child of the sweep's parent run. The client helpers here are also what the sweeps use.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
import urllib.parse
import urllib.request
from numbers import Real
from pathlib import Path
from typing import Any, Optional

from ..config import TrainConfig
from ..errors import UserError
from ..rundir import RunDir
from .tensorboard import NoLogger

EXPERIMENT = "isoconv"
DEFAULT_FOLDER = Path("mlruns")
STORE_FILE = "mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
SERVER_TIMEOUT = 5.0  # seconds a tracking server has to accept a connection at start-up


def mlflow_client(uri: str):
    """An MlflowClient for `uri`; a clear one-line error when mlflow is not installed."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError("--track mlflow needs the mlflow package; `pip install 'isoconv[mlflow]'` (or "
                        "`pip install mlflow`), or drop --track") from None
    return MlflowClient(tracking_uri=uri)


def resolve_uri(uri: Optional[str]) -> str:
    """The tracking URI to use, for every form MLflow documents. A folder (a bare path, `file:DIR`, `file:/abs` or
    `file:///abs`; default `mlruns/`) becomes the SQLite store `FOLDER/mlflow.db` (MLflow 3 has no file store to
    write to), a `sqlite:///` database path an absolute one; both are absolute so that processes started
    elsewhere (Ray, Slurm) write to the same store. Artifacts of a local store go beside the database
    (FOLDER/artifacts). Servers (`http(s)://`) and other stores (`postgresql://`, `databricks`, ...) are used as
    given."""
    if not uri:
        return sqlite_uri(DEFAULT_FOLDER / STORE_FILE)
    if uri in ("databricks", "databricks-uc"):  # MLflow's names for a Databricks workspace's tracking
        return uri
    scheme = urllib.parse.urlsplit(uri).scheme.lower() if ":" in uri else ""
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or uri == "sqlite:///":
            raise UserError(f"--tracking-uri {uri} names no database file; pass sqlite:///FILE.db (relative) or "
                            f"sqlite:////ABSOLUTE/FILE.db")
        return sqlite_uri(Path(uri[len("sqlite:///"):]))
    if scheme == "file":
        parts = urllib.parse.urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise UserError(f"--tracking-uri {uri} names a folder on another host ({parts.netloc}); pass a local "
                            f"folder, or the URL of an MLflow server (http://HOST:PORT)")
        return sqlite_uri(Path(urllib.parse.unquote(parts.path)) / STORE_FILE)
    if scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive: a folder
        return uri
    return sqlite_uri(Path(uri) / STORE_FILE)


def sqlite_uri(db: Path) -> str:
    return "sqlite:///" + db.expanduser().resolve().as_posix()


def check_tracking(uri: Optional[str]) -> str:
    """The resolved tracking URI (`resolve_uri`), checked before anything trains: a local store's folder is
    creatable, and an http(s) server answers a TCP connection within SERVER_TIMEOUT seconds (MLflow itself retries
    for minutes, then prints a long traceback)."""
    resolved = resolve_uri(uri)
    parts = urllib.parse.urlsplit(resolved)
    if parts.scheme == "sqlite":
        folder = Path(resolved[len("sqlite:///"):]).parent
        existing = next((f for f in [folder, *folder.parents] if f.exists()), folder)
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"--tracking-uri {uri or DEFAULT_FOLDER}: cannot write the store's folder {folder} "
                            f"({existing} is not a writable folder); pass a folder you can write")
    elif parts.scheme in ("http", "https") and not proxied(parts):
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=SERVER_TIMEOUT).close()
        except (OSError, ValueError) as e:
            reason = "no answer" if isinstance(e, socket.timeout) else (getattr(e, "strerror", None) or str(e))
            raise UserError(f"--tracking-uri {uri}: cannot reach the MLflow tracking server at {host}:{port} within "
                            f"{SERVER_TIMEOUT:g} s ({reason}); start it (`mlflow server`), or pass a folder to track "
                            f"locally") from None
    return resolved


def proxied(parts: urllib.parse.SplitResult) -> bool:
    """Whether requests to this URL go through a proxy (then the proxy, not this machine, reaches the server)."""
    return bool(urllib.request.getproxies().get(parts.scheme)) and not urllib.request.proxy_bypass(parts.netloc)


def local_artifact_root(uri: str) -> Optional[str]:
    """Where a local SQLite store (made by resolve_uri) keeps artifacts: beside the database, not in the cwd."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).expanduser().resolve()
        return (db.parent / "artifacts").as_uri()
    return None


def experiment_id(client, uri: str, name: str = EXPERIMENT) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=local_artifact_root(uri))
    except Exception:  # created meanwhile by another process of the same sweep
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i:i + 100])


def log_scalars(client, run_id: str, values: dict[str, Any], step: int = 0, prefix: str = "") -> None:
    """Every finite real value of `values` as a metric (bools, None, strings and NaN are left out)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(prefix + k, float(v), now, step) for k, v in values.items()
               if not isinstance(v, bool) and isinstance(v, Real) and math.isfinite(v)]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def open_run(folder: RunDir, uri: str, name: str, params: dict[str, Any], *, parent_id: Optional[str] = None,
             tags: Optional[dict[str, str]] = None):
    """(client, run id) of the MLflow run recorded in `folder`, reopened, or of a new one (params logged once,
    recorded in folder/tracking.json). A record for another tracking URI is replaced."""
    client = mlflow_client(uri)
    record = folder.read_tracking()
    if record and record.get("uri") == uri and record.get("run_id"):
        try:
            client.update_run(record["run_id"], status="RUNNING")
            return client, record["run_id"]
        except Exception:  # deleted from the store: start a new one
            pass
    all_tags = dict(tags or {})
    if parent_id:
        all_tags[PARENT_TAG] = parent_id
    run = client.create_run(experiment_id(client, uri), run_name=name, tags=all_tags)
    run_id = run.info.run_id
    log_params(client, run_id, params)
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.write_tracking({"uri": uri, "run_id": run_id, "experiment_id": run.info.experiment_id,
                           **({"parent_run_id": parent_id} if parent_id else {})})
    return client, run_id


class MlflowTracker:
    """Logs each metrics row at step = epoch (a resumed run continues the same MLflow run)."""

    def __init__(self, cfg: TrainConfig, run: RunDir):
        uri = check_tracking(cfg.tracking_uri)
        self.client, self.run_id = open_run(run, uri, run.path.name, cfg.to_dict(),
                                            tags={"isoconv.run_dir": str(run.path.resolve())})

    def log_epoch(self, row: dict[str, Any]) -> None:
        log_scalars(self.client, self.run_id, {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


def open_tracker(cfg: TrainConfig, run: RunDir, enabled: bool = True):
    """An MlflowTracker for `cfg.track == "mlflow"` (when enabled: the process that writes files), else a sink
    that does nothing."""
    return MlflowTracker(cfg, run) if enabled and cfg.track == "mlflow" else NoLogger()
