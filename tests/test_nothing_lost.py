"""Nothing lost, nothing silent (issue 32): no command writes over a file a run owns or a file isoconv did not just
write, settings of the wrong type stop at the config, resumes say what differs, and every failure is one line.
Each numbered item of the issue has a test running the real process (`python -m isoconv ...`); the files' bytes
are compared before and after."""
import contextlib
import errno
import inspect
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from isoconv import cli
from isoconv.cli import main
from isoconv.config import build_config
from isoconv.errors import ConfigError
from isoconv.models import ConvMixer, ConvNeXt
from isoconv.rundir import RunDir, check_output_file, is_run_folder
from isoconv.train.loop import config_file_edits
from isoconv.interop import export
from isoconv.weights import checkpoint
from isoconv.weights.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def isoconv(*args, wrapper: str = "", **kw) -> subprocess.CompletedProcess:
    """`python -m isoconv ARGS`, or, with `wrapper`, a process that runs that Python code first (to fill a disk or
    make a folder read-only as the operating system would) and then isoconv's main with ARGS."""
    if wrapper:
        code = textwrap.dedent(wrapper) + "\nfrom isoconv.cli import main\nsys.exit(main(sys.argv[1:]))\n"
        cmd = [sys.executable, "-c", "import sys\n" + code]
    else:
        cmd = [sys.executable, "-m", "isoconv"]
    kw.setdefault("env", ENV)
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=300, **kw)


