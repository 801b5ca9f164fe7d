"""`isoconv bench`: training and inference throughput side by side, and time to accuracy.

Throughput (`run_bench`): for every model x loader x precision, `warmup` untimed training steps (with
--compile they include the compilation), then `windows` timed windows of `steps` real training steps
(augmentation, mixing, AdamW); the median window gives training images/s. Inference images/s is measured the
same way on forward passes in eval mode over one fixed batch. Beside each rate:

- achieved GFLOP/s: forward FLOPs per image (counted by `torch.utils.flop_counter`) x images/s, times 3 for
  training (the backward pass costs about twice the forward), next to the machine's rate on one large square
  matmul in the same precision, so the distance to the hardware limit is visible;
- the training-epoch time: estimated from the rate for the whole training split (or `--epoch-images`), and with
  `full_epoch` an actual timed epoch;
- the speedup over the conventional torchvision loader at the same precision and at fp32.

Time to accuracy (`time_to_accuracy`): trains a config with `isoconv.train.loop.train` and reports when test
top-1 first reached a threshold, in training seconds and in wall seconds since the start.

The training rows time the very step `train` runs (`Training.step`, built by `build_training`), and every
timing goes through `torch.utils.benchmark.Timer` (device work included, at the process's thread count).
"""
from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

from .config import TrainConfig
from .errors import ConfigError
from .fileio import atomic_write
from .malloc_tuning import tune_allocator
from .models import build_model
from .models.flops import forward_flops
from .rundir import RunDir
from .runtime import (PRECISIONS, SPEED_FLAGS, autocast, cpu_flags, cpu_name, resolve_device, resolve_precision,
                      synchronize)
from .train.loop import format_row, train
from .train.setup import Training, build_training

