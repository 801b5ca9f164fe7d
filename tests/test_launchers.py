"""`isoconv ablate --launcher ray|slurm`: a tiny sweep on a local Ray instance with one task SIGKILLed mid-run, and
on submitit's local executor with one task preempted mid-run, both ending with the results of `--launcher local`;
the Slurm submission parameters through a stand-in `sbatch`.

The kill and the preemption are installed by `hooked_task` below, which the test puts in place of
`ablate.run_in_subprocess`; it runs in the Ray worker / submitit process (this folder is put on PYTHONPATH so they
can import it) and reads what to do from environment variables. Production code has no hook for it.
"""
import csv
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from isoconv.errors import UserError
from isoconv.experiments import ablate, run_ablation
from isoconv.experiments.ablate import run_in_subprocess as real_task
from isoconv.experiments.launchers import LaunchOptions, parse_time, submit_slurm
from isoconv.experiments.ablate import plan_runs
from isoconv.experiments.spec import load_spec

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
TINY = {"model": "cm-cpu", "dim": 8, "depth": 1, "train_subset": 64, "test_subset": 32, "batch_size": 32,
        "epochs": 2, "amp": "off", "device": "cpu"}  # 2 steps per epoch


def hooked_task(config, threads, stop_after):
    """Runs in the worker: records the attempt; the first attempt of $HOOK_RUN signals itself at step $HOOK_STEP."""
    with open(os.environ["HOOK_ATTEMPTS"], "a") as f:
        f.write(Path(config.out).relative_to(os.environ["HOOK_SWEEP"]).as_posix() + "\n")
    marker = Path(os.environ["HOOK_ATTEMPTS"] + ".hooked")
    if config.out.endswith(os.environ["HOOK_RUN"]) and not marker.exists():
        marker.touch()
        from isoconv.train.step import TrainStep

        real_step, count, at = TrainStep.__call__, [0], int(os.environ["HOOK_STEP"])

        def step(self, *args, **kwargs):
            out = real_step(self, *args, **kwargs)
            count[0] += 1
            if count[0] == at:
                os.kill(os.getpid(), getattr(signal, os.environ["HOOK_SIGNAL"]))
                time.sleep(30)  # the signal ends (or requeues) this process meanwhile
            return out
        TrainStep.__call__ = step
    return real_task(config, threads, stop_after)


def write_spec(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"description": "launcher test", "seeds": 2, "settings": TINY,
                                    "variants": [{"name": "relu", "activation": "relu"},
                                                 {"name": "gelu", "activation": "gelu"},
                                                 {"name": "silu", "activation": "silu"}]}))
    return path


def top1(out: Path) -> dict[str, float]:
    return {p.parent.relative_to(out).as_posix(): json.loads(p.read_text())["test_top1"]
            for p in out.glob("*/seed*/summary.json")}


def table(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return [{k: v for k, v in row.items() if "seconds" not in k and "relative" not in k}
                for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def local_sweep(data_root, tmp_path_factory):
    """The reference: the same sweep with --launcher local, one thread like each Ray/Slurm run."""
    root = tmp_path_factory.mktemp("launch")
    spec, out = write_spec(root / "tiny.yaml"), root / "local"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_ablation(str(spec), out=out, overrides={"data_dir": str(data_root)}, plots=False)
    finally:
        torch.set_num_threads(threads)
    return root, spec, out


def hook(monkeypatch, root: Path, sweep: Path, run: str, step: int, signame: str) -> Path:
    attempts = root / f"{sweep.name}-attempts.txt"
    monkeypatch.setattr(ablate, "run_in_subprocess", hooked_task)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(SRC), os.environ.get("PYTHONPATH", "")]))
    for key, value in (("HOOK_ATTEMPTS", attempts), ("HOOK_SWEEP", sweep), ("HOOK_RUN", run),
                       ("HOOK_STEP", step), ("HOOK_SIGNAL", signame)):
        monkeypatch.setenv(key, str(value))
    return attempts


