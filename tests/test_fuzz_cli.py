"""Fuzzing the train command line: any combination of flags either trains one tiny epoch or fails with one
clean line and exit code 2 — never a traceback, never a run directory left behind by a failed run."""
import contextlib
import io
import pickle
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isoconv.cli import main
from isoconv.weights.checkpoint import load_checkpoint

# flag -> (valid values, invalid values); None means "leave the flag out". Each flag is invalid now and then,
# so most examples train and the rest probe one or two bad values at a time.
FLAGS = {
    "--lr-max": ([None, 0.001, 1e3], [-1.0]),
    "--schedule": ([None, "onecycle", "onecycle-frac", "cosine"], []),
    "--warmup-epochs": ([None, 0.5], [-1.0]),
    "--wd": ([None, 0.05], [-0.1]),
    "--clip-norm": ([None, 1.0, 0.0], []),
    "--label-smoothing": ([None, 0.1], [1.5]),
    "--scale": ([None, 0.35, 1.0], [0.0, 1.5]),
    "--translate": ([None, 2], [-1]),
    "--ra-n": ([None, 0, 2], []),
    "--ra-m": ([None, 9, 30], [31]),
    "--jitter": ([None, 0.4], []),
    "--reprob": ([None, 0.25], [2.0]),
    "--mixup": ([None, 0.8], []),
    "--cutmix": ([None, 1.0], []),
    "--mix-prob": ([None, 0.5], [1.5]),
    "--amp": (["off", "auto"], ["fp16"]),  # bf16 is 10-40x slower than fp32 on CPUs without bf16 units
    "--loader": ([None, "device", "torchvision"], []),
    "--ckpt-every-steps": ([None, 1], [-1]),
    "--image-size": ([None, 16], [0]),
    "--test-split": ([None, "full", "half"], []),
}
SWITCHES = ["--no-aug", "--no-hflip", "--no-channels-last", "--skip-nonfinite"]
# paths made in each example's scratch folder: @run (a fresh run folder, the valid default), output paths that
# cannot be a run folder, and files of the wrong type where weights are expected
# (issue 32) also: a folder of the user's own files, and paths into a run folder's files; recipes whose values
# have the wrong type (YAML text for numbers, a bool or a list for a number, a seed no generator takes)
PATH_FLAGS = {
    "--out": (["@run", "@fresh/deeper/run"], ["@notes.txt", "@notes.txt/run", "@" + "x" * 300, "", "@project",
                                              "@donerun", "@donerun/summary.json", "@donerun/last.pt",
                                              "@donerun/config.yaml"]),
    "--pretrained": ([None], ["@notes.txt", "@cat.png", "@plain.pkl", "@missing.pt"]),
    "--recipe": ([None], ["@bad-0.yaml", "@bad-1.yaml", "@bad-2.yaml", "@bad-3.yaml", "@bad-4.yaml",
                          "@bad-5.yaml"]),
}
BAD_RECIPES = ["head_l2: \"0.05\"", "seed: 12345678901234567890", "ra_m: 2.5", "vflip: maybe", "jitter: [0.4]",
               "eval_every: true"]


CONVMIXER_FLAGS = {
    "--dim": ([8, 16], [0, -4]),
    "--depth": ([1, 3], [0]),
    "--patch": ([None, 1, 4], [40]),
    "--kernel": ([None, 2, 3], [0]),
    "--activation": ([None, "gelu", "relu", "silu"], []),
    "--skip-period": ([None, 0, 1, 3], [-1]),
    "--batch-size": ([16, 2, 7], [1, 0]),
}
# ConvNeXt-CIFAR (6.4M parameters) is slow at tiny batches on 2 cores, so it only gets batches of 16.
CONVNEXT_FLAGS = {"--drop-path": ([None, 0.0, 0.5], [1.5]), "--batch-size": ([16], [1])}


@st.composite
def train_argv(draw):
    model = draw(st.sampled_from(["cm-cpu", "cm-vanilla", "cm-xl-skip", "convnext-cifar", "cm-nope"]))
    argv = ["--model", model]
    flags = {**(CONVNEXT_FLAGS if model.startswith("convnext") else CONVMIXER_FLAGS), **FLAGS}
    if draw(st.integers(0, 9)) == 9:  # now and then a flag the model family does not take
        flags.update(CONVMIXER_FLAGS if model.startswith("convnext") else CONVNEXT_FLAGS)
    for flag, (valid, invalid) in flags.items():
        bad = invalid and draw(st.integers(0, 24)) == 24  # hypothesis starts from 0: mostly valid
        value = draw(st.sampled_from(invalid if bad else valid))
        if value is not None:
            argv += [flag, str(value)]
    for flag, (valid, invalid) in PATH_FLAGS.items():
        bad = draw(st.integers(0, 9)) == 9
        value = draw(st.sampled_from(invalid if bad else valid))
        if value is not None:
            argv += [flag, value]
    for switch in SWITCHES:
        if draw(st.booleans()):
            argv.append(switch)
    return argv


def scratch_files(tmp: Path) -> None:
    from PIL import Image

    (tmp / "notes.txt").write_text("keep me\n")
    Image.new("RGB", (8, 8)).save(tmp / "cat.png")
    (tmp / "plain.pkl").write_bytes(pickle.dumps({"model": {}, "config": {}}))
    for name, folder in (("project", {"config.yaml": "lr: 3\n", "summary.json": "{}", "report.txt": "mine"}),
                         ("donerun", {"config.yaml": "model: cm-cpu\nepochs: 1\nbatch_size: 2\nlr_max: 0.1\nseed: 0\n",
                                      "summary.json": '{"epochs": 1}', "last.pt": "not a checkpoint"})):
        (tmp / name).mkdir()
        for file, text in folder.items():
            (tmp / name / file).write_text(text)
    for i, line in enumerate(BAD_RECIPES):
        (tmp / f"bad-{i}.yaml").write_text(line + "\n")