log = logging.getLogger(__name__)


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of fn takes, device work included."""
    # imported here, not at the top: torch.utils.benchmark loads torch.utils.cpp_extension, which warns about the
    # CUDA toolkit on machines without one, and every `isoconv` command imports this module
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(1).median


def median_seconds(fn: Callable[[], Any], windows: int) -> float:
    return statistics.median(timed(fn) for _ in range(windows))


# ----------------------------------------------------------------------------- the machine

def default_matmul_size(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 1024


def matmul_gflops(device: torch.device, amp: str, size: Optional[int] = None, repeats: int = 3) -> float:
    """GFLOP/s of one `size` x `size` matmul in the precision `amp` (fp32, bf16 or fp16): median of `repeats`
    timed calls after one untimed (only one when a call takes over half a second, as bf16 on CPUs without bf16
    instructions does). fp32 on a GPU uses whatever torch.backends allow (TF32 is off by default)."""
    size = size or default_matmul_size(device)
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = PRECISIONS[amp] or torch.float32
    a = torch.randn(size, size, device=device, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, generator=gen).to(dtype)
    if timed(lambda: a @ b) > 0.5:
        repeats = 1
    seconds = median_seconds(lambda: a @ b, repeats)
    return 2 * size ** 3 / seconds / 1e9


def describe_device(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def machine_info(device: torch.device) -> dict[str, Any]:
    return {"device": str(device), "device_name": describe_device(device), "threads": torch.get_num_threads(),
            "cpu_flags": sorted(SPEED_FLAGS & cpu_flags()), "allocator": tune_allocator(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version()}


# ----------------------------------------------------------------------------- throughput

class Batches:
    """Endless training batches from a loader, one epoch after another."""

    def __init__(self, loader):
        self.loader, self.it = loader, iter(())

    def next(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)


def training_rate(t: Training, *, steps: int, warmup: int, windows: int) -> float:
    """Training images/s: the median of `windows` windows of `steps` real steps, after `warmup` untimed ones."""
    batches = Batches(t.loader)

    def train_steps(n: int) -> None:
        t.step.model.train()
        for _ in range(n):
            t.step(*batches.next())

    train_steps(warmup)
    return steps * t.cfg.batch_size / median_seconds(lambda: train_steps(steps), windows)


def inference_rate(t: Training, *, steps: int, warmup: int, windows: int) -> tuple[float, float]:
    """(inference images/s on one fixed batch in eval mode, seconds of the very first call)."""
    model, device, size, batch = t.step.model, t.device, t.train_ds.image_size, t.cfg.batch_size
    x = torch.randn(batch, 3, size, size, device=device)
    if t.cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def infer(n: int) -> None:
        model.eval()
        for _ in range(n):
            with autocast(device, t.precision):
                model(x)

    first_call = timed(lambda: infer(1))
    infer(max(warmup - 1, 0))
    return steps * batch / median_seconds(lambda: infer(steps), windows), first_call


def full_epoch_seconds(t: Training) -> float:
    """Wall time of one real training epoch over the whole (sub)set, as train() runs it."""
    def one_epoch() -> None:
        t.step.model.train()
        for x, y in t.loader:
            t.step(x, y)
    return timed(one_epoch)


PROFILE_TOP = 15


def profile_steps(t: Training, steps: int) -> list[dict[str, Any]]:
    """The operators of `steps` training steps by self time (torch.profiler): name, ms per step, share of the step,
    most expensive first (the PROFILE_TOP largest, then the rest summed as "(other)")."""
    batches = Batches(t.loader)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if t.device.type == "cuda" else [])
    t.step.model.train()
    t.step(*batches.next())  # warm caches and (with --compile) compile outside the profile
    with profile(activities=activities) as prof:
        for _ in range(steps):
            t.step(*batches.next())
        synchronize(t.device)
    key = "self_device_time_total" if t.device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = [{"operator": e.key, "ms_per_step": getattr(e, key) / 1e3 / steps, "share": getattr(e, key) / total}
            for e in events[:PROFILE_TOP]]
    rest = sum(getattr(e, key) for e in events[PROFILE_TOP:])
    if rest:
        rows.append({"operator": "(other)", "ms_per_step": rest / 1e3 / steps, "share": rest / total})
    return rows


def profile_lines(rows: list[dict[str, Any]]) -> list[str]:
    width = max(len(r["operator"]) for r in rows)
    return [f"  {'operator':<{width}}  {'ms/step':>9}  {'share':>6}"] + [
        f"  {r['operator']:<{width}}  {r['ms_per_step']:>9.1f}  {100 * r['share']:>5.1f}%" for r in rows]


def bench_one(cfg: TrainConfig, *, steps: int, warmup: int, windows: int, full_epoch: bool = False,
              profile: bool = False) -> dict[str, Any]:
    """One row: training and inference images/s for cfg (model, loader, amp, batch size) and what follows."""
    if cfg.compile:  # every row compiles from scratch: its own compile time, and no recompile limit reached
        torch._dynamo.reset()
    t = build_training(cfg)
    for group in t.optimizer.param_groups:
        group["lr"] = cfg.lr_max / 10
    train_rate = training_rate(t, steps=steps, warmup=warmup, windows=windows)
    infer_rate, first_inference = inference_rate(t, steps=steps, warmup=warmup, windows=windows)
    epoch_seconds = full_epoch_seconds(t) if full_epoch else None
    top_ops = profile_steps(t, steps) if profile else None
    flops = forward_flops(t.model, t.train_ds.image_size)
    n = len(t.train_ds)
    return {"model": cfg.model, "loader": cfg.loader, "amp": t.precision, "batch_size": cfg.batch_size,
            "channels_last": cfg.channels_last, "compile": cfg.compile, "device": str(t.device),
            "train_images": n, "train_images_per_second": train_rate, "inference_images_per_second": infer_rate,
            "epoch_seconds_estimate": n / train_rate, "epoch_seconds": epoch_seconds,
            "forward_flops_per_image": flops, "train_gflops_per_second": 3 * flops * train_rate / 1e9,
            "inference_gflops_per_second": flops * infer_rate / 1e9,
            "compile_seconds": t.step.compile_seconds,
            "inference_compile_seconds": (max(0.0, first_inference - cfg.batch_size / infer_rate) if cfg.compile
                                          else None),
            "profile": top_ops}


def add_comparisons(rows: list[dict], matmul: dict[str, float]) -> None:
    """Fraction of the matmul rate, and speedups over the torchvision loader (same precision; fp32)."""
    baseline = {(r["model"], r["amp"]): r for r in rows if r["loader"] == "torchvision"}

    def ratio(row, base, key):
        return row[key] / base[key] if base and row[key] and base[key] else None

    for r in rows:
        r["matmul_gflops"] = matmul[r["amp"]]
        r["train_fraction_of_matmul"] = r["train_gflops_per_second"] / matmul[r["amp"]]
        same, fp32 = baseline.get((r["model"], r["amp"])), baseline.get((r["model"], "fp32"))
        r["speedup_vs_torchvision"] = ratio(r, same, "train_images_per_second")
        r["speedup_vs_torchvision_fp32"] = ratio(r, fp32, "train_images_per_second")
        # a shorter epoch is the better one: base / row
        r["epoch_speedup_vs_torchvision"] = ratio(same, r, "epoch_seconds") if same else None


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


TABLE_COLUMNS = (("model", "<16"), ("loader", "<12"), ("amp", "<5"), ("train img/s", ">11"),
                 ("infer img/s", ">11"), ("epoch s est", ">11"), ("epoch s", ">9"), ("train GFLOP/s", ">13"),
                 ("% matmul", ">8"), ("x tv", ">6"), ("x tv fp32", ">9"), ("compile s", ">9"))


def table_header() -> str:
    return " ".join(format(name, spec) for name, spec in TABLE_COLUMNS)


def table_row(r: dict) -> str:
    cells = (r["model"], r["loader"], r["amp"], _fmt(r["train_images_per_second"], ".1f"),
             _fmt(r["inference_images_per_second"], ".1f"), _fmt(r["epoch_seconds_estimate"], ".0f"),
             _fmt(r["epoch_seconds"], ".0f"), _fmt(r["train_gflops_per_second"], ".2f"),
             _fmt(r.get("train_fraction_of_matmul") and 100 * r["train_fraction_of_matmul"], ".1f"),
             _fmt(r.get("speedup_vs_torchvision"), ".2f"), _fmt(r.get("speedup_vs_torchvision_fp32"), ".2f"),
             _fmt(r["compile_seconds"], ".1f"))
    return " ".join(format(c, spec) for c, (_, spec) in zip(cells, TABLE_COLUMNS))


def bench_configs(cfg: TrainConfig, models: list[str], amps: list[str], loaders: list[str]) -> list[TrainConfig]:
    """One validated config per row, checked before anything is timed (a typo should not cost the earlier rows)."""
    configs = [replace(cfg, model=m, amp=a, loader=lo).validate() for m in models for lo in loaders for a in amps]
    for c in configs[::len(loaders) * len(amps)]:
        with torch.device("meta"):
            build_model(c, num_classes=10, image_size=None)
    return configs


def run_bench(cfg: TrainConfig, *, models: list[str], amps: list[str], loaders: list[str], steps: int = 5,
              warmup: int = 2, windows: int = 3, full_epoch: bool = False, matmul_size: Optional[int] = None,
              json_path: Optional[Path] = None, profile: bool = False) -> dict[str, Any]:
    """Every model x loader x precision; returns (and writes as JSON) {"machine": ..., "rows": [...]}."""
    for name, value, least in (("--steps", steps, 1), ("--windows", windows, 1), ("--warmup", warmup, 0)):
        if value < least:
            raise ConfigError(f"{name} must be at least {least}, got {value}")
    configs = bench_configs(cfg, models, amps, loaders)
    device = resolve_device(cfg.device)
    precisions = sorted({resolve_precision(c.amp, device) for c in configs}, key=list(PRECISIONS).index)
    size = matmul_size or default_matmul_size(device)
    matmul = {p: matmul_gflops(device, p, size) for p in precisions}
    machine = {**machine_info(device), "matmul_size": size, "matmul_gflops": matmul}
    log.info(f"{machine['device']} ({machine['device_name']}), {machine['threads']} threads, torch {machine['torch']}; "
             f"CPU flags: {' '.join(machine['cpu_flags']) or 'none of ' + ' '.join(sorted(SPEED_FLAGS))}; "
             f"allocator: {machine['allocator']}; {size}x{size} matmul: "
             + ", ".join(f"{p} {g:.3g} GFLOP/s" for p, g in matmul.items()))
    rows = []
    for c in configs:
        row = bench_one(c, steps=steps, warmup=warmup, windows=windows, full_epoch=full_epoch, profile=profile)
        rows.append(row)
        log.info(f"  {row['model']} {row['loader']} {row['amp']}: train {row['train_images_per_second']:.1f} img/s, "
                 f"inference {row['inference_images_per_second']:.1f} img/s")
        if row["profile"]:
            log.info(f"  where a training step's time goes ({row['model']} {row['loader']} {row['amp']}, "
                     f"self time by operator):")
            for line in profile_lines(row["profile"]):
                log.info(line)
    add_comparisons(rows, matmul)
    log.info(table_header())
    for row in rows:
        log.info(table_row(row))
    report = {"mode": "throughput", "machine": machine, "steps": steps, "warmup": warmup, "windows": windows,
              "rows": rows}
    if json_path:
        atomic_write(json_path, json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------- time to accuracy

def epoch_timeline(rows: list[dict], logged_at: dict[str, float]) -> list[dict[str, Any]]:
    """Per epoch: test top-1, cumulative training seconds, and the wall seconds at which its row was logged."""
    out, train_seconds = [], 0.0
    for r in rows:
        train_seconds += r["epoch_seconds"]
        line = format_row(r)
        out.append({"epoch": r["epoch"], "test_top1": r["test_top1"], "train_seconds": train_seconds,
                    "wall_seconds": logged_at.get(line)})
    return out


class LineClock(logging.Handler):
    """Notes when each training log line was emitted (seconds since t0): an epoch's row marks its end."""

    def __init__(self, t0: float):
        super().__init__(logging.INFO)
        self.t0, self.logged_at = t0, {}

    def emit(self, record: logging.LogRecord) -> None:
        self.logged_at.setdefault(record.getMessage(), time.perf_counter() - self.t0)


