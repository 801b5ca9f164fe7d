"""`--track mlflow`: a sweep tracked on an MLflow server started here (SQLite backend) as one parent run with a child
per variant x seed, and `isoconv train` tracked in the default local store (mlruns/); everything is read back
through mlflow.search_runs."""
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from isoconv.cli import main
from isoconv.errors import UserError
from isoconv.train.tracking import PARENT_TAG, mlflow_client

TINY = {"model": "cm-cpu", "dim": 8, "depth": 1, "train_subset": 64, "test_subset": 32, "batch_size": 32,
        "epochs": 2, "amp": "off", "device": "cpu"}
SERVER_START_SECONDS = 120


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
