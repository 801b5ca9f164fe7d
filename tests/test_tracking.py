"""`--track mlflow`: a sweep tracked on an MLflow server started here (SQLite backend) as one parent run with a child
per variant x seed, and `isoconv train` tracked in the default local store (mlruns/); everything is read back
through mlflow.search_runs."""
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from isoconv.cli import main
from isoconv.errors import UserError
from isoconv.config import build_config
from isoconv.rundir import RunDir
from isoconv.train import tracking
from isoconv.train.tracking import (PARENT_TAG, check_tracking, local_artifact_root, mlflow_client, open_tracker,
                                    resolve_uri)

TINY = {"model": "cm-cpu", "dim": 8, "depth": 1, "train_subset": 64, "test_subset": 32, "batch_size": 32,
        "epochs": 2, "amp": "off", "device": "cpu"}
SERVER_START_SECONDS = 120
SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_SECONDS
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start within {SERVER_START_SECONDS} s:\n"
                            f"{(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def search(uri: str, **kwargs):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["isoconv"], **kwargs)


def artifacts(uri: str, run_id: str, path=None) -> set[str]:
    return {a.path for a in mlflow_client(uri).list_artifacts(run_id, path)}


def test_sweep_is_a_parent_run_with_a_child_per_run_on_a_server(mlflow_server, data_root, tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({"description": "tracked", "seeds": 1, "settings": TINY,
                                    "variants": [{"name": "relu", "activation": "relu"},
                                                 {"name": "gelu", "activation": "gelu"}]}))
    out = tmp_path / "sweep"
    assert main(["ablate", str(spec), "--out", str(out), "--data-dir", str(data_root), "--track", "mlflow",
                 "--tracking-uri", mlflow_server]) == 0
    runs = search(mlflow_server)
    parent = runs[runs[f"tags.{PARENT_TAG}"].isna()]
    children = runs[runs[f"tags.{PARENT_TAG}"].notna()]
    assert len(parent) == 1 and len(children) == 2
    parent_id = parent.run_id.iloc[0]
    assert set(children[f"tags.{PARENT_TAG}"]) == {parent_id}
    assert set(children["tags.mlflow.runName"]) == {"relu/seed0", "gelu/seed0"}
    assert set(runs.status) == {"FINISHED"}
    assert {"results.md", "results.csv", "sweep.json", "plots"} <= artifacts(mlflow_server, parent_id)
    for _, child in children.iterrows():
        run_dir = out / child["tags.mlflow.runName"]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert child["metrics.summary.test_top1"] == pytest.approx(summary["test_top1"])
        assert child["params.activation"] == child["tags.mlflow.runName"].split("/")[0]
        assert child["params.epochs"] == "2"
        history = mlflow_client(mlflow_server).get_metric_history(child.run_id, "train_loss")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
            [(r["epoch"], pytest.approx(r["train_loss"])) for r in rows]
        assert {"summary.json", "metrics.jsonl", "config.yaml", "last.pt", "plots"} <= \
            artifacts(mlflow_server, child.run_id)
        assert any(p.endswith(".png") for p in artifacts(mlflow_server, child.run_id, "plots"))
    # rerun: nothing trains, the same parent run is reused
    assert main(["ablate", str(spec), "--out", str(out), "--data-dir", str(data_root), "--track", "mlflow",
                 "--tracking-uri", mlflow_server]) == 0
    assert len(search(mlflow_server)) == 3