def is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name longer than the file system allows
        return False


def user_files(tmp: Path) -> dict:
    return {str(p): p.read_bytes() for folder in ("project", "donerun") for p in sorted((tmp / folder).rglob("*"))}


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(argv=train_argv())
def test_any_flag_combination_trains_or_fails_cleanly(argv, data_root):
    with tempfile.TemporaryDirectory() as tmp:
        scratch_files(Path(tmp))
        before = user_files(Path(tmp))
        argv = [str(Path(tmp) / a[1:]) if a.startswith("@") else a for a in argv]
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else Path(tmp) / "run"
        full = ["train", *argv, "--epochs", "1", "--train-subset", "32", "--test-subset", "16", "--workers", "0",
                "--data-dir", str(data_root), "--device", "cpu"]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(full)  # any exception other than a clean error propagates and fails the test
        if code == 0:
            assert load_checkpoint(out / "last.pt")["epoch"] == 1
            assert (out / "summary.json").is_file()
        else:
            lines = [line for line in err.getvalue().splitlines() if line.strip()]
            assert code == 2, err.getvalue()
            assert len(lines) == 1 and lines[0].startswith("isoconv: error: "), err.getvalue()
            kept = (Path(tmp) / "notes.txt", Path(tmp) / "project", Path(tmp) / "donerun")  # checked below
            assert out in kept or not is_folder(out) or out == Path(""), \
                f"a failed run left {sorted(p.name for p in out.iterdir())}"
            assert not (Path(tmp) / "fresh").exists()  # folders on the way to a failed run's folder are not made
            assert (Path(tmp) / "notes.txt").read_text() == "keep me\n"
        assert user_files(Path(tmp)) == before  # whatever happened, the user's folders and the run are untouched


# ---- folder datasets (every PIL mode, symbolic links) and tracking servers (none, or one that is not there)

LINKS = ["none", "dir-to-parent", "dir-to-other-class", "dir-inside", "dangling-file", "looping-file"]


@st.composite
def folder_case(draw):
    from test_image_modes import MODES

    return {"modes": draw(st.lists(st.sampled_from(MODES), min_size=1, max_size=4, unique=True)),
            "link": draw(st.sampled_from(LINKS)), "skip_bad": draw(st.booleans()),
            "unreachable_tracking": draw(st.integers(0, 5)) == 5}


def plant_folder_dataset(root: Path, case: dict) -> None:
    """train/ and val/ with classes a and b of 8x8 RGB PNGs, then the drawn modes' images (converted to 8x8) and
    the drawn link in train/a."""
    import numpy as np
    from PIL import Image
    from test_image_modes import CASES

    for split in ("train", "val"):
        for label, base in (("a", 10), ("b", 200)):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), base + i, np.uint8)).save(root / split / label / f"{i}.png")
    for mode in case["modes"]:
        fmt, make, _, _ = CASES[mode]
        make().resize((8, 8)).save(root / "train" / "a" / f"m-{mode.replace(';', '_')}.{fmt}", fmt)
    a = root / "train" / "a"
    link = case["link"]
    if link == "dir-to-parent":
        (a / "loop").symlink_to("..")
    elif link == "dir-to-other-class":
        (a / "other").symlink_to("../b")
    elif link == "dir-inside":
        (a / "sub").mkdir()
        Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(a / "sub" / "s.png")
        (a / "again").symlink_to("sub")
    elif link == "dangling-file":
        (a / "gone.png").symlink_to("nowhere.png")
    elif link == "looping-file":
        (a / "self.png").symlink_to("self.png")


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=folder_case())
def test_any_folder_dataset_and_tracking_server_trains_or_fails_cleanly(case):
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "run"
        plant_folder_dataset(data, case)
        argv = ["train", "--model", "cm-cpu", "--dim", "8", "--depth", "1", "--batch-size", "4", "--epochs", "1",
                "--amp", "off", "--workers", "0", "--device", "cpu", "--dataset", "folder", "--data-dir", str(data),
                "--out", str(out)]
        if case["skip_bad"]:
            argv.append("--skip-bad-images")
        if case["unreachable_tracking"]:
            import socket

            with socket.socket() as s:  # a port nothing listens on
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            argv += ["--track", "mlflow", "--tracking-uri", f"http://127.0.0.1:{port}"]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)  # any exception other than a clean error propagates and fails the test
        lines = [line for line in err.getvalue().splitlines() if line.startswith("isoconv: error: ")]
        broken_file = case["link"] in ("dangling-file", "looping-file")
        if case["unreachable_tracking"]:
            expected = "cannot reach the MLflow tracking server"
        elif case["link"] in ("dir-to-parent", "dir-to-other-class"):
            expected = "out of its class folder"
        elif broken_file and not case["skip_bad"]:
            expected = "it is a symbolic link"
        else:
            expected = None
        if expected is None:
            assert code == 0, err.getvalue()
            assert load_checkpoint(out / "last.pt")["epoch"] == 1
        else:
            assert code == 2 and len(lines) == 1 and expected in lines[0], err.getvalue()
            assert not out.exists()
