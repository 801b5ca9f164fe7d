"""torchrun / DistributedDataParallel on CPU: 2 gloo processes against single-process runs with the same global batch.

Tolerance for "the same weights": max abs difference 1e-3 after 8 AdamW steps. The inputs of every step are
bit-identical to the single process's; what differs is float summation order (gradient all-reduce, cross-process
BatchNorm statistics), which training amplifies. Measured on this setup: DDP vs one process 5e-5 (two single-process
runs with 1 vs 2 threads: 9e-5); the same DDP run without --sync-bn 8e-3. At lr 0.02 instead of 0.002 the
thread-count noise alone reaches 2e-2, hence the small learning rate.
"""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from isoconv.cli import build_parser
from isoconv.config import build_config, settings_from_args
from isoconv.data.loaders import batch_slices, shard_bounds
from isoconv.errors import ConfigError
from isoconv.eval.run import evaluate_target
from isoconv.train import distributed as ddp
from isoconv.train import train
from isoconv.weights import load_checkpoint

WEIGHT_ATOL = 1e-3
TEST_IMAGES = 1100  # three evaluation chunks of 500: two for rank 0, one (padded when gathered) for rank 1

# 4 steps per epoch (64, 64, 64 and an uneven 59: 30 + 29 images), 2 epochs, a checkpoint every 2 steps,
# cross-process BatchNorm; Mixup/CutMix with the device loader in one test, the torchvision loader in the other.
FLAGS = ["--model", "cm-cpu", "--dim", "16", "--depth", "1", "--train-subset", "251", "--test-subset", str(TEST_IMAGES),
         "--batch-size", "64", "--epochs", "2", "--amp", "off", "--schedule", "onecycle-frac", "--lr-max", "0.002",
         "--ra-n", "1", "--reprob", "0.25", "--jitter", "0.1", "--sync-bn", "--ckpt-every-steps", "2"]
MIX = ["--mixup", "0.8", "--cutmix", "1.0"]
TORCHVISION = ["--loader", "torchvision", "--workers", "0"]


def quiet(*_):
    pass