def test_train_tracks_into_the_default_local_store(data_root, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    args = ["train", "--data-dir", str(data_root), "--out", "runs/a", "--track", "mlflow"]
    for key, value in TINY.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    assert main(args) == 0
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert (tmp_path / "mlruns" / "artifacts").is_dir()
    runs = search(uri)
    assert len(runs) == 1
    run = runs.iloc[0]
    summary = json.loads((tmp_path / "runs" / "a" / "summary.json").read_text())
    assert run["metrics.test_top1"] == pytest.approx(summary["test_top1"])
    assert run["params.model"] == "cm-cpu" and run["tags.mlflow.runName"] == "a"
    assert {"summary.json", "report.md", "plots"} <= artifacts(uri, run.run_id)
    assert json.loads((tmp_path / "runs" / "a" / "tracking.json").read_text())["run_id"] == run.run_id


def test_missing_mlflow_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(UserError, match=r"^--track mlflow needs the mlflow package; `pip install 'isoconv\[mlflow\]'`"):
        mlflow_client("sqlite:///x.db")


# ---- every tracking URI form MLflow documents reaches the place it names (was: `file:DIR` wrote ./file:/DIR/...,
# `sqlite:///rel.db` crashed in local_artifact_root and left rel.db behind)

def uri_forms(tmp_path):
    """(--tracking-uri, the SQLite database it must reach), run from the working directory tmp_path/cwd."""
    store = tmp_path / "store"
    return {"bare relative folder": ("store", store / "mlflow.db"),
            "bare absolute folder": (str(store), store / "mlflow.db"),
            "file:relative": ("file:store", store / "mlflow.db"),
            "file:/absolute": (f"file:{store}", store / "mlflow.db"),
            "file:///absolute": (store.as_uri(), store / "mlflow.db"),
            "file://localhost/absolute": (f"file://localhost{store}", store / "mlflow.db"),
            "sqlite:///relative.db": ("sqlite:///rel.db", tmp_path / "cwd" / "rel.db"),
            "sqlite:////absolute.db": (f"sqlite:///{tmp_path / 'abs.db'}", tmp_path / "abs.db")}


@pytest.mark.parametrize("form", list(uri_forms(Path("/x"))))
def test_each_local_uri_form_resolves_to_the_store_it_names(form, tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    uri, db = uri_forms(tmp_path)[form]
    if form.startswith("bare relative") or form == "file:relative":
        db = tmp_path / "cwd" / "store" / "mlflow.db"
    assert resolve_uri(uri) == f"sqlite:///{db}"
    assert local_artifact_root(resolve_uri(uri)) == (db.parent / "artifacts").as_uri()


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://mlflow.example.org", "databricks",
                                 "postgresql://user@host/db"])
def test_servers_and_other_stores_are_used_as_given(uri):
    assert resolve_uri(uri) == uri


@pytest.mark.parametrize("uri, message", [
    ("file://otherhost/x", "names a folder on another host (otherhost); pass a local folder, or the URL of an MLflow "
                           "server"),
    ("sqlite:///", "names no database file; pass sqlite:///FILE.db (relative) or sqlite:////ABSOLUTE/FILE.db"),
    ("sqlite://", "names no database file")])
def test_uris_naming_no_local_store_are_one_line_errors(uri, message):
    with pytest.raises(UserError, match="^--tracking-uri " + re.escape(uri) + " " + re.escape(message)):
        resolve_uri(uri)


def test_every_local_form_tracks_into_the_store_it_names(tmp_path, monkeypatch):
    """What MlflowTracker writes (a run with one epoch's metrics) is found at the named store, and nothing lands
    in the working directory (no `file:` folder, no stray database). The file: forms (each store costs seconds to
    create; the bare folder is test_train_tracks_into_the_default_local_store's, sqlite:///rel.db the real process
    test's)."""
    pytest.importorskip("mlflow")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    cfg = build_config(None, **{**TINY, "track": "mlflow"})
    forms = {k: v for k, v in uri_forms(tmp_path).items() if k.startswith("file:") and "localhost" not in k}
    for i, (form, (uri, db)) in enumerate(forms.items()):
        if form in ("bare relative folder", "file:relative"):
            db = tmp_path / "cwd" / "store" / "mlflow.db"
        tracker = open_tracker(dataclasses.replace(cfg, tracking_uri=uri), RunDir(tmp_path / "runs" / str(i)))
        tracker.log_epoch({"epoch": 1, "train_loss": float(i)})
        tracker.close()
        assert db.is_file(), form
        assert (db.parent / "artifacts").as_uri() == mlflow_client(f"sqlite:///{db}").get_experiment_by_name(
            "isoconv").artifact_location, form
        history = mlflow_client(f"sqlite:///{db}").get_metric_history(tracker.run_id, "train_loss")
        assert [(m.step, m.value) for m in history] == [(1, float(i))], form
    assert sorted(p.name for p in (tmp_path / "cwd").iterdir()) == ["store"]