def test_ray_sweep_survives_a_killed_task_and_matches_local(local_sweep, data_root, monkeypatch):
    ray = pytest.importorskip("ray")
    root, spec, local_out = local_sweep
    out = root / "ray"
    # step 3 of 4: in epoch 2, after epoch 1's checkpoint
    attempts = hook(monkeypatch, root, out, "gelu/seed1", 3, "SIGKILL")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 2**20)
    try:
        run_ablation(str(spec), out=out, overrides={"data_dir": str(data_root)}, plots=False, launcher="ray",
                     launch=LaunchOptions(cpus_per_run=1, retries=2))
        runs = attempts.read_text().splitlines()
        assert sorted(runs) == sorted([f"{v}/seed{s}" for v in ("relu", "gelu", "silu") for s in (0, 1)]
                                      + ["gelu/seed1"])  # only the killed run ran again
        log = (out / "gelu" / "seed1" / "ablate.log").read_text()
        assert "resuming after epoch 1" in log
        rows = (out / "gelu" / "seed1" / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 2
        assert top1(out) == top1(local_out) and len(top1(out)) == 6  # exact resume: same accuracy per run
        assert table(out) == table(local_out)
        stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/summary.json")}
        run_ablation(str(spec), out=out, overrides={"data_dir": str(data_root)}, plots=False, launcher="ray")
        assert attempts.read_text().splitlines() == runs  # nothing ran again
        assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/summary.json")} == stamps
    finally:
        ray.shutdown()


def test_slurm_array_on_submitits_local_executor_requeues_a_preempted_run(local_sweep, data_root, monkeypatch):
    pytest.importorskip("submitit")
    root, spec, local_out = local_sweep
    out = root / "slurm-local"
    attempts = hook(monkeypatch, root, out, "relu/seed0", 3, "SIGUSR2")  # submitit's preemption signal
    run_ablation(str(spec), out=out, seeds=1, overrides={"data_dir": str(data_root)}, plots=False,
                 only=["relu", "gelu"], launcher="slurm",
                 launch=LaunchOptions(cluster="local", cpus_per_run=1, poll_seconds=0.5))
    assert sorted(attempts.read_text().splitlines()) == ["gelu/seed0", "relu/seed0", "relu/seed0"]
    assert "resuming after epoch 1" in (out / "relu" / "seed0" / "ablate.log").read_text()
    expected = {k: v for k, v in top1(local_out).items() if k in ("relu/seed0", "gelu/seed0")}
    assert top1(out) == expected and len(expected) == 2
    assert any((out / "slurm").rglob("*.out"))  # submitit's logs stay with the sweep


def test_slurm_submission_parameters(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    capture = tmp_path / "sbatch-captured"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ncp \"$1\" {capture}\necho Submitted batch job 4242\n")
    fake.chmod(0o755)
    (fake.parent / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake.parent / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    spec = load_spec(str(write_spec(tmp_path / "tiny.yaml")))
    todo = plan_runs(spec, tmp_path / "sweep", 2, {})
    options = LaunchOptions(gpus_per_run=1, cpus_per_run=8, partition="gpu", time_min=parse_time("1-02:30:00"),
                            slurm_params={"account": "proj", "qos": "high"})
    jobs = submit_slurm(todo, real_task, stop_after=None, options=options, folder=tmp_path / "sweep" / "slurm",
                        name="isoconv-tiny", parallel=4)
    assert [j.job_id for j in jobs] == [f"4242_{i}" for i in range(6)]
    text = capture.read_text()
    for line in ("#SBATCH --array=0-5%4", "#SBATCH --partition=gpu", f"#SBATCH --time={26 * 60 + 30}",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --nodes=1", "#SBATCH --job-name=isoconv-tiny", "#SBATCH --account=proj",
                 "#SBATCH --qos=high", "#SBATCH --signal=USR2@90"):
        assert line in text, line
    assert "submitit.core._submit" in text


def test_time_parsing_and_launcher_errors(tmp_path, monkeypatch, capsys):
    from isoconv.cli import main

    assert [parse_time(t) for t in ("90", "1:30", "02:00:00", "1-00:00:00")] == [90, 90, 120, 1440]
    with pytest.raises(UserError, match="--time must be minutes"):
        parse_time("soon")
    spec = write_spec(tmp_path / "tiny.yaml")
    for module, launcher, package in (("ray", "ray", "ray"), ("submitit", "slurm", "submitit")):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # as if not installed
            assert main(["ablate", str(spec), "--out", str(tmp_path / "o"), "--launcher", launcher]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"isoconv: error: --launcher {launcher} needs the {package} package; `pip install "
                       f"'isoconv[{launcher}]'` (or `pip install {package}`), or use --launcher local")
    assert main(["ablate", str(spec), "--ray-address", "auto"]) == 2
    assert capsys.readouterr().err.strip() == "isoconv: error: --ray-address is for --launcher ray, not local"
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    assert main(["ablate", str(spec), "--out", str(tmp_path / "o"), "--launcher", "slurm", "--partition", "gpu"]) == 2
    assert "needs Slurm's sbatch and srun on PATH" in capsys.readouterr().err
