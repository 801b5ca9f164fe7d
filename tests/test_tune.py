"""`isoconv tune`: a study on tiny synthetic data whose answer is known, bad specs, the held-out validation split,
a kill -9 in the middle of a trial (real processes), and two processes sharing one study."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml

from isoconv.cli import main
from isoconv.config import TrainConfig
from isoconv.data import load_data
from isoconv.train import loop
from isoconv.train.tracking import NoLogger
from isoconv.experiments import tune
from isoconv.experiments.tune import make_pruner, make_sampler
from isoconv.experiments.tune_spec import load_tune_spec, trial_config

# one thread: on a busy 2-core box a 2-thread OpenMP op on these tiny tensors is many times slower
pytestmark = pytest.mark.usefixtures("one_cpu_thread")

REPO = Path(__file__).resolve().parents[1]
TRAIN_PER_BATCH, TEST_IMAGES = 60, 100  # 300 training images, 10 classes

# A model small enough for a trial to take about a second: 16 channels, one block, 8x8 images (resized once).
TINY = {"model": "cm-cpu", "dim": 16, "depth": 1, "patch": 2, "image_size": 8, "batch_size": 32, "amp": "off",
        "device": "cpu", "download": False}


def make_cifar(root: Path, seed: int = 0) -> Path:
    """A CIFAR-10 layout of easy images: each class a fixed colour plus noise, so a good learning rate reaches
    ~95% in a few epochs and a bad one stays near chance."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, size=(10, 3))

    def batch(n):
        labels = rng.integers(0, 10, size=n)
        x = colours[labels][:, :, None] + rng.normal(0, 25, size=(n, 3, 1024))
        return {b"data": np.clip(x, 0, 255).astype(np.uint8).reshape(n, 3072), b"labels": labels.tolist()}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(TRAIN_PER_BATCH)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(TEST_IMAGES)))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory):
    return make_cifar(tmp_path_factory.mktemp("easy"))


