"""`kill -9` during an export (32 #21): the temporary file it leaves (`.NAME.PID-RANDOM.tmp`) is removed by the next
write of the same file, since its PID no longer runs; another live writer's temporary file is left alone."""
import os
import signal
import subprocess
import sys
from pathlib import Path

from isoconv import fileio
from isoconv.cli import main

from test_export import make_run

PAUSE_RUNNER = Path(__file__).with_name("pause_runner.py")
SRC = Path(__file__).resolve().parents[1] / "src"


def test_kill_9_mid_export_leaves_a_temporary_file_that_the_next_export_removes(tmp_path):
    run = make_run(tmp_path / "run", model="cm-cpu", dim=16, depth=1)
    target = tmp_path / "model.safetensors"
    proc = subprocess.Popen([sys.executable, str(PAUSE_RUNNER), "export-write", "300", "export", str(run), "--format",
                             "safetensors", "--output", str(target)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(SRC)))
    try:
        for line in proc.stdout:
            if line.startswith("ISOCONV_TEST_PAUSED"):
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (left,) = tmp_path.glob(".model.safetensors.*.tmp")
    assert left.name.startswith(f".model.safetensors.{proc.pid}-") and left.stat().st_size > 0
    assert not target.exists()
    assert main(["export", str(run), "--format", "safetensors", "--output", str(target)]) == 0
    assert target.is_file() and list(tmp_path.glob(".model.safetensors.*")) == []


def test_a_live_writer_s_temporary_file_is_left_alone(tmp_path):
    target = tmp_path / "x.json"
    live = tmp_path / f".x.json.{os.getpid()}-abc.tmp"  # this process is running
    other = tmp_path / ".x.json.notapid.tmp"  # not a name of this form
    for path in (live, other):
        path.write_text("partial")
    fileio.atomic_write(target, "{}")
    assert live.exists() and other.exists() and target.read_text() == "{}"
