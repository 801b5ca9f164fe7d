"""`isoconv doctor` on the CPU, `--compile-mode`, `--time-budget` and `scripts/gpu-check.sh --quick`.

The compile checks use `runtime.COMPILE_BACKEND` = eager (monkeypatched): dynamo captures and runs the graph,
only inductor's C++ code generation (~30 s on this CPU even for a tiny model) is skipped.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from isoconv import doctor, runtime
from isoconv.cli import main
from isoconv.config import build_config
from isoconv.bench import time_to_accuracy
from isoconv.rundir import RunDir
from isoconv.train import train
from isoconv.weights import load_checkpoint
from conftest import REPO

CPU_PASSES = ("train fp32", "train bf16 autocast", "channels_last", "torch.compile",
              "device loader, all augmentations", "DDP 1-process group", "checkpoint write + exact resume",
              "evaluation in training precision")
CPU_NOT_APPLICABLE = ("train fp16 + grad scaler", "compile reduce-overhead (CUDA graphs)", "fused AdamW")


def rows(printed: str) -> dict[str, str]:
    """feature name -> its table line."""
    names = [name for name, _ in doctor.checks()]
    return {line.split("  ")[0].strip(): line for line in printed.splitlines()
            if line.split("  ")[0].strip() in names}


def test_doctor_on_cpu_passes_every_cpu_feature(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "eager")
    out = tmp_path / "doctor.json"
    assert main(["doctor", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    table = rows(printed)
    assert set(table) == set(CPU_PASSES) | set(CPU_NOT_APPLICABLE)
    for name in CPU_PASSES:
        assert table[name][len(name):].split()[0] == "✔", table[name]
    for name in CPU_NOT_APPLICABLE:
        assert table[name][len(name):].split()[0] == "-", table[name]
    for key in ("torch ", "torchvision ", "CPU flags: avx2", "avx512f", "avx512_bf16", "amx_bf16", "threads: ",
                "allocator: ", "C++ compiler: ", "C compiler: ", "ready: every fast-path feature for cpu works"):
        assert key in printed
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["device"] == "cpu"
    assert {c["name"]: c["status"] for c in report["checks"]} == {
        **{n: "ok" for n in CPU_PASSES}, **{n: "n/a" for n in CPU_NOT_APPLICABLE}}
    env = report["environment"]
    assert set(env["cpu_flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()


def test_doctor_reports_a_failing_feature_and_exits_1(monkeypatch, tmp_path, capsys):
    for name, fn in doctor.checks():  # the other checks are not under test here: keep them instant
        monkeypatch.setattr(doctor, fn.__name__, lambda device: "fine")

    def broken(device):
        raise RuntimeError("channels-last kernels are missing\nsecond line not shown")

    monkeypatch.setattr(doctor, "check_channels_last", broken)
    monkeypatch.setattr(doctor, "check_fused_adamw", lambda device: (_ for _ in ()).throw(doctor.NotApplicable("CUDA")))
    out = tmp_path / "doctor.json"
    assert main(["doctor", "--device", "cpu", "--json", str(out)]) == 1
    printed = capsys.readouterr().out
    line = rows(printed)["channels_last"]
    assert "✗" in line and "RuntimeError: channels-last kernels are missing" in line
    assert "second line" not in printed
    assert "✔" in rows(printed)["train fp32"] and " - " in rows(printed)["fused AdamW"]
    assert "1 of 10 checks failed: channels_last" in printed
    report = json.loads(out.read_text())
    assert report["ok"] is False
    assert [c["status"] for c in report["checks"] if c["name"] == "channels_last"] == ["fail"]


def test_doctor_refuses_a_missing_cuda_device_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU, on any machine
    assert main(["doctor", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU is visible" in err


def test_compile_mode_reaches_torch_compile(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "inductor")
    model = torch.nn.Linear(2, 2)
    runtime.compile_model(model, torch.device("cpu"), "max-autotune")
    runtime.compile_model(model, torch.device("cpu"))
    assert calls == [{"backend": "inductor", "mode": "max-autotune"}, {"backend": "inductor"}]
    assert build_config(None, compile_mode="reduce-overhead").compile_mode == "reduce-overhead"
    with pytest.raises(Exception, match="--compile-mode must be one of default, reduce-overhead, max-autotune"):
        build_config(None, compile_mode="fast")


def test_time_budget_stops_cleanly_after_an_evaluated_epoch_and_resumes(data_root, tmp_path):
    run = tmp_path / "run"
    cfg = build_config("cpu-quick", model="cm-cpu", dim=16, depth=1, batch_size=16, workers=0, amp="off", epochs=3,
                       eval_every=3, train_subset=32, test_subset=16, data_dir=str(data_root), out=str(run),
                       time_budget=1e-3)
    report = time_to_accuracy(cfg, 0.99)
    assert report["stopped_early"] is True and report["epochs_done"] == 1 and report["reached"] is False
    assert report["time_budget"] == 1e-3 and report["final_test_top1"] is not None
    (row,) = RunDir(run).read_metrics()
    assert row["epoch"] == 1 and row["test_top1"] is not None  # evaluated although eval_every is 3
    state = load_checkpoint(RunDir(run).checkpoint)
    assert state["epoch"] == 1 and state["step"] == 0
    assert not RunDir(run).summary.exists()
    summary = train(build_config(None, **{**state["config"], "time_budget": None}), resume=run)
    assert summary["epochs"] == 3 and len(RunDir(run).read_metrics()) == 3


def gpu_check(*args, timeout=300) -> subprocess.CompletedProcess:
    """scripts/gpu-check.sh ARGS with no GPU visible (whatever the machine has)."""
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "ISOCONV_PYTHON": sys.executable,
                                                "CUDA_VISIBLE_DEVICES": ""})


def test_gpu_check_quick_on_cpu_writes_the_summary(data_root, tmp_path):
    """Without a GPU and without --device, --quick checks the CPU and says so on its first line (was: all three
    steps ran into the same "no CUDA GPU" error)."""
    out = tmp_path / "gpu-check"
    done = gpu_check("--quick", "--data-dir", str(data_root), "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[0] == "gpu-check.sh: no CUDA GPU visible; --quick runs on the CPU instead " \
                                          "(--device cpu)"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True and summary["device"] == "cpu" and summary["quick"] is True
    assert list(summary["steps"]) == ["doctor", "bench", "tta"]
    assert all(s["exit_code"] == 0 and s["seconds"] > 0 for s in summary["steps"].values())
    assert summary["doctor"]["ok"] is True
    assert {(r["loader"], r["amp"]) for r in summary["throughput"]["rows"]} == {("device", "fp32"),
                                                                                 ("torchvision", "fp32")}
    tta = summary["time_to_accuracy"]
    assert tta["threshold"] == 0.925 and tta["epochs"] == 1 and tta["final_test_top1"] is not None
    md = (out / "summary.md").read_text()
    for section in ("# GPU check (cpu, quick)", "## Doctor", "## Throughput", "## Time to accuracy",
                    "| checkpoint write + exact resume | ✔ |", "| cm-cpu | torchvision | fp32 |"):
        assert section in md
    assert (out / "tta-run" / "last.pt").exists()


@pytest.mark.parametrize("args", [[], ["--quick", "--device", "cuda"], ["--device", "cuda:0", "--budget", "60"]])
def test_gpu_check_without_a_gpu_stops_in_one_line_before_any_step(tmp_path, args):
    out = tmp_path / "gpu-check"
    done = gpu_check(*args, "--out", str(out), timeout=120)
    device = args[args.index("--device") + 1] if "--device" in args else "cuda"
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"gpu-check.sh: error: no CUDA GPU visible for --device {device} (torch.cuda.is_available() is false); run "
        f"it on a GPU machine, or pass --quick (without --device) or --device cpu to check this CPU"]
    assert not out.exists()