def time_to_accuracy(cfg: TrainConfig, threshold: float, *, json_path: Optional[Path] = None) -> dict[str, Any]:
    """Train cfg and report when test top-1 (a fraction) first reached `threshold`.

    wall_seconds counts from the call (data loading, model building, compilation, evaluation and checkpoints
    included); train_seconds only the training epochs. Only evaluated epochs (--eval-every) can count. With
    --time-budget the run may stop early (checkpointed, resumable): `stopped_early` is then true and the final
    figures are those of the last epoch trained.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--time-to-accuracy {threshold} is not a top-1 fraction in [0, 1]; "
                          f"write 0.925 for 92.5%")
    if not cfg.out:  # the run folder is needed even when a --time-budget stop returns no summary
        cfg = replace(cfg, out=str(RunDir.new(cfg.model).path))
    t0 = time.perf_counter()
    clock = LineClock(t0)
    train_log = logging.getLogger("isoconv.train")
    level = train_log.level
    train_log.addHandler(clock)
    train_log.setLevel(logging.INFO)  # the epoch rows are INFO records, whatever the caller's logging setup
    try:
        summary = train(cfg)
    finally:
        train_log.removeHandler(clock)
        train_log.setLevel(level)
    total_wall = time.perf_counter() - t0
    rows = RunDir(cfg.out).read_metrics()
    stopped_early = summary is None
    if stopped_early:  # --time-budget stopped it: the last trained epoch stands for the end
        device = resolve_device(cfg.device)
        summary = {"test_top1": next((r["test_top1"] for r in reversed(rows) if r["test_top1"] is not None), None),
                   "train_seconds": sum(r["epoch_seconds"] for r in rows), "run_dir": cfg.out,
                   "amp": resolve_precision(cfg.amp, device), "compile_seconds": None}
    timeline = epoch_timeline(rows, clock.logged_at)
    hit = next((e for e in timeline if e["test_top1"] is not None and e["test_top1"] >= threshold), None)
    report = {"mode": "time-to-accuracy", "threshold": threshold, "reached": hit is not None,
              "epoch": hit and hit["epoch"], "test_top1": hit and hit["test_top1"],
              "train_seconds": hit and hit["train_seconds"], "wall_seconds": hit and hit["wall_seconds"],
              "final_test_top1": summary["test_top1"], "total_train_seconds": summary["train_seconds"],
              "total_wall_seconds": total_wall, "compile_seconds": summary.get("compile_seconds"),
              "recipe": cfg.recipe, "model": cfg.model, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
              "amp": summary["amp"], "loader": cfg.loader, "run_dir": summary["run_dir"],
              "machine": machine_info(resolve_device(cfg.device)), "stopped_early": stopped_early,
              "epochs_done": len(rows), "time_budget": cfg.time_budget, "timeline": timeline}
    if hit:
        wall = _fmt(hit["wall_seconds"], ".1f", "?")
        log.info(f"time to {threshold:.2%} test top-1: epoch {hit['epoch']} ({hit['test_top1']:.2%}), "
            f"{hit['train_seconds']:.1f} s of training, {wall} s wall (data loading, compilation and "
            f"evaluation included)")
    else:
        best = max((e["test_top1"] for e in timeline if e["test_top1"] is not None), default=None)
        log.info(f"test top-1 never reached {threshold:.2%} in {len(rows)} epochs (best {_fmt(best, '.2%')}, "
            f"{summary['train_seconds']:.1f} s of training)")
    if json_path:
        atomic_write(json_path, json.dumps(report, indent=2))
    return report
