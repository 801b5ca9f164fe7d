"""isoconv.malloc_tuning.tune_allocator, each case in a fresh interpreter (mallopt changes the whole process)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The module is loaded from its file, not through the isoconv package, which would import torch (slow).
SCRIPT = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("malloc_tuning", {str(SRC / "isoconv" / "malloc_tuning.py")!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
tune_allocator = module.tune_allocator
print(tune_allocator())
print(tune_allocator())
big = bytearray(64 << 20)  # well above glibc's mmap threshold: the allocator still works
del big
"""

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="needs glibc")


def run(extra_env: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    env.update(extra_env)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@glibc_only
def test_tunes_glibc_once():
    first, second = run({})
    assert first == "glibc mallopt: mmap off, trim 2 GiB"
    assert second == f"already tuned ({first})"


@glibc_only
@pytest.mark.parametrize("env", [{"MALLOC_MMAP_MAX_": "65536"}, {"MALLOC_TRIM_THRESHOLD_": "1000000"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}])
def test_leaves_user_settings_alone(env):
    first, second = run(env)
    assert first == "user-set"
    assert second == "already tuned (user-set)"


def test_reports_not_glibc_elsewhere(monkeypatch):
    from isoconv import malloc_tuning

    monkeypatch.setattr(malloc_tuning.platform, "libc_ver", lambda: ("musl", ""))
    assert malloc_tuning._tune() == "not glibc"
