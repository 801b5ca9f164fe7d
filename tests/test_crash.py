"""Crash safety with real processes: SIGKILL at chosen moments, graceful SIGINT/SIGTERM, corrupt and
unwritable checkpoints, non-finite losses. Every resumed run must end bit-identical to an uninterrupted one."""
import errno
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch

from isoconv import fileio
from isoconv.config import build_config
from isoconv.cli import main
from isoconv.errors import UserError
from isoconv.models.compiled import fast_cpu_training
from isoconv.weights import checkpoint as ckpt
from isoconv.weights.checkpoint import CorruptCheckpointError, load_checkpoint, load_latest_checkpoint, previous_path
from isoconv.train.loop import train

# 4 steps per epoch, 2 epochs: small enough that each process lives a few seconds.
FLAGS = ["--model", "cm-cpu", "--dim", "16", "--depth", "1", "--train-subset", "256", "--test-subset", "64",
         "--batch-size", "64", "--epochs", "2", "--amp", "off", "--lr-max", "0.01", "--ra-n", "1", "--reprob", "0.25",
         "--jitter", "0.1"]


PAUSE_RUNNER = Path(__file__).with_name("pause_runner.py")


def isoconv(*args, pause=None):
    """`isoconv ARGS` in a real process; with pause=(event, seconds) it freezes at that event (pause_runner.py)."""
    prefix = ["-m", "isoconv"] if pause is None else [str(PAUSE_RUNNER), *pause]
    return subprocess.Popen([sys.executable, *prefix, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def run_to_end(*args):
    p = isoconv(*args)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    return out, err


def run_until_paused(args, pause: str, *, then=signal.SIGKILL, seconds: str = "600"):
    """Start a run that freezes at the `pause` event, send it `then`, return (returncode, stderr)."""
    p = isoconv(*args, pause=(pause, seconds))
    for line in p.stdout:
        if line.startswith("ISOCONV_TEST_PAUSED"):
            break
    else:
        raise AssertionError(f"run ended before pausing at {pause}: {p.stderr.read()[-2000:]}")
    p.send_signal(then)
    _, err = p.communicate(timeout=300)
    return p.returncode, err


def metrics(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_second")} for r in rows]


def assert_same_run(run, reference):
    assert metrics(run) == metrics(reference)
    a, b = load_checkpoint(run / "last.pt"), load_checkpoint(reference / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert json.loads((run / "summary.json").read_text())["test_top1"] == \
        json.loads((reference / "summary.json").read_text())["test_top1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("crash") / "reference"
    run_to_end("train", *FLAGS, "--data-dir", str(data_root), "--out", str(out))
    return out


@pytest.mark.parametrize("pause, extra", [
    ("step@6", []),                                   # mid-epoch 2, resumes from the epoch-1 checkpoint
    ("step@7", ["--ckpt-every-steps", "2"]),          # mid-epoch 2, resumes from the step-2 checkpoint
    ("checkpoint-write@3", ["--ckpt-every-steps", "2"]),  # while a mid-epoch checkpoint is half written
])
def test_sigkill_then_resume_is_bit_identical(reference, data_root, tmp_path, pause, extra):
    run = tmp_path / "run"
    code, _ = run_until_paused(["train", *FLAGS, *extra, "--data-dir", str(data_root), "--out", str(run)], pause)
    assert code == -signal.SIGKILL
    assert not (run / "summary.json").exists()
    before = load_checkpoint(run / "last.pt")
    assert before["epoch"] * 4 + before["step"] < 8  # it really stopped before the end
    _, err = run_to_end("train", "--resume", str(run))
    assert_same_run(run, reference)
    assert not list(run.glob(".*.tmp"))  # the half-written temporary file is gone after the next save


def test_sigkill_then_resume_is_bit_identical_on_the_fast_cpu_path(data_root, tmp_path, monkeypatch):
    """Width 128 at batch 64 is 64 x 128 x 8 x 8 = 2^19 activation elements per layer: the compiled depthwise
    gradient and fused GELU + BatchNorm (a separate reference run, since FLAGS' tiny model stays on aten;
    the reference and the resumed run in this process, which loads the compiled kernels once)."""
    monkeypatch.undo()  # the real threshold in this process too (conftest keeps other tests on aten)
    flags = [*FLAGS, "--dim", "128", "--activation", "gelu", "--data-dir", str(data_root)]  # the later --dim wins
    assert fast_cpu_training(torch.device("cpu"), torch.float32, 64 * 128 * 8 * 8)
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["train", *flags, "--out", str(reference)]) == 0
    code, _ = run_until_paused(["train", *flags, "--out", str(run)], "step@6")
    assert code == -signal.SIGKILL
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_run(run, reference)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_mid_epoch_and_says_how_to_resume(reference, data_root, tmp_path, sig):
    """SIGINT is checked up to the checkpoint; SIGTERM also through an exact resume (each process costs seconds)."""
    run = tmp_path / "run"
    code, err = run_until_paused(["train", *FLAGS, "--data-dir", str(data_root), "--out", str(run)], "step@6",
                                 then=sig, seconds="2")
    assert code == 128 + sig
    assert f"stopped by {sig.name} at epoch 2 step 2" in err
    assert f"isoconv train --resume {run}" in err
    assert "Traceback" not in err
    state = load_checkpoint(run / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 2)
    if sig == signal.SIGTERM:
        run_to_end("train", "--resume", str(run))
        assert_same_run(run, reference)


def test_corrupt_last_checkpoint_falls_back_to_previous(reference, data_root, tmp_path):
    run = tmp_path / "run"
    code, _ = run_until_paused(["train", *FLAGS, "--ckpt-every-steps", "2", "--data-dir", str(data_root),
                                "--out", str(run)], "step@7")
    assert code == -signal.SIGKILL
    last = run / "last.pt"
    assert (load_checkpoint(last)["step"], load_checkpoint(previous_path(last))["epoch"]) == (2, 1)
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the payload
    last.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="corrupt"):  # a CRC-32 or digest mismatch, by where it hit
        load_checkpoint(last)
    _, err = run_to_end("train", "--resume", str(run))
    assert "falling back to the previous checkpoint" in err and "last.prev.pt (epoch 1)" in err
    assert_same_run(run, reference)


def test_truncated_checkpoint_is_detected(tmp_path):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint({"model": {"w": torch.arange(1000.0)}, "config": {}, "epoch": 1}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match=r"truncated or corrupt"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="no previous checkpoint last.prev.pt to fall back to"):
        load_latest_checkpoint(path)


def test_previous_checkpoint_is_kept_and_last_always_exists(tmp_path):
    path = tmp_path / "last.pt"
    for epoch in (1, 2, 3):
        ckpt.save_checkpoint({"model": {}, "config": {}, "epoch": epoch}, path)
    assert load_checkpoint(path)["epoch"] == 3
    assert load_checkpoint(previous_path(path))["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]


def tiny(data_root, tmp_path, **kw):
    base = dict(model="cm-cpu", dim=16, depth=1, train_subset=256, test_subset=64, batch_size=64, epochs=2,
                amp="off", data_dir=str(data_root), out=str(tmp_path / "run"))
    return build_config(None, **{**base, **kw})


def test_full_disk_keeps_last_good_checkpoint_and_stops_clearly(data_root, tmp_path, monkeypatch):
    real_write, calls = fileio.write_and_sync, []

    def write_until_full(path, data):
        if not Path(path).name.startswith(".last.pt."):
            return real_write(path, data)
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint (end of epoch 2) hits a full disk half-way
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(fileio, "write_and_sync", write_until_full)
    with pytest.raises(UserError, match=r"no space left on the device writing checkpoint .*last.pt .*the previous "
                                        r"checkpoint .* is intact; free some space, then resume with"):
        train(tiny(data_root, tmp_path))
    run = tmp_path / "run"
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "last.pt", "metrics.jsonl"]


def test_nonfinite_loss_stops_with_step_and_lr_and_keeps_checkpoint(data_root, tmp_path, monkeypatch):
    import isoconv.train.step as loop

    real_ce, calls = loop.F.cross_entropy, []

    def poisoned(*a, **k):  # the 6th training step (epoch 2, step 2) produces NaN
        if "label_smoothing" not in k:  # evaluation
            return real_ce(*a, **k)
        calls.append(1)
        out = real_ce(*a, **k)
        return out * float("nan") if len(calls) == 6 else out

    monkeypatch.setattr(loop.F, "cross_entropy", poisoned)
    with pytest.raises(UserError, match=r"non-finite in epoch 2 at step 2 of 4 \(global step 6, lr [0-9.e-]+\); "
                                        r"the last good checkpoint .*last.pt is kept"):
        train(tiny(data_root, tmp_path))
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_skip_nonfinite_counts_skipped_steps(data_root, tmp_path, monkeypatch):
    import isoconv.train.step as loop

    real_ce, calls = loop.F.cross_entropy, []

    def poisoned(*a, **k):
        if "label_smoothing" not in k:  # evaluation
            return real_ce(*a, **k)
        calls.append(1)
        out = real_ce(*a, **k)
        return out * float("inf") if len(calls) in (2, 3) else out

    monkeypatch.setattr(loop.F, "cross_entropy", poisoned)
    summary = train(tiny(data_root, tmp_path, skip_nonfinite=True, epochs=1, test_subset=64 * 2))
    rows = metrics(tmp_path / "run")
    assert rows[0]["skipped_steps"] == 2 and summary["skipped_steps"] == 2
    assert math.isfinite(rows[0]["train_loss"]) and rows[0]["train_loss"] < 10


def test_run_that_fails_before_its_first_checkpoint_leaves_nothing(data_root, tmp_path, monkeypatch):
    import isoconv.train.step as loop

    monkeypatch.setattr(loop.F, "cross_entropy", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(UserError, match="non-finite in epoch 1"):
        train(tiny(data_root, tmp_path))
    assert not (tmp_path / "run").exists()


def test_kill_before_the_first_checkpoint_then_resume_starts_over(reference, data_root, tmp_path):
    """Killed a step into its first epoch, a run has its config.yaml but no checkpoint: --resume starts it from the
    beginning with its saved settings and ends identical to an uninterrupted run."""
    run = tmp_path / "run"
    code, _ = run_until_paused(["train", *FLAGS, "--data-dir", str(data_root), "--out", str(run)], "step@1")
    assert code == -signal.SIGKILL
    assert (run / "config.yaml").is_file() and not (run / "last.pt").exists()
    out, _ = run_to_end("train", "--resume", str(run))
    assert "stopped before its first checkpoint: starting it again" in out
    assert_same_run(run, reference)


def test_time_based_checkpoint_inside_an_epoch_resumes_exactly(reference, data_root, tmp_path):
    run = tmp_path / "run"
    code, _ = run_until_paused(["train", *FLAGS, "--ckpt-every-minutes", "1e-6", "--data-dir", str(data_root),
                                "--out", str(run)], "step@7")
    assert code == -signal.SIGKILL
    state = load_checkpoint(run / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 2)  # taken after step 6 because time had passed, not by count
    run_to_end("train", "--resume", str(run))
    assert_same_run(run, reference)


def test_a_second_process_on_the_same_run_folder_is_refused(data_root, tmp_path):
    run = tmp_path / "run"
    first = isoconv("train", *FLAGS, "--data-dir", str(data_root), "--out", str(run), pause=("step@1", "120"))
    try:
        for line in first.stdout:
            if line.startswith("ISOCONV_TEST_PAUSED"):
                break
        second = subprocess.run([sys.executable, "-m", "isoconv", "train", *FLAGS, "--data-dir", str(data_root),
                                 "--out", str(run)], capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"run directory {run} is in use by another isoconv process (pid {first.pid})" \
            in lines[0], second.stderr
        assert (run / "config.yaml").is_file()  # the first run's files are untouched
    finally:
        first.kill()
        first.communicate(timeout=60)


def test_killed_sweep_finishes_without_rerunning_finished_runs(data_root, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"description": "kill test", "seeds": 1, "settings": {
        "model": "cm-cpu", "dim": 8, "depth": 1, "train_subset": 128, "test_subset": 64, "batch_size": 64,
        "epochs": 2, "amp": "off", "ckpt_every_steps": 1, "workers": 0},
        "variants": [{"name": "relu", "activation": "relu"}, {"name": "gelu", "activation": "gelu"}]}))
    args = lambda out: ["ablate", str(spec), "--data-dir", str(data_root), "--out", str(out), "--device", "cpu"]  # noqa: E731
    run_to_end(*args(tmp_path / "reference"))
    killed = tmp_path / "killed"
    code, _ = run_until_paused(args(killed), "step@6")  # the first run is done, the second one is 2 steps in
    assert code == -signal.SIGKILL
    first = killed / "relu" / "seed0" / "summary.json"
    stamp = first.stat().st_mtime_ns
    assert load_checkpoint(killed / "gelu" / "seed0" / "last.pt")["step"] == 1
    out, _ = run_to_end(*args(killed))
    assert "1 finished (skipped), 1 to resume, 0 to start" in out
    assert first.stat().st_mtime_ns == stamp  # not trained again
    for variant in ("relu", "gelu"):
        a, b = (json.loads((d / variant / "seed0" / "summary.json").read_text())
                for d in (killed, tmp_path / "reference"))
        assert a["test_top1"] == b["test_top1"] and a["test_loss"] == b["test_loss"]