def in_process(*args) -> subprocess.CompletedProcess:
    """The same command through isoconv's main in this process (for the variants of an item whose real-process
    test is above it: a new process costs seconds of imports)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("isoconv: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run(tiny_finished_run, tmp_path) -> Path:
    """A private copy of the session's tiny finished run."""
    return Path(shutil.copytree(tiny_finished_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def exports(tiny_finished_run, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("exports")
    for fmt, name in (("onnx", "m.onnx"), ("safetensors", "m.safetensors")):
        assert in_process("export", tiny_finished_run, "--format", fmt, "--output", folder / name).returncode == 0
    return folder


# ------------------------------------------------------------------ 1-3: nothing a run or the user owns is replaced


@pytest.mark.parametrize("fmt,name", [("torchscript", "last.pt"), ("safetensors", "last.prev.pt"),
                                      ("torchscript", "epoch-001.pt")])
def test_1_export_never_replaces_a_run_file(run, fmt, name):
    before = snapshot(run)
    run_it = isoconv if name == "last.pt" else in_process
    result = run_it("export", run, "--format", fmt, "--output", run / name, "--overwrite")
    one_error_line(result, f"--output {run / name} is a file of the run in {run}")
    assert snapshot(run) == before
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_2_json_outputs_never_replace_run_files_or_existing_files(run, tmp_path):
    photo = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (200, 30, 40)).save(photo)
    mine = tmp_path / "mine.json"
    mine.write_text('{"keep": true}\n')
    before, mine_before = snapshot(run), mine.read_bytes()
    for args in (["eval", run, "--json", run / "summary.json"], ["eval", run, "--json", run / "last.pt"],
                 ["predict", run, photo, "--json", run / "config.yaml"]):
        run_it = isoconv if args[-1].name == "summary.json" else in_process
        one_error_line(run_it(*args), f"--json {args[-1]} is a file of the run in {run}")
    one_error_line(in_process("predict", run, photo, "--json", mine), f"--json {mine} already exists",
                   "--overwrite")
    assert snapshot(run) == before and mine.read_bytes() == mine_before
    result = in_process("predict", run, photo, "--json", mine, "--overwrite")  # said explicitly: replaced
    assert result.returncode == 0, result.stderr
    assert json.loads(mine.read_text())["predictions"][0]["file"] == str(photo) and snapshot(run) == before


def test_3_train_refuses_a_folder_of_other_files(tmp_path, data_root):
    project = tmp_path / "project"
    project.mkdir()
    for name, text in (("config.yaml", "lr: 3\n"), ("summary.json", "{}"), ("report.txt", "mine"),
                       ("metrics.jsonl", '{"a": 1}\n')):
        (project / name).write_text(text)
    before = snapshot(project)
    result = isoconv("train", "--model", "cm-cpu", "--epochs", "1", "--data-dir", data_root, "--out", project)
    one_error_line(result, f"--out {project} holds other files (config.yaml, metrics.jsonl, report.txt, "
                           f"summary.json) and no isoconv run")
    assert snapshot(project) == before


def test_output_rule_in_process(run, tmp_path):
    """The one check: a run's own files always refused (even a checkpoint not written yet), other existing files
    unless overwrite; a project folder with a config.yaml is not a run."""
    assert is_run_folder(run) and not is_run_folder(tmp_path)
    for name in ("last.prev.pt", "error.txt", "epoch-007.pt", "tracking.json"):
        with pytest.raises(Exception, match="is a file of the run"):
            check_output_file(run / name, "--json", overwrite=True)
    assert check_output_file(run / "notes.json", "--json") == run / "notes.json"
    (tmp_path / "config.yaml").write_text("name: my project\n")
    assert not is_run_folder(tmp_path)
    assert check_output_file(tmp_path / "config.yaml", "--json", overwrite=True) == tmp_path / "config.yaml"


# ------------------------------------------------------------------ 7: every value type-checked at the boundary


WRONG_TYPES = [("epochs: 1e12", "--epochs must be a whole number, got '1e12'"),
               ("epochs: five", "--epochs must be a whole number, got 'five'"),
               ("epochs: 2.5", "--epochs must be a whole number, got 2.5"),
               ("epochs: true", "--epochs must be a whole number, got True"),
               ('wd: "0.05"', "--wd must be a number, got '0.05'"),
               ("scale: [0.5, 1.0]", "--scale must be a number, got [0.5, 1.0]"),
               ("seed: 12345678901234567890", "--seed must be in 0..4294967295, got 12345678901234567890"),
               ("batch_size: 1e9", "--batch-size must be a whole number, got '1e9'"),
               ("hflip: maybe", "--hflip must be true or false, got 'maybe'")]


@pytest.mark.parametrize("line,message", WRONG_TYPES)
def test_7_wrong_typed_recipe_values_in_process(tmp_path, line, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: cm-cpu\n{line}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(str(recipe))


def test_7_wrong_types_in_real_processes(tmp_path, data_root):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: cm-cpu\nepochs: 1e12\n")
    one_error_line(in_process("train", "--recipe", recipe, "--out", tmp_path / "run"), "--epochs must be a whole "
                   "number, got '1e12' (str); YAML reads 1e12 as text: write 1000000000000 without quotes")
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(io.StringIO()) as err:
        main(["train", "--model", "cm-cpu", "--epochs", "2.5"])
    assert stop.value.code == 2 and err.getvalue() == ("isoconv: error: isoconv train: argument --epochs: invalid "
                                                       "int value: '2.5'; see `isoconv train --help`\n")
    sweep = tmp_path / "sweep"
    result = isoconv("ablate", "convmixer-width-depth", "--set", "epochs=abc", "--out", sweep)
    one_error_line(result, "--set epochs=abc: --epochs must be a whole number, got 'abc'")
    assert not sweep.exists() and not (tmp_path / "run").exists()  # nothing trained, nothing written


# ------------------------------------------------------------------ 8-9: resuming says what differs


def unfinished(run: Path) -> Path:
    (run / "summary.json").unlink()
    (run / "report.txt").unlink()
    return run


def test_8_edited_config_of_an_unfinished_run_is_refused(run):
    unfinished(run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("lr_max: 0.01", "lr_max: 0.5"))
    before = snapshot(run)
    one_error_line(isoconv("train", "--resume", run), f"{config} disagrees with the run's checkpoint (lr_max: 0.01 "
                                                      f"-> 0.5)")
    assert snapshot(run) == before


def test_8_a_checkpoint_of_another_model_is_refused(run):
    unfinished(run)
    state = load_checkpoint(run / "last.pt")
    state["config"] = {**state["config"], "dim": 32}  # what a last.pt copied from another run holds
    save_checkpoint(state, run / "last.pt")
    before = snapshot(run)
    one_error_line(in_process("train", "--resume", run), "disagrees with the run's checkpoint (dim: 32 -> 16)",
                   "put back the run's own last.pt")
    assert snapshot(run) == before


def test_8_runtime_edits_are_applied(run):
    unfinished(run)
    saved = load_checkpoint(run / "last.pt")["config"]
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("time_budget: null", "time_budget: 600.0"))
    assert config_file_edits(RunDir(run), saved) == {"time_budget": 600.0}


def test_9_resume_with_another_out_is_refused(run, tmp_path):
    before = snapshot(run)
    one_error_line(isoconv("train", "--resume", run, "--out", tmp_path / "other"),
                   f"--resume {run} continues the run in its own folder; drop --out {tmp_path / 'other'}")
    assert snapshot(run) == before and not (tmp_path / "other").exists()


# ------------------------------------------------------------------ 13-20: one line each, nothing left over


FULL_DISK = """
    import errno, isoconv.interop.export as export
    def full(path, data):
        open(path, "wb").write(data[:100])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    export.write_and_sync = full
"""


def full_disk(path, data):
    open(path, "wb").write(data[:100])
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


@pytest.mark.parametrize("fmt", ["torchscript", "safetensors"])
def test_13_export_to_a_full_disk_is_one_line_and_leaves_nothing(run, tmp_path, fmt, monkeypatch):
    out = tmp_path / "exports"
    out.mkdir()
    name = {"torchscript": "m.pt", "safetensors": "m.safetensors"}[fmt]
    if fmt == "torchscript":
        result = isoconv("export", run, "--format", fmt, "--output", out / name, wrapper=FULL_DISK)
    else:
        monkeypatch.setattr(export, "write_and_sync", full_disk)
        result = in_process("export", run, "--format", fmt, "--output", out / name)
    one_error_line(result, "No space left on device")
    assert list(out.iterdir()) == []


def test_13_full_disk_on_the_first_checkpoint_does_not_offer_a_resume(tmp_path, data_root, monkeypatch):
    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "atomic_write", full)
    run = tmp_path / "run"
    result = in_process("train", "--model", "cm-cpu", "--dim", "16", "--depth", "1", "--epochs", "1", "--batch-size",
                        "32", "--train-subset", "32", "--test-subset", "16", "--amp", "off", "--device", "cpu",
                        "--data-dir", data_root, "--out", run)
    line = one_error_line(result, "no checkpoint was written yet, so the run cannot be resumed", "run the training "
                                                                                               "command again")
    assert "--resume" not in line and not run.exists()


READ_ONLY = """
    import errno, os
    ro = os.path.realpath(os.environ["READ_ONLY"])
    def hook(event, args):  # the folder behaves as on a read-only mount: every write into it is refused
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writes and os.path.realpath(os.fsdecode(path)).startswith(ro + os.sep):
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
    sys.addaudithook(hook)
"""


def test_14_read_only_run_folder_is_one_line(run, monkeypatch):
    before = snapshot(run)
    result = isoconv("report", run, wrapper=READ_ONLY, env={**ENV, "READ_ONLY": str(run)})
    one_error_line(result, f"cannot write {run / 'plots'} (permission denied); make it writable")
    assert snapshot(run) == before
    unfinished(run)
    before = snapshot(run)

    def read_only(self):
        raise PermissionError(errno.EROFS, "Read-only file system", str(self.lock_file))

    monkeypatch.setattr(RunDir, "locked", read_only)
    one_error_line(in_process("train", "--resume", run), f"cannot write {run} (read-only file system)")
    assert snapshot(run) == before


def test_15_label_smoothing_one_and_a_missing_mps_are_one_line(tmp_path):
    one_error_line(isoconv("train", "--model", "cm-cpu", "--label-smoothing", "1.0", "--out", tmp_path / "a"),
                   "--label-smoothing must be in [0, 1), got 1.0")
    if not torch.backends.mps.is_available():
        one_error_line(in_process("train", "--model", "cm-cpu", "--device", "mps", "--out", tmp_path / "b"),
                       "--device mps asked for but this machine has no usable Apple MPS device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,kind", [("m.onnx", "onnx"), ("m.safetensors", "safetensors")])
def test_16_eval_of_an_export_names_the_command_that_takes_it(exports, name, kind):
    run_it = isoconv if kind == "onnx" else in_process
    one_error_line(run_it("eval", exports / name), f"{exports / name} is an exported {kind} model; `isoconv eval` "
                   f"takes a run folder", f"`isoconv predict {exports / name} IMAGES`")


def test_17_ctrl_c_says_no_placeholder(run):
    wrapper = """
        import os, signal, isoconv.cli as cli
        cli.evaluate_target = lambda *a, **k: os.kill(os.getpid(), signal.SIGINT)
    """
    result = isoconv("eval", run, wrapper=wrapper)
    assert result.returncode == 130 and result.stderr == "isoconv: interrupted\n", result.stderr


def test_17_full_disk_outside_training_names_no_placeholder(run, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "/x/report.json")

    monkeypatch.setattr(cli, "evaluate_target", full)
    line = one_error_line(in_process("eval", run), "no space left on the device writing /x/report.json")
    assert line.endswith("free some space, then run the command again") and "RUN_DIR" not in line


def test_17_ctrl_c_while_starting_is_quiet():
    # `models` no longer imports torch and may be done in 0.3 s; `eval` imports torch before it looks at its target
    proc = subprocess.Popen([sys.executable, "-m", "isoconv", "eval", "no-such-run"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(0.3)  # python has started; isoconv (and torch) are still being imported
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert proc.returncode in (130, -signal.SIGINT) and "RUN_DIR" not in err


def test_18_finished_run_without_its_config_resumes_to_a_plain_note(run):
    (run / "config.yaml").write_text("{broken: [")
    result = isoconv("train", "--resume", run)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "is finished (1 epoch" in result.stdout and "different config" not in result.stdout


def test_18_corrupt_last_checkpoint_offers_the_previous_one(run):
    shutil.copyfile(run / "last.pt", run / "last.prev.pt")
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[:len(data) // 2])
    one_error_line(in_process("eval", run, "--test-subset", "8"), "is truncated",
                   f"the previous checkpoint {run / 'last.prev.pt'} (epoch 1) is whole: evaluate it with "
                   f"`isoconv eval {run / 'last.prev.pt'}`")


def test_19_report_survives_bad_summary_and_metrics(run):
    (run / "summary.json").write_text("[1, 2]")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": "2", "test_top1": "high"}\n')
    result = isoconv("report", run)
    assert result.returncode == 0, result.stderr
    assert f"{run / 'metrics.jsonl'} line 2 is not a row of numbers" in result.stderr
    assert f"{run / 'summary.json'} is not a JSON object" in result.stderr
    (run / "summary.json").write_text('{"epochs": 1, "test_to')  # cut short
    assert in_process("report", run).returncode == 0
    assert "Not finished: 1 of 1 epochs logged (summary.json is not valid JSON (cut short?))." in \
        (run / "report.md").read_text()


def test_20_onnx_to_a_safetensors_name_is_refused(run, tmp_path):
    out = tmp_path / "model.safetensors"
    one_error_line(isoconv("export", run, "--format", "onnx", "--output", out),
                   f"--output {out} names a safetensors file but --format is onnx; name it model.onnx")
    assert not out.exists()


# ------------------------------------------------------------------ 24-25: the README says what the code does


def test_24_readme_states_predicts_precision():
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "the model in fp32 batches" not in readme
    assert "A run folder or checkpoint runs in the precision `isoconv eval` uses" in readme
    assert "An exported `.onnx` or TorchScript file runs in fp32" in readme


@pytest.mark.parametrize("cls", [ConvMixer, ConvNeXt])
def test_25_readme_signatures_match_the_code(cls):
    readme = " ".join((REPO / "README.md").read_text().split())
    shown = re.search(rf"`isoconv\.models\.{cls.__name__}\((.*?)\)`", readme).group(1)
    names = [part.split("=")[0].strip() for part in re.split(r",\s*(?![^()]*\))", shown)]
    params = list(inspect.signature(cls).parameters.values())
    assert names == [p.name for p in params[:len(names)]], shown
    for part in re.split(r",\s*(?![^()]*\))", shown):
        if "=" in part:
            name, value = part.split("=", 1)
            assert eval(value) == inspect.signature(cls).parameters[name.strip()].default, part


def test_every_new_message_is_documented():
    doc = (REPO / "docs" / "errors.md").read_text()
    for name in ("output is a run's file", "output file exists", "run folder of other files", "wrong-typed setting",
                 "flag value of the wrong type", "resume with another --out", "edited config of an unfinished run",
                 "export to a full disk", "unwritable folder", "label smoothing 1", "device without MPS",
                 "evaluate an export", "corrupt last checkpoint, whole previous one", "export under another format's "
                 "name", "interrupted"):
        assert f"| {name} |" in doc, f"docs/errors.md has no row for {name!r}"