def torchrun(args, env=None, pause=None) -> subprocess.Popen:
    """`torchrun --nproc-per-node 2 -m isoconv train ARGS`; with pause=(event, seconds) every process freezes at that
    event (tests/pause_runner.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ISOCONV_DIST_TIMEOUT": "30", **(env or {})}
    program = ["-m", "isoconv"] if pause is None else [str(Path(__file__).with_name("pause_runner.py")), *pause]
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             *program, "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def config_from_flags(flags, data_root, out):
    """The TrainConfig `isoconv train FLAGS` builds (for the in-process single-process references)."""
    args = build_parser().parse_args(["train", *flags, "--data-dir", str(data_root), "--out", str(out)])
    return build_config(None, **settings_from_args(args))


def single_process_run(flags, data_root, out) -> Path:
    train(config_from_flags(flags, data_root, out))
    return out


def assert_same_weights(a: Path, b: Path):
    wa, wb = load_checkpoint(a / "last.pt")["model"], load_checkpoint(b / "last.pt")["model"]
    assert wa.keys() == wb.keys() and not any(k.startswith("module.") for k in wa)
    worst = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
    assert worst <= WEIGHT_ATOL, f"weights differ by {worst:.2e}"


def metrics(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("ddp") / "run"
    p = torchrun([*FLAGS, *MIX, "--data-dir", str(data_root), "--out", str(out)])
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    return out, stdout


def test_two_processes_train_like_one_process_with_the_same_global_batch(ddp_run, data_root, tmp_path):
    run, stdout = ddp_run
    reference = single_process_run([*FLAGS, *MIX], data_root, tmp_path / "single")
    assert_same_weights(run, reference)
    rows, ref_rows = metrics(run), metrics(reference)
    assert [r["epoch"] for r in rows] == [1, 2]  # rank 0 alone writes the metrics
    for r, s in zip(rows, ref_rows):
        assert r["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)
        assert r["test_loss"] == pytest.approx(s["test_loss"], rel=1e-3)
        assert r["test_top1"] == pytest.approx(s["test_top1"], abs=0.01)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["batch_per_process"] == 32
    assert stdout.count("global batch 64") == 1 and stdout.count("test top-1") == 1  # only rank 0 logs


def test_sharded_evaluation_equals_single_process_evaluation_exactly(ddp_run, data_root):
    run, _ = ddp_run
    single = evaluate_target(run, data_dir=str(data_root), download=False, test_subset=TEST_IMAGES, device="cpu")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_images"] == single["test_images"] == TEST_IMAGES
    for key in ("test_top1", "test_top5", "test_loss", "confusion_matrix", "macro_f1"):
        assert summary[key] == single[key], key


def test_killed_rank_ends_the_job_and_the_run_resumes_in_one_process(data_root, tmp_path):
    run, flags = tmp_path / "run", [*FLAGS, *TORCHVISION]
    # Both processes freeze briefly at their 7th step (epoch 2, after its step-2 checkpoint); rank 1 is killed there.
    p = torchrun([*flags, "--data-dir", str(data_root), "--out", str(run)],
                 pause=("step@7", "2"))
    try:
        seen = []
        for line in p.stdout:  # both ranks print this line; search, as lines of two processes may share a write
            seen.append(line)
            m = re.search(r"ISOCONV_TEST_PAUSED step@7 rank=1 pid=(\d+)", line)
            if m:
                os.kill(int(m.group(1)), signal.SIGKILL)
                break
        else:
            raise AssertionError(f"rank 1 never paused: {''.join(seen)[-3000:]} {p.stderr.read()[-3000:]}")
        _, stderr = p.communicate(timeout=120)  # the dead peer is noticed at once, well within the 30 s timeout
    finally:
        p.kill()
    assert p.returncode != 0
    assert "isoconv: error: process 0 of 2 lost contact with the others" in stderr
    assert f"--resume {run}" in stderr
    state = load_checkpoint(run / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 2)
    assert not (run / "summary.json").exists()

    # The 2-process mid-epoch checkpoint continues in a single process and ends where a single process would have.
    train(build_config(None, **state["config"]), resume=run)
    reference = single_process_run(flags, data_root, tmp_path / "single")
    assert_same_weights(run, reference)
    assert [r["epoch"] for r in metrics(run)] == [1, 2]
    for r, s in zip(metrics(run), metrics(reference)):
        assert r["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)


def test_world_size_that_does_not_divide_the_batch_is_a_clear_error(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = build_config(None, model="cm-cpu", batch_size=63, data_dir=str(data_root), out=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match=r"--batch-size 63 is the global batch, split over the 2 processes .* "
                                          r"use a multiple of 2 \(e\.g\. 62\)"):
        train(cfg)
    assert not (tmp_path / "r").exists()


def test_bad_timeout_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("ISOCONV_DIST_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="ISOCONV_DIST_TIMEOUT='soon' must be a positive number of seconds"):
        ddp.timeout_seconds()


@pytest.mark.parametrize("n, world", [(64, 2), (7, 3), (2, 4), (500, 8)])
def test_shards_cover_a_batch_contiguously_and_evenly(n, world):
    bounds = [shard_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_trailing_batch_too_small_for_every_process_is_dropped():
    assert batch_slices(130, 64) == [(0, 64), (64, 128), (128, 130)]  # one process keeps a trailing batch of 2
    assert batch_slices(130, 64, world_size=4) == [(0, 64), (64, 128)]  # four processes cannot split 2 images
    assert batch_slices(132, 64, world_size=4)[-1] == (128, 132)


def test_cross_process_batchnorm_is_plain_batchnorm_in_one_process():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5)
    expected = bn(x)
    converted = ddp.convert_sync_batchnorm(torch.nn.Sequential(bn), torch.device("cpu"))[0]
    assert type(converted) is ddp.CrossProcessBatchNorm2d and converted.weight is bn.weight
    assert torch.equal(converted(x), expected)


def test_torchvision_loader_shards_are_slices_of_the_single_process_batches(data_root):
    from isoconv.augment.reference import torchvision_train_transform
    from isoconv.data import load_dataset
    from isoconv.data.loaders import TorchvisionLoader

    ds = load_dataset("cifar10", data_root, "train", download=False).subset(75)  # batches of 32, 32 and 11 = 6 + 5
    transform = torchvision_train_transform(image_size=32, mean=ds.mean, std=ds.std, scale=0.75, translate=2,
                                            hflip=True, ra_n=1, ra_m=8, jitter=0.1, reprob=0.25, no_aug=False)

    def batches(rank, world):
        loader = TorchvisionLoader(ds, 32, transform, torch.Generator().manual_seed(0), torch.device("cpu"),
                                   workers=0, rank=rank, world_size=world)
        return list(loader.batches(loader.epoch_order(), start=1))  # from step 1, as when resuming mid-epoch

    single, shards = batches(0, 1), [batches(0, 2), batches(1, 2)]
    assert [len(y) for _, y in single] == [32, 11] and [len(y) for _, y in shards[1]] == [16, 5]
    for (x, y), (x0, y0), (x1, y1) in zip(single, *shards):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