def write_spec(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def lr_spec(path: Path, **extra) -> Path:
    """One learning rate per two decades; only 1e-2 trains this model on this data in 4 epochs."""
    return write_spec(path, description="known answer: only lr 1e-2 trains", settings={**TINY, "epochs": 4},
                      space={"lr_max": {"choice": [1.0e-6, 1.0e-4, 1.0e-2, 100.0, 1.0e4]}}, trials=5, sampler="grid",
                      val_split=0.2, **extra)


@pytest.fixture(scope="module")
def lr_study(easy_data, tmp_path_factory, one_cpu_thread):
    tmp = tmp_path_factory.mktemp("lr-study")
    out = tmp / "study"
    code = main(["tune", str(lr_spec(tmp / "lr.yaml")), "--data-dir", str(easy_data), "--out", str(out)])
    return code, out


def test_known_answer_study_finds_the_good_decade_and_prunes(lr_study):
    code, out = lr_study
    assert code == 0
    manifest = json.loads((out / "tune.json").read_text())
    summary = manifest["summary"]
    assert summary["finished"] == 5 and summary["best"]["lr_max"] == pytest.approx(1e-2)
    assert summary["best"]["top1"] > 0.8  # the good decade trains ...
    others = [t for t in summary["trials"] if t["lr_max"] != pytest.approx(1e-2)]
    assert len(others) == 4 and all((t["top1"] or 0) < 0.75 for t in others)  # ... the others do not
    assert summary["pruned"] >= 1
    pruned = [t for t in summary["trials"] if t["state"] == "pruned"]
    assert all(t["epochs"] < 4 for t in pruned)  # stopped early: they trained fewer epochs than planned
    assert summary["saved_minutes"] > 0
    # results table: one row per trial, the best first
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 and rows[0].startswith("trial,state,top1,lr_max,epochs")
    table = (out / "results.md").read_text()
    assert "validation split of 20% of the training images" in table and f"{summary['pruned']} pruned (asha)" in table
    for plot in ("history", "importances", "slice", "parallel"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000
    # the best configuration was retrained on the whole training set and tested once
    best_run = json.loads((out / "best" / "summary.json").read_text())
    assert summary["retrained"]["test_top1"] == best_run["test_top1"] > 0.8
    best_config = yaml.safe_load((out / "best" / "config.yaml").read_text())
    assert best_config["val_split"] is None and best_config["lr_max"] == pytest.approx(1e-2)
    trial_config = yaml.safe_load((out / summary["best"]["run_dir"] / "config.yaml").read_text())
    assert trial_config["val_split"] == 0.2


def test_known_answer_study_says_where_it_scored(lr_study, easy_data, capsys):
    # the study ran in the fixture; its closing lines are in tune.json's summary and results.md: run the same
    # command again, which finds the study complete, trains nothing and prints the report
    code, out = lr_study
    spec = out.parent / "lr.yaml"
    before = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/summary.json")}
    capsys.readouterr()
    assert main(["tune", str(spec), "--data-dir", str(easy_data), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/summary.json")} == before
    assert "trials were scored on a validation split of 20% of the training images (fixed seed)" in text
    assert "test top-1" in text and "the test set was read once, after tuning" in text


def test_best_yaml_is_a_recipe_that_trains(lr_study, easy_data, tmp_path):
    _, out = lr_study
    recipe = yaml.safe_load((out / "best.yaml").read_text())
    assert recipe["lr_max"] == pytest.approx(1e-2) and "val_split" not in recipe and "out" not in recipe
    run = tmp_path / "from-best"
    assert main(["train", "--recipe", str(out / "best.yaml"), "--data-dir", str(easy_data), "--out", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["test_top1"] > 0.8


def test_val_split_holds_out_training_images(easy_data):
    cfg = TrainConfig(dataset="cifar10", data_dir=str(easy_data), download=False, val_split=0.2)
    train, val = load_data(cfg, torch.device("cpu"))
    _, test = load_data(TrainConfig(dataset="cifar10", data_dir=str(easy_data), download=False), torch.device("cpu"))
    assert len(train) == 240 and len(val) == 60 and len(test) == TEST_IMAGES
    assert val.split == "val"
    everything = {tuple(img.flatten()[:64].tolist()) for img in torch.cat([train.images, val.images])}
    assert len(everything) == 300  # the two parts are disjoint and together the whole training set
    train2, val2 = load_data(cfg, torch.device("cpu"))
    assert torch.equal(val.images, val2.images) and torch.equal(train.labels, train2.labels)  # fixed seed


BAD_SPECS = {
    "tune: unknown parameter": ({"lr": {"log": [1e-4, 1e-1]}}, {},
                                "unknown parameter 'lr' in `space` of tuning spec {spec} (did you mean lr_max"),
    "tune: empty range": ({"lr_max": {"log": [0.01, 0.01]}}, {}, "the range [0.01, 0.01] is empty"),
    "tune: inverted range": ({"depth": {"int": [12, 4]}}, {}, "the range [12, 4] is inverted"),
    "tune: log range touching 0": ({"wd": {"log": [0, 0.1]}}, {}, "a log range must lie above 0, got [0, 0.1]"),
    "tune: tuning on the test set": ({"lr_max": {"log": [1e-4, 1e-1]}}, {"objective": "test_top1"},
                                     "tunes on the test set (`objective: test_top1`)"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_one_line_exit_2_nothing_created(case, tmp_path, capsys):
    space, extra, message = BAD_SPECS[case]
    spec = write_spec(tmp_path / "bad.yaml", base="cpu-quick", space=space, trials=2, **extra)
    out = tmp_path / "study"
    assert main(["tune", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("isoconv: error: ")
    assert message.format(spec=spec) in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_tuning_on_test_when_the_spec_says_so(tmp_path):
    spec = load_tune_spec(str(write_spec(tmp_path / "t.yaml", base="cpu-quick", objective="test_top1",
                                         tune_on_test=True, space={"lr_max": {"log": [1e-4, 1e-1]}})))
    assert spec.on_test


def test_bad_inputs_are_documented():
    doc = (REPO / "docs" / "errors.md").read_text()
    for name in BAD_SPECS:
        assert f"| {name} |" in doc, f"docs/errors.md has no row for {name!r}"


# ----------------------------------------------------------------------------- real processes

def tune_process(spec: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "isoconv", "tune", str(spec), "--data-dir", str(data), "--out",
                             str(out), "--no-retrain", *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finished_trials(study_name: str, storage) -> list:
    study = optuna.load_study(study_name=study_name, storage=storage)
    return study.get_trials(deepcopy=False)


def journal(out: Path):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "journal.log")))


def metric_rows(run: Path) -> list:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_kill_9_mid_trial_then_rerun_completes_without_rerunning_finished_trials(easy_data, tmp_path):
    spec = write_spec(tmp_path / "kill.yaml", settings={**TINY, "epochs": 6}, trials=3, sampler="random",
                      pruner="none", space={"lr_max": {"log": [3e-3, 3e-2]}})
    out = tmp_path / "study"
    proc = tune_process(spec, easy_data, out)
    victim = out / "trials" / "0001"
    deadline = time.monotonic() + 240
    while not (metric_rows(victim) and (victim / "last.pt").is_file()):  # trial 1 is under way
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "trial 1 never started"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rows_at_kill = metric_rows(victim)
    assert 1 <= len(rows_at_kill) < 6 and not (victim / "summary.json").exists()  # killed mid-trial
    first = out / "trials" / "0000" / "summary.json"
    first_written = first.stat().st_mtime_ns

    proc = tune_process(spec, easy_data, out)
    log_text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log_text
    assert "trial 1 was interrupted" in log_text
    assert first.stat().st_mtime_ns == first_written  # the finished trial did not run again
    trials = finished_trials("kill", journal(out))
    # trial 1 was closed and queued again (trial 2, in trial 1's folder); trials 0, 2 and 3 are the study's three
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert [t.user_attrs.get("resumes") for t in trials] == [None, None, 1, None]
    assert trials[2].params == trials[1].params and trials[2].user_attrs["run_dir"] == "trials/0001"
    resumed = metric_rows(victim)
    assert len(resumed) == 6 and resumed[:len(rows_at_kill)] == rows_at_kill  # resumed, not restarted
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001", "0003"]
    assert json.loads((out / "tune.json").read_text())["summary"]["finished"] == 3


def test_two_processes_share_one_study_without_duplicates(easy_data, tmp_path):
    spec = write_spec(tmp_path / "shared.yaml", settings={**TINY, "epochs": 8}, trials=4, sampler="random",
                      pruner="none", space={"lr_max": {"log": [3e-3, 3e-2]}})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    procs = [tune_process(spec, easy_data, tmp_path / "study", "--storage", storage) for _ in range(2)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    trials = finished_trials("shared", storage)
    real = [t for t in trials if not t.user_attrs.get("surplus")]
    assert len(real) == 4 and all(t.state.name == "COMPLETE" for t in real)
    assert len({t.user_attrs["run_dir"] for t in real}) == 4  # each trial trained once, in its own folder
    assert len({t.user_attrs["owner"]["pid"] for t in real}) == 2  # both processes ran trials
    for t in real:
        assert len(metric_rows(tmp_path / "study" / t.user_attrs["run_dir"])) == 8


def test_trial_and_final_configs(tmp_path):
    spec = load_tune_spec(str(write_spec(tmp_path / "s.yaml", base="cpu-quick", settings={"epochs": 3},
                                         budget_seconds=60, val_split=0.15,
                                         space={"lr_max": {"log": [1e-4, 1e-1]}, "depth": {"int": [2, 6]}})))
    trial = trial_config(spec, {"lr_max": 0.003, "depth": 4}, {"device": "cpu"})
    assert (trial.lr_max, trial.depth, trial.epochs, trial.model) == (0.003, 4, 3, "cm-cpu")  # recipe <- settings
    assert trial.val_split == 0.15 and trial.time_budget == 60 and trial.device == "cpu"
    final = trial_config(spec, {"lr_max": 0.003, "depth": 4}, final=True)
    assert final.val_split is None and final.time_budget is None and final.lr_max == 0.003


def test_pruner_and_sampler_choices(tmp_path):
    kinds = {}
    for pruner, sampler in (("asha", "tpe"), ("median", "random"), ("none", "qmc")):
        spec = load_tune_spec(str(write_spec(tmp_path / f"{pruner}.yaml", base="cpu-quick", pruner=pruner,
                                             sampler=sampler, min_epochs=2, space={"wd": {"float": [0.0, 0.1]}})))
        kinds[pruner] = (type(make_pruner(optuna, spec)).__name__, type(make_sampler(optuna, spec, 0)).__name__)
    assert kinds == {"asha": ("SuccessiveHalvingPruner", "TPESampler"), "median": ("MedianPruner", "RandomSampler"),
                     "none": ("NopPruner", "QMCSampler")}


def test_grid_sampler_needs_choices_and_tuned_settings_stay_off_the_command_line(tmp_path, capsys):
    spec = write_spec(tmp_path / "g.yaml", base="cpu-quick", sampler="grid", space={"lr_max": {"log": [1e-4, 1e-1]}})
    assert main(["tune", str(spec), "--out", str(tmp_path / "o")]) == 2
    assert "`sampler: grid` in tuning spec" in capsys.readouterr().err
    spec = write_spec(tmp_path / "c.yaml", base="cpu-quick", space={"lr_max": {"log": [1e-4, 1e-1]}})
    assert main(["tune", str(spec), "--set", "lr_max=0.1", "--out", str(tmp_path / "o")]) == 2
    assert "lr_max is tuned by" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_track_mlflow_parent_run_with_a_child_per_trial(easy_data, tmp_path, monkeypatch):
    """tune's side of --track mlflow: one parent (the study), a child per trial opened before it trains, with the
    trial's settings, published when it finishes. The MLflow calls are recorded here instead of made (they are
    the ones `isoconv ablate` uses; tests/test_tracking.py runs them against a real MLflow server)."""
    calls = []
    monkeypatch.setattr(tune, "open_sweep", lambda d, name, params, uri: calls.append(("sweep", name, uri))
                        or (uri, "PARENT"))
    monkeypatch.setattr(tune, "open_child", lambda d, name, config, uri, parent: calls.append(
        ("child", name, parent, config["lr_max"], config["tracking_uri"], Path(d).name)))
    monkeypatch.setattr(tune, "publish_run", lambda d: calls.append(("publish", Path(d).name)))
    monkeypatch.setattr(tune, "publish_sweep", lambda d, failed: calls.append(("publish sweep", failed)))
    monkeypatch.setattr(loop, "open_tracker", lambda cfg, run, enabled=True: NoLogger())
    monkeypatch.setattr(loop, "check_tracking", lambda uri: uri)  # no server behind the recorded calls
    spec = write_spec(tmp_path / "tracked.yaml", settings={**TINY, "epochs": 2}, trials=2, sampler="random",
                      pruner="none", space={"lr_max": {"log": [3e-3, 3e-2]}})
    out = tmp_path / "study"
    assert main(["tune", str(spec), "--data-dir", str(easy_data), "--out", str(out), "--no-retrain",
                 "--track", "mlflow", "--tracking-uri", "http://mlflow.invalid:5000"]) == 0
    lrs = [yaml.safe_load((out / f"trials/000{n}/config.yaml").read_text())["lr_max"] for n in (0, 1)]
    assert calls == [("sweep", "tracked", "http://mlflow.invalid:5000"),
                     ("child", "trial0", "PARENT", lrs[0], "http://mlflow.invalid:5000", "0000"), ("publish", "0000"),
                     ("child", "trial1", "PARENT", lrs[1], "http://mlflow.invalid:5000", "0001"), ("publish", "0001"),
                     ("publish sweep", 0)]