def test_sqlite_relative_uri_trains_in_a_real_process(data_root, tmp_path):
    """Was: a traceback from local_artifact_root, and rel.db left behind."""
    pytest.importorskip("mlflow")
    args = ["train", "--data-dir", str(data_root), "--out", "run", "--track", "mlflow", "--tracking-uri",
            "sqlite:///rel.db", "--epochs", "1"]
    for key, value in TINY.items():
        if key != "epochs":
            args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run([sys.executable, "-m", "isoconv", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=str(SRC)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = search(f"sqlite:///{tmp_path / 'rel.db'}")
    assert len(runs) == 1 and runs.iloc[0]["tags.mlflow.runName"] == "run"
    assert (tmp_path / "artifacts").is_dir()


def test_an_unreachable_server_is_one_line_at_start_up_in_a_real_process(data_root, tmp_path):
    """Was: silent for 253 s of MLflow's retries, then a 131-line traceback. Port 9 (discard) has no server here."""
    port = free_port()  # bound and released: nothing listens on it
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.run([sys.executable, "-m", "isoconv", "train", "--data-dir", str(data_root), "--out", "run",
                           "--track", "mlflow", "--tracking-uri", uri, "--model", "cm-cpu", "--epochs", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(SRC)))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"isoconv: error: --tracking-uri {uri}: cannot reach the MLflow tracking server at 127.0.0.1:{port} within 5 s "
        f"(Connection refused); start it (`mlflow server`), or pass a folder to track locally"]
    assert list(tmp_path.iterdir()) == []  # no run folder, no store


def test_a_server_that_does_not_answer_times_out_quickly(monkeypatch):
    def no_answer(address, timeout):
        assert timeout == tracking.SERVER_TIMEOUT
        raise socket.timeout("timed out")
    monkeypatch.setattr(socket, "create_connection", no_answer)
    with pytest.raises(UserError, match=r"^--tracking-uri https://mlflow.invalid: cannot reach the MLflow tracking "
                                        r"server at mlflow.invalid:443 within 5 s \(no answer\)"):
        check_tracking("https://mlflow.invalid")


def test_a_server_behind_a_proxy_is_left_to_the_proxy(monkeypatch):
    monkeypatch.setenv("https_proxy", "http://proxy.invalid:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("connected directly"))
    assert check_tracking("https://mlflow.example.org") == "https://mlflow.example.org"


def test_an_unreachable_server_stops_a_sweep_before_anything_is_written(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({"description": "tracked", "seeds": 1, "settings": TINY,
                                    "variants": [{"name": "relu", "activation": "relu"}]}))
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["ablate", str(spec), "--out", str(tmp_path / "sweep"), "--track", "mlflow", "--tracking-uri",
                 uri]) == 2
    assert capsys.readouterr().err.strip().startswith(f"isoconv: error: --tracking-uri {uri}: cannot reach the MLflow "
                                                      f"tracking server at 127.0.0.1:")
    assert not (tmp_path / "sweep").exists()


def test_a_store_under_a_file_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    uri = str(tmp_path / "notes.txt" / "mlruns")
    with pytest.raises(UserError, match=f"^--tracking-uri {re.escape(uri)}: cannot write the store's folder "
                                        f"{re.escape(uri)} \\({re.escape(str(tmp_path / 'notes.txt'))} is not a "
                                        f"writable folder\\); pass a folder you can write$"):
        check_tracking(uri)
