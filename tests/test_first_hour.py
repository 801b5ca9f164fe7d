"""A new user's first hour (issue 18): mistakes end in one line, output into a closed pipe stops quietly, flag names
mean one thing, `--amp auto` measures on CPUs with bf16, and failed loads leave nothing behind. The command-line
cases run as real processes (`python -m isoconv ...`)."""
import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from isoconv.cli import main
from isoconv.config import build_config
from isoconv.errors import UserError
from isoconv.train import precision as amp
from isoconv.train.loop import train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def isoconv(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isoconv", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300, **kw)


def one_error_line(result: subprocess.CompletedProcess, fragment: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("isoconv: error: "), result.stderr
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_root) -> Path:
    root = tmp_path_factory.mktemp("first-hour")
    cfg = build_config(model="cm-cpu", dim=16, depth=1, epochs=1, train_subset=64, test_subset=32, batch_size=32,
                       data_dir=str(data_root), out=str(root / "run"), amp="off")
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg)
    images = root / "photos"
    images.mkdir()
    for i in range(40):
        Image.new("RGB", (32, 32), (i * 6, 100, 200 - i * 5)).save(images / f"{i:02d}.png")
    return root


# ------------------------------------------------------------------ closed pipes


def closed_stdout(*args) -> subprocess.CompletedProcess:
    """Run isoconv with a stdout pipe whose reader has gone away before it writes (as `| head -1` after one line)."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "isoconv", *map(str, args)], stdout=write,
                              stderr=subprocess.PIPE, text=True, env=ENV, timeout=300)
    finally:
        os.close(write)
    return proc


@pytest.mark.parametrize("command", [["models"], ["recipes"]])
def test_closed_pipe_stops_quietly(command):
    proc = closed_stdout(*command)
    assert proc.stderr == "" and proc.returncode == 141, proc.stderr


def test_closed_pipe_while_predicting(tiny_run):
    proc = closed_stdout("predict", tiny_run / "run", tiny_run / "photos", "--format", "csv")
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141


def test_head_of_a_real_shell_pipe():
    out = subprocess.run(f"{sys.executable} -m isoconv models | head -1", shell=True, capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert out.stdout.startswith("name") and "Traceback" not in out.stderr


# ------------------------------------------------------------------ mistakes, as real processes


def test_text_file_as_checkpoint(tmp_path):
    report = tmp_path / "report.txt"
    report.write_text("precision recall f1\n")
    one_error_line(isoconv("eval", report), f"{report} is a text file, not a checkpoint; pass a run folder")


def test_image_as_model(tmp_path):
    png = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(png)
    one_error_line(isoconv("predict", png, png), f"{png} is a PNG image, not a checkpoint")


def test_plain_pickle_has_no_torch_warning(tmp_path):
    p = tmp_path / "w.pkl"
    p.write_bytes(pickle.dumps({"model": {}, "config": {}}, protocol=4))
    one_error_line(isoconv("eval", p), "is a plain pickle")


def test_out_is_checked_before_any_data_is_read(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep\n")
    result = isoconv("train", "--model", "cm-cpu", "--data-dir", tmp_path / "no-data", "--no-download",
                     "--out", notes)
    one_error_line(result, f"--out {notes} is an existing file, not a folder")
    assert notes.read_text() == "keep\n" and not (tmp_path / "no-data").exists()


def test_batch_size_not_divisible_under_torchrun_is_said_once(tmp_path, data_root):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "isoconv", "train", "--model", "cm-cpu", "--batch-size", "33", "--epochs", "1",
                           "--data-dir", str(data_root), "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("isoconv: ")]
    assert ours == ["isoconv: error: --batch-size 33 is the global batch, split over the 2 processes of this job, "
                    "and 2 does not divide it; use a multiple of 2 (e.g. 32) or another number of processes"], \
        proc.stderr
    assert f"{os.sep}isoconv{os.sep}" not in proc.stderr.split("ChildFailedError")[0].replace("-m isoconv", "")
    assert proc.returncode != 0 and not out.exists()


# ------------------------------------------------------------------ one meaning per flag name


def test_predict_format_json_path_and_deprecated_spellings(tiny_run, capsys, monkeypatch):
    monkeypatch.chdir(tiny_run)
    photos = str(tiny_run / "photos" / "00.png")
    assert main(["predict", "run", photos, "--format", "csv", "--json", "p.json"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("file,rank,class,index,probability") and captured.err == ""
    assert json.loads(Path("p.json").read_text())["predictions"][0]["file"] == photos
    assert main(["predict", "run", photos, "--csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("file,rank") and "predict --csv is deprecated" in captured.err
    assert main(["predict", "run", photos, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["predictions"] and "--format json" in captured.err


def test_export_output_and_deprecated_out(tiny_run, capsys):
    new, old = tiny_run / "new.safetensors", tiny_run / "old.safetensors"
    assert main(["export", str(tiny_run / "run"), "--format", "safetensors", "--output", str(new)]) == 0
    assert new.is_file() and capsys.readouterr().err == ""
    assert main(["export", str(tiny_run / "run"), "--format", "safetensors", "--out", str(old)]) == 0
    assert old.is_file() and "export --out is deprecated" in capsys.readouterr().err


# ------------------------------------------------------------------ --amp auto


def fake_rates(monkeypatch, fp32_step: float, bf16_step: float) -> list:
    """Make each timed step of fp32 / bf16 take the given seconds; returns a list counting the measurements."""
    calls = []
    ticks = iter(range(10 ** 6))
    now = [0.0]
    step_seconds = {}

    real = amp.images_per_second

    def measured(model, precisions, *a, **k):
        calls.append(precisions)
        return real(model, precisions, *a, **k)

    def clock():
        next(ticks)
        return now[0]

    class Advancing:
        """autocast that advances the fake clock by the step time of its precision."""

        def __init__(self, device, precision):
            self.seconds = step_seconds.setdefault(precision, fp32_step if precision == "fp32" else bf16_step)

        def __enter__(self):
            now[0] += self.seconds

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(amp, "clock", clock)
    monkeypatch.setattr(amp, "autocast", Advancing)
    monkeypatch.setattr(amp, "images_per_second", measured)
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: True)
    return calls


@pytest.fixture
def tiny_model():
    from isoconv.models import build_model

    cfg = build_config(model="cm-cpu", dim=8, depth=1)
    return cfg, build_model(cfg, num_classes=10, image_size=32)


@pytest.mark.parametrize("fp32_step,bf16_step,want", [(0.1, 0.2, "fp32"), (0.2, 0.1, "bf16"), (0.1, 0.099, "fp32")])
def test_amp_auto_picks_the_measured_faster_precision_and_caches_it(tmp_path, monkeypatch, tiny_model, fp32_step,
                                                                    bf16_step, want):
    monkeypatch.setenv("ISOCONV_CACHE", str(tmp_path))
    cfg, model = tiny_model
    calls = fake_rates(monkeypatch, fp32_step, bf16_step)
    state = torch.get_rng_state()
    chosen, why = amp.choose_precision(cfg, model, torch.device("cpu"), batch=4, image_size=32, num_classes=10)
    assert chosen == want and calls == [("fp32", "bf16")]
    assert torch.equal(torch.get_rng_state(), state)  # measuring does not change the run's random numbers
    assert f"--amp auto chose {want}" in why and "measured now" in why
    cached = json.loads((tmp_path / "amp-auto.json").read_text())
    (entry,) = cached.values()
    assert entry["fp32"] == pytest.approx(4 / fp32_step) and entry["bf16"] == pytest.approx(4 / bf16_step)
    again, why = amp.choose_precision(cfg, model, torch.device("cpu"), batch=4, image_size=32, num_classes=10)
    assert again == want and len(calls) == 1 and "measured earlier" in why  # cached: no second measurement
    amp.choose_precision(cfg, model, torch.device("cpu"), batch=8, image_size=32, num_classes=10)
    assert len(calls) == 2  # another batch size is another measurement
    monkeypatch.setattr(amp, "MEASUREMENT_VERSION", amp.MEASUREMENT_VERSION + 1)
    amp.choose_precision(cfg, model, torch.device("cpu"), batch=4, image_size=32, num_classes=10)
    assert len(calls) == 3  # a verdict measured with an older training path is measured again


def test_amp_auto_without_bf16_instructions_is_fp32_without_measuring(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("ISOCONV_CACHE", str(tmp_path))
    cfg, model = tiny_model
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(amp, "images_per_second", lambda *a, **k: pytest.fail("measured"))
    chosen, why = amp.choose_precision(cfg, model, torch.device("cpu"), batch=4, image_size=32, num_classes=10)
    assert chosen == "fp32" and "no bf16 instructions" in why and not (tmp_path / "amp-auto.json").exists()
    explicit = build_config(model="cm-cpu", amp="bf16")
    assert amp.choose_precision(explicit, model, torch.device("cpu"), batch=4, image_size=32,
                                num_classes=10) == ("bf16", None)


def test_real_measurement_of_a_tiny_model(tiny_model):
    cfg, model = tiny_model
    t0 = time.perf_counter()
    rates = amp.images_per_second(model, ("fp32", "bf16"), 4, 32, 10, channels_last=True, steps=1)
    assert set(rates) == {"fp32", "bf16"} and all(r > 0 for r in rates.values())
    assert time.perf_counter() - t0 < 60


def test_run_log_says_why(tmp_path, data_root, monkeypatch, capsys):
    monkeypatch.setenv("ISOCONV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: False)
    assert main(["train", "--model", "cm-cpu", "--dim", "8", "--depth", "1", "--epochs", "1", "--train-subset", "32",
                 "--test-subset", "16", "--batch-size", "16", "--data-dir", str(data_root), "--out",
                 str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "precision: this CPU has no bf16 instructions" in out.splitlines()[0]


# ------------------------------------------------------------------ nothing left behind


def test_failed_download_keeps_an_existing_folder_and_removes_created_ones(tmp_path, monkeypatch):
    from isoconv.data import cifar as cifar_mod
    from isoconv.data import load_cifar10

    monkeypatch.setattr(cifar_mod, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(UserError, match="could not download"):
        load_cifar10(existing, train=False, download=True)
    assert existing.is_dir() and list(existing.iterdir()) == []
    with pytest.raises(UserError, match="could not download"):
        load_cifar10(tmp_path / "new" / "deeper", train=False, download=True)
    assert not (tmp_path / "new").exists()


def test_bad_folder_data_leaves_no_decode_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("ISOCONV_CACHE", raising=False)
    root = tmp_path / "photos"
    for split, classes in (("train", "ab"), ("val", "abz")):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 80 * (c == "b"), 30)).save(root / split / c / f"{i}.png")
    cfg = build_config(model="cm-cpu", dataset="folder", data_dir=str(root), epochs=1, amp="off",
                       out=str(tmp_path / "run"))
    with pytest.raises(UserError, match="is not a class of"):
        train(cfg)
    assert not (root / ".isoconv-cache").exists() and not (tmp_path / "run").exists()
