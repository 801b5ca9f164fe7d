"""What the commands import at start-up (a check of sys.modules, not a timing: scripts/bench-startup.py measures the
times, docs/results.md has them). `isoconv --help`, `COMMAND --help`, `recipes` and `models` load neither torch
nor torchvision; training, evaluation, prediction, export and sweeps load torch but not torchvision (only
RandAugment, the torchvision loader, `bench` and `doctor` do). One fresh interpreter, since what a new process
loads is what is tested; the commands run in it one after another, the light ones first."""
import json
import subprocess
import sys

SCRIPT = r"""
import io, json, sys
from contextlib import redirect_stdout
from isoconv.cli import main

def loaded():
    return sorted(m for m in ("torch", "torchvision") if m in sys.modules)

found = {}
for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["predict", "--help"], ["ablate", "--help"],
             ["report", "--help"], ["recipes"], ["models"]):
    with redirect_stdout(io.StringIO()) as out:
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    found[" ".join(argv)] = {"exit": code, "loaded": loaded(), "printed": len(out.getvalue())}
import isoconv.train, isoconv.eval.run, isoconv.interop.predict, isoconv.interop.export, isoconv.experiments.ablate
import isoconv.train.setup, isoconv.models.convnext, isoconv.augment
found["the modules of train, eval, predict, export, ablate"] = {"exit": 0, "loaded": loaded(), "printed": 1}
print(json.dumps(found))
"""

QUICK = ["--help", "train --help", "eval --help", "predict --help", "ablate --help", "report --help", "recipes",
         "models"]


def test_quick_commands_import_no_torch_and_training_no_torchvision():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert list(found) == QUICK + ["the modules of train, eval, predict, export, ablate"]
    for command in QUICK:
        assert found[command]["exit"] == 0 and found[command]["printed"] > 100, (command, found[command])
        assert found[command]["loaded"] == [], f"`isoconv {command}` imported {found[command]['loaded']}"
    assert found["the modules of train, eval, predict, export, ablate"]["loaded"] == ["torch"]
