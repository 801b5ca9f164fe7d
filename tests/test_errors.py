"""Every bad input in docs/errors.md: a one-line message naming the problem, exit code 2, no traceback,
and no run directory left behind. The case names below are the rows of docs/errors.md."""
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch

from isoconv.cli import main
from isoconv.config import build_config
from isoconv.models import build_model
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


def text_file(tmp):
    p = tmp / "report.txt"
    p.write_text("              precision    recall  f1-score   support\n")
    return p


def png_file(tmp):
    from PIL import Image

    p = tmp / "cat.png"
    Image.new("RGB", (8, 8)).save(p)
    return p


def plain_pickle(tmp):
    p = tmp / "weights.pkl"
    p.write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}, "config": {}}))
    return p


def existing_file(tmp):
    p = tmp / "notes.txt"
    p.write_text("keep me\n")
    return p


def unfinished_run(tmp):
    """A run folder with a checkpoint but no summary.json (stopped before its end)."""
    cfg = build_config(model="cm-cpu", dim=8, depth=1)
    run = tmp / "unfinished"
    run.mkdir()
    data = {"classes": [str(i) for i in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32}
    save_checkpoint({"model": build_model(cfg, 10, 32).state_dict(), "config": cfg.to_dict(), "epoch": 1,
                     "data": data}, run / "last.pt")
    return run


BUSY = []  # sockets held open while a test runs `isoconv serve` on their port


def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    BUSY.append(s)
    return str(s.getsockname()[1])


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
    "output folder is a file": (lambda t, d: ["train", *TINY, "--data-dir", str(d), "--out", str(existing_file(t))],
                                "is an existing file, not a folder; pass --out a folder path"),
    "output folder under a file": (lambda t, d: ["train", *TINY, "--data-dir", str(d), "--out",
                                                 str(existing_file(t) / "run")], "is a file, not a folder"),
    "output name too long": (lambda t, d: ["train", *TINY, "--data-dir", str(d), "--out", str(t / ("x" * 300))],
                             "longer than the file system allows"),
    "empty output path": (lambda t, d: ["train", *TINY, "--data-dir", str(d), "--out", ""], "--out is empty"),
    "JSON report into a folder": (lambda t, d: ["eval", str(t / "nothing"), "--json", str(t)],
                                  "is a folder; pass a file path"),
    "JSON report into a missing folder": (lambda t, d: ["eval", str(t / "nothing"), "--json", str(t / "no" / "r.json")],
                                         "does not exist; create it or pass another path"),
    "predictions over an image": (lambda t, d: ["predict", str(t / "run"), "--json", str(png_file(t)),
                                                str(png_file(t))], "would overwrite a PNG image with the predictions"),
    "text file as a checkpoint": (lambda t, d: ["eval", str(text_file(t))],
                                  "report.txt is a text file, not a checkpoint; pass a run folder"),
    "image as a model": (lambda t, d: ["predict", str(png_file(t)), str(png_file(t))],
                         "cat.png is a PNG image, not a checkpoint"),
    "plain pickle as a checkpoint": (lambda t, d: ["eval", str(plain_pickle(t))],
                                     "weights.pkl is a plain pickle (pickle.dump), not a checkpoint"),
    "export an unfinished run": (lambda t, d: ["export", str(unfinished_run(t)), "--format", "folder", "--output",
                                               str(t / "out")], "is not finished (no summary.json)"),
    "unknown export format": (lambda t, d: ["export", str(unfinished_run(t)), "--format", "zip", "--output",
                                            str(t / "out")], "--format must be one of onnx, pt2, torchscript, safetensors, folder, "),
    "model folder over other files": (lambda t, d: ["export", str(unfinished_run(t)), "--format", "folder",
                                                    "--output", str(t)], "is a folder that holds other files"),
    "serve on a busy port": (lambda t, d: ["serve", str(unfinished_run(t)), "--port", busy_port()],
                             "is already in use; pass another --port"),
    "text file as pretrained weights": (lambda t, d: ["train", *TINY, "--data-dir", str(d), "--pretrained",
                                                      str(text_file(t))], "report.txt is a text file, not a weights"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_and_exit_2(name, tmp_path, data_root, capsys):
    build, fragment = CASES[name]
    argv = build(tmp_path, data_root)
    capsys.readouterr()
    out_dir = tmp_path / "out"
    if argv[0] == "train" and "--out" not in argv and "--resume" not in argv:
        argv += ["--out", str(out_dir)]
    code = main(argv)
    while BUSY:
        BUSY.pop().close()
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("isoconv: error: "), err
    assert fragment in lines[0], lines[0]
    assert not out_dir.exists()  # nothing half-written
    if name.startswith("output folder"):
        assert (tmp_path / "notes.txt").read_text() == "keep me\n"


def test_read_only_output_location(tmp_path, data_root, capsys, monkeypatch):
    """A read-only file system or folder (root ignores folder permissions, so the OS refusal is simulated)."""
    import errno
    import tempfile

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = tmp_path / "ro" / "run"
    assert main(["train", *TINY, "--data-dir", str(data_root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"isoconv: error: --out {out} cannot be written: {tmp_path} is not writable (read-only file "
                   f"system); pass --out a folder path in a writable location"), err
    assert not (tmp_path / "ro").exists()


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
    for name in [*CASES, "out of memory", "full disk", "non-finite loss", "corrupt last checkpoint on resume",
                 "read-only output location", "batch size not divisible by the processes", "closed output pipe",
                 "failed download"]:
        assert f"| {name} |" in doc, f"docs/errors.md has no row for {name!r}"
