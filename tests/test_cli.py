"""The console script as a user runs it: real subprocesses, exit codes, one-line errors (in-process `main()` where
the process itself is not what a test is about)."""
import json
import os
import subprocess
import sys

import pytest

from isoconv.cli import main

TINY = ["--model", "cm-vanilla", "--dim", "32", "--depth", "2", "--kernel", "3", "--patch", "4", "--epochs", "1",
        "--batch-size", "64", "--train-subset", "128", "--test-subset", "100", "--amp", "off"]


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "isoconv", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_models_lists_presets_with_exact_parameter_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "cm-vanilla " in out and "594,186" in out
    assert "4,855,562" in out and "6,378,378" in out and "27,970,472" in out


def test_recipes_lists_the_xl_table(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ["cm-vanilla-noaug", "cm-xl-noskip", "cm-xl ", "convmixer-cifar10-25ep", "cpu-quick"]:
        assert name in out
    # every published run of the four seeds (and the reference trainer) with its figure as published
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    for name, figure in [("cm-vanilla-noaug", "top-1 88.54%"), ("cm-xl-noskip", "top-1 48.68%"),
                         ("cm-xl", "top-1 94.52%"), ("convnext-cifar", "top-1 92%"), ("convnext-tin", "top-1 64%"),
                         ("convmixer-keras-cifar100", "top-5 64.41%"),
                         ("tf-rep-fixed-adam", "top-1 ~88.5%; paper top-1 91.26%"),
                         ("convmixer-cifar10-25ep", "top-1 ~92.5%"), ("convmixer-cifar10-100ep", "top-1 >94%"),
                         ("tf-rep-stlr", "— (no number published)"), ("cpu-quick", " — ")]:
        assert figure in lines[name], lines[name]


@pytest.mark.parametrize("args,fragment", [
    (["train", "--model", "cm-vanila"], "unknown model 'cm-vanila'"),
    (["train", "--recipe", "cm-xll"], "unknown recipe 'cm-xll'"),
    (["train", "--model", "cm-vanilla", "--epochs", "0"], "--epochs must be positive, got 0"),
    (["train", "--model", "cm-xl", "--depth", "10"], "10"),
    (["train", "--model", "cm-vanilla", "--data-dir", "/nonexistent/x", "--no-download"], "--data-dir"),
    (["eval", "/nonexistent/run"], "/nonexistent/run"),
])
def test_bad_input_is_one_line_exit_2_no_traceback(args, fragment, tmp_path):
    r = run_cli(*args, "--out", str(tmp_path / "o")) if args[0] == "train" else run_cli(*args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("isoconv: error: "), r.stderr
    assert fragment in lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_debug_shows_the_traceback():
    r = run_cli("--debug", "train", "--model", "cm-vanila")
    assert r.returncode != 0 and "Traceback" in r.stderr


def in_process(capsys, *args) -> subprocess.CompletedProcess:
    """`isoconv ARGS` run by main() in this process (no interpreter start-up or imports to pay again), its exit
    code and output as run_cli returns them: for tests about what a command does, not about the process."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["isoconv", *args], code, out.out, out.err)


def test_train_then_eval_round_trip(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    r = in_process(capsys, "train", *TINY, "--data-dir", str(data_root), "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert "test_top1" in r.stdout and "precision" in r.stdout and "airplane" in r.stdout
    summary = json.loads((run / "summary.json").read_text())
    out = tmp_path / "eval.json"
    r = in_process(capsys, "eval", str(run), "--data-dir", str(data_root), "--test-subset", "100", "--json", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert set(summary) <= set(report)
    assert report["epochs"] == 1 and report["params"] == summary["params"]
    assert report["test_top1"] == pytest.approx(summary["test_top1"])
    assert report["confusion_matrix"] == summary["confusion_matrix"]
    r = in_process(capsys, "train", "--resume", str(run), "--lr-max", "0.5")
    assert r.returncode == 2 and "lr_max: 0.01 -> 0.5" in r.stderr
    r = in_process(capsys, "train", "--resume", str(run), "--data-dir", str(data_root))
    assert r.returncode == 0, r.stderr
    assert f"{run} is finished (1 epoch," in r.stdout and "nothing to resume" in r.stdout
    assert json.loads((run / "summary.json").read_text())["test_top1"] == pytest.approx(summary["test_top1"])
    r = in_process(capsys, "eval", str(run / "last.pt"), "--data-dir", str(data_root), "--test-subset", "100",
                   "--tta", "flip")
    assert r.returncode == 0 and "top-1" in r.stdout
