"""What a run survives and how it says so: a full disk mid-run, its data folder vanishing, resuming a finished run,
a model that ends non-finite; and what config.yaml records."""
import errno
import json
import shutil
from pathlib import Path

import torch
import yaml

from isoconv import rundir
from isoconv.cli import main
from isoconv.weights import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "cm-cpu", "--dim", "16", "--depth", "1", "--epochs", "2", "--batch-size", "32",
        "--train-subset", "64", "--test-subset", "32", "--amp", "off", "--device", "cpu"]


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("isoconv: error: "), lines
    return lines[0]


def test_full_disk_while_writing_metrics_is_one_line_and_keeps_the_checkpoint(data_root, tmp_path, capsys,
                                                                              monkeypatch):
    real_append, calls = rundir.append_line, []

    def append_until_full(path, line):
        calls.append(path)
        if len(calls) == 2:  # epoch 2's metrics row
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_append(path, line)

    monkeypatch.setattr(rundir, "append_line", append_until_full)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--data-dir", str(data_root), "--out", str(run)]) == 2
    line = one_error_line(capsys)
    assert f"no space left on the device writing {run / 'metrics.jsonl'}" in line and "--resume" in line
    assert load_checkpoint(run / "last.pt")["epoch"] == 1  # the last good checkpoint is intact
    monkeypatch.setattr(rundir, "append_line", real_append)
    assert main(["train", "--resume", str(run)]) == 0
    assert [r["epoch"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2]


def test_data_folder_removed_mid_run_does_not_stop_training(data_root, tmp_path, capsys, monkeypatch):
    """The data is read into memory once; a folder deleted mid-run stops nothing, and a later `eval` that needs
    it says which folder is missing."""
    from isoconv.train.step import TrainStep

    data = tmp_path / "data"
    shutil.copytree(data_root / "cifar-10-batches-py", data / "cifar-10-batches-py")
    real_call = TrainStep.__call__

    def step_then_delete(self, *a, **k):
        out = real_call(self, *a, **k)
        shutil.rmtree(data, ignore_errors=True)
        return out

    monkeypatch.setattr(TrainStep, "__call__", step_then_delete)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--data-dir", str(data), "--out", str(run)]) == 0
    assert not data.exists() and json.loads((run / "summary.json").read_text())["epochs"] == 2
    capsys.readouterr()
    assert main(["eval", str(run), "--no-download"]) == 2
    line = one_error_line(capsys)
    assert f"CIFAR-10 not found at {data / 'cifar-10-batches-py'}" in line


def test_resume_of_a_finished_run_says_so_and_trains_nothing(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--data-dir", str(data_root), "--out", str(run)]) == 0
    stamp = (run / "last.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run} is finished (2 epochs, test top-1 " in out and "nothing to resume" in out
    assert "resuming" not in out and (run / "last.pt").stat().st_mtime_ns == stamp


def test_config_yaml_records_what_ran(data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").symlink_to(data_root)
    assert main(["train", "--model", "cm-cpu", "--epochs", "1", "--batch-size", "32", "--train-subset", "32",
                 "--test-subset", "32", "--data-dir", "d", "--out", "run"]) == 0
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["data_dir"] == str(tmp_path / "d")  # absolute: `isoconv eval run` works from anywhere
    assert (cfg["dim"], cfg["depth"], cfg["kernel"], cfg["patch"], cfg["activation"]) == (128, 8, 5, 4, "relu")
    assert cfg["device"] == "cpu" and cfg["amp"] in ("off", "bf16")  # what auto chose
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"] == cfg
    plain = torch.load(tmp_path / "run" / "last.pt", weights_only=True)  # no isoconv needed to open a checkpoint
    assert plain["config"] == cfg and plain["epoch"] == 1 and set(plain["model"]) == set(
        load_checkpoint(tmp_path / "run" / "last.pt")["model"])


def test_a_model_that_ends_non_finite_exits_non_zero(data_root, tmp_path, capsys, monkeypatch):
    """--skip-nonfinite skips bad steps; if the weights still end non-finite, the run says so and fails."""
    from isoconv.train.step import TrainStep

    real_call = TrainStep.__call__

    def poison_weights(self, *a, **k):
        out = real_call(self, *a, **k)
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(TrainStep, "__call__", poison_weights)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--skip-nonfinite", "--data-dir", str(data_root),
                 "--out", str(run)]) == 2
    line = one_error_line(capsys)
    assert f"the trained model in {run} has non-finite weights" in line


def test_new_cases_are_documented():
    doc = (REPO / "docs" / "errors.md").read_text()
    for name in ("run directory in use", "full disk mid-run", "data folder gone", "non-finite final model"):
        assert f"| {name} |" in doc, f"docs/errors.md has no row for {name!r}"
