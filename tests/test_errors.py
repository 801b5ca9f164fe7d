"""Every bad input in docs/errors.md: a one-line message naming the problem, exit code 2, no traceback,
and no run directory left behind. The case names below are the rows of docs/errors.md."""
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from isoconv.cli import main
from isoconv.weights.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "cm-cpu", "--dim", "16", "--depth", "1", "--epochs", "1", "--batch-size", "32",
        "--train-subset", "64", "--test-subset", "32", "--amp", "off"]


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def finished_run(tmp, data_root):
    run = tmp / "done"
    assert main(["train", *TINY, "--data-dir", str(data_root), "--out", str(run)]) == 0
    return run


def cifar_copy(tmp, data_root, edit):
    root = tmp / "data"
    shutil.copytree(data_root / "cifar-10-batches-py", root / "cifar-10-batches-py")
    edit(root / "cifar-10-batches-py")
    return root


def truncate_batch(folder):
    f = folder / "data_batch_1"
    f.write_bytes(f.read_bytes()[:1000])


def evil_batch(folder):
    (folder / "data_batch_1").write_bytes(pickle.dumps(Evil()))


def bad_yaml(tmp):
    p = tmp / "bad.yaml"
    p.write_text("model: cm-cpu\nepochs: [1,\n")
    return p


def unknown_key_yaml(tmp):
    p = tmp / "typo.yaml"
    p.write_text("model: cm-cpu\nlr: 0.1\n")
    return p


def evil_checkpoint(tmp):
    p = tmp / "evil.pt"
    torch.save({"model": {}, "config": {}, "x": Evil()}, p)
    return p


def corrupt_checkpoint(tmp):
    p = tmp / "c.pt"
    save_checkpoint({"model": {"w": torch.zeros(100)}, "config": {}}, p)
    p.write_bytes(p.read_bytes()[:-50])
    return p


# name -> (argv builder (tmp, data_root) -> list, fragment of the one-line message)
CASES = {
    "unknown model": (lambda t, d: ["train", "--model", "cm-vanila"],
                      "unknown model 'cm-vanila' (did you mean cm-vanilla"),
    "unknown recipe": (lambda t, d: ["train", "--recipe", "cm-xll"], "unknown recipe 'cm-xll' (did you mean cm-xl"),
    "missing recipe file": (lambda t, d: ["train", "--recipe", str(t / "nope.yaml")], "nope.yaml does not exist"),
    "bad YAML": (lambda t, d: ["train", "--recipe", str(bad_yaml(t))], "line 3 is not valid YAML"),
    "unknown recipe key": (lambda t, d: ["train", "--recipe", str(unknown_key_yaml(t))],
                           "unknown setting 'lr' in recipe"),
    "value out of range": (lambda t, d: ["train", *TINY, "--reprob", "1.5"], "--reprob must be in [0, 1], got 1.5"),
    "non-positive size": (lambda t, d: ["train", *TINY, "--batch-size", "0"], "--batch-size must be positive"),
    "resume with a recipe": (lambda t, d: ["train", "--resume", str(t), "--recipe", "cm-xl"],
                             "--resume continues a run with its stored config; drop --recipe"),
    "fp16 on CPU": (lambda t, d: ["train", *TINY, "--amp", "fp16", "--device", "cpu", "--data-dir", str(d)],
                    "--amp fp16 needs a CUDA device"),
    "CUDA asked for, none visible": (lambda t, d: ["train", *TINY, "--device", "cuda", "--data-dir", str(d)],
                                     "no CUDA GPU is visible; use --device cpu"),
    "impossible shape": (lambda t, d: ["train", *TINY, "--patch", "64", "--data-dir", str(d)],
                         "patch_size 64 is larger than image_size 32"),
    "subset larger than the data": (lambda t, d: ["train", *TINY[:-6], "--train-subset", "60000",
                                                  "--test-subset", "32", "--amp", "off", "--data-dir", str(d)],
                                    "subset of 60000 images requested but only 50000"),
    "missing data": (lambda t, d: ["train", *TINY, "--data-dir", str(t / "empty"), "--no-download"],
                     "empty/cifar-10-batches-py; pass --data-dir DIR"),
    "truncated data file": (lambda t, d: ["train", *TINY, "--data-dir", str(cifar_copy(t, d, truncate_batch))],
                            "data_batch_1: not a valid CIFAR pickle"),
    "malicious data pickle": (lambda t, d: ["train", *TINY, "--data-dir", str(cifar_copy(t, d, evil_batch))],
                              "refusing to unpickle builtins.print"),
    "run directory already used": (lambda t, d: ["train", *TINY, "--data-dir", str(d), "--out",
                                                 str(finished_run(t, d))], "already holds a run; use --resume"),
    "resume with a changed setting": (lambda t, d: ["train", "--resume", str(finished_run(t, d)), "--lr-max", "0.5"],
                                      "lr_max: 0.01 -> 0.5"),
    "resume a missing run": (lambda t, d: ["train", "--resume", str(t / "nothing")], "no such run directory"),
    "evaluate a missing run": (lambda t, d: ["eval", str(t / "nothing")],
                               "neither a run directory nor a checkpoint file"),
    "corrupt checkpoint": (lambda t, d: ["eval", str(corrupt_checkpoint(t))], "is truncated"),
    "malicious checkpoint": (lambda t, d: ["eval", str(evil_checkpoint(t))], "Unsupported global: GLOBAL "),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_and_exit_2(name, tmp_path, data_root, capsys):
    build, fragment = CASES[name]
    argv = build(tmp_path, data_root)
    capsys.readouterr()
    out_dir = tmp_path / "out"
    if argv[0] == "train" and "--out" not in argv and "--resume" not in argv:
        argv += ["--out", str(out_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("isoconv: error: "), err
    assert fragment in lines[0], lines[0]
    assert not out_dir.exists()  # nothing half-written


def test_out_of_memory_suggests_a_smaller_batch(tmp_path, data_root, capsys, monkeypatch):
    from isoconv.train.step import TrainStep

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TrainStep, "__call__", oom)
    assert main(["train", *TINY, "--data-dir", str(data_root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "isoconv: error: out of memory at batch size 32; lower --batch-size"
    assert not (tmp_path / "o").exists()


def test_every_case_is_documented():
    doc = (REPO / "docs" / "errors.md").read_text()
    for name in [*CASES, "out of memory", "full disk", "non-finite loss", "corrupt last checkpoint on resume"]:
        assert f"| {name} |" in doc, f"docs/errors.md has no row for {name!r}"
