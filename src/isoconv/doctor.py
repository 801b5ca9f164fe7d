"""`isoconv doctor`: is this machine ready to train fast? The environment, then every fast-path feature tried.

Each check trains a few steps of a tiny ConvMixer (cm-cpu, dim 16, depth 1) on a synthetic in-memory dataset (no
data is read or downloaded), through the very objects `isoconv train` uses (`build_training`, the bound
`TrainStep`, the device loader, the checkpoint writer and `restore`). A check passes (✔), fails with its reason (✗),
or does not apply to the device (-, e.g. fused AdamW on a CPU). `run_doctor` returns 0 when every check that
applies passed, else 1.

`scripts/gpu-check.sh` runs this, `isoconv bench` and a time-to-accuracy run (see docs/gpu.md).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as torch_dist

from . import runtime
from .config import build_config
from .data.dataset import ImageDataset
from .errors import UserError
from .fileio import atomic_write
from .rundir import RunDir
from .malloc_tuning import tune_allocator
from .models.compiled import c_compiler
from .runtime import cpu_flags, cpu_name, cxx_compiler, resolve_device
from .train import distributed as ddp
from .train.loop import evaluate, restore, save_run_checkpoint
from .train.setup import Training, build_training
from .weights import load_checkpoint

log = logging.getLogger(__name__)

SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
MALLOC_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
STEPS = 3  # training steps per check
MARKS = {"ok": "✔", "fail": "✗", "n/a": "-"}
TINY = dict(model="cm-cpu", dim=16, depth=1, batch_size=16, epochs=1, lr_max=0.01, workers=0,
            channels_last=False, no_aug=True, ra_n=0, jitter=0.0, reprob=0.0, scale=1.0, hflip=False)
ALL_AUGMENTATIONS = dict(no_aug=False, ra_n=2, ra_m=12, scale=0.75, translate=2, hflip=True, jitter=0.1,
                         reprob=0.25, mixup=0.8, cutmix=1.0, label_smoothing=0.1)


class NotApplicable(Exception):
    """The feature does not exist on this device (shown as `-`, does not fail the doctor)."""


@dataclass
class Check:
    name: str
    status: str  # ok, fail, n/a
    detail: str
    seconds: float


# ----------------------------------------------------------------------------- the environment

def allocator_info(device: torch.device) -> str:
    tuned = [f"{v}={os.environ[v]}" for v in MALLOC_VARS if os.environ.get(v)]
    preload = [lib for lib in ("jemalloc", "tcmalloc") if lib in os.environ.get("LD_PRELOAD", "")]
    parts = [tune_allocator()] + tuned + [f"LD_PRELOAD {lib}" for lib in preload]
    if device.type == "cuda" and os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
        parts.append(f"PYTORCH_CUDA_ALLOC_CONF={os.environ['PYTORCH_CUDA_ALLOC_CONF']}")
    return ", ".join(parts) if parts else "not tuned"


def device_memory_gib(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    import torchvision

    flags = cpu_flags()
    cuda = device.type == "cuda"
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
            "device_memory_gib": device_memory_gib(device), "cpu": cpu_name(),
            "cpu_flags": {f: f in flags for f in SPEED_FLAGS}, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "allocator": allocator_info(device), "cxx_compiler": cxx_compiler(),
            "compile_backend": runtime.COMPILE_BACKEND, "c_compiler": c_compiler()}


def environment_lines(env: dict[str, Any]) -> list[str]:
    memory = env["device_memory_gib"]
    lines = [f"torch {env['torch']}, torchvision {env['torchvision']}, Python {env['python']}"
             + (f", CUDA {env['cuda']}" if env["cuda"] else ""),
             f"device {env['device']}: {env['device_name']}" + (f", {memory:.1f} GiB" if memory else ""),
             "CPU flags: " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in env["cpu_flags"].items()),
             f"threads: {env['threads']} torch threads, {env['cpu_count']} CPUs",
             f"allocator: {env['allocator']}",
             f"C++ compiler: {env['cxx_compiler'] or 'none on PATH'} (torch.compile backend {env['compile_backend']})",
             f"C compiler: {env['c_compiler'] or 'none on PATH: CPU training uses aten kernels (slower)'} "
             f"(CPU training kernels)"]
    return lines


# ----------------------------------------------------------------------------- the checks

def synthetic_data(train_images: int = 64, test_images: int = 32, size: int = 32) -> tuple[ImageDataset, ImageDataset]:
    """Random uint8 images with labels 0..9, generated on the CPU from a fixed seed."""
    gen = torch.Generator().manual_seed(0)

    def split(n: int, name: str) -> ImageDataset:
        return ImageDataset(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen),
                            torch.arange(n, dtype=torch.int64) % 10, [f"class{i}" for i in range(10)],
                            (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "synthetic", name, split_images=n)
    return split(train_images, "train"), split(test_images, "test")


def tiny_training(device: torch.device, **overrides) -> Training:
    cfg = build_config(None, **{**TINY, "device": str(device), **overrides})
    return build_training(cfg, data=synthetic_data())


def train_steps(t: Training, steps: int = STEPS) -> float:
    """Run `steps` training steps; the last loss (a failure when it is not finite)."""
    t.step.model.train()
    batches = iter(t.loader)
    loss = None
    for _ in range(steps):
        x, y = next(batches)
        loss, _ = t.step(x, y)
    value = float(loss)
    if value != value or value in (float("inf"), float("-inf")):
        raise RuntimeError(f"the loss is not finite ({value})")
    return value


def check_precision(device: torch.device, precision: str) -> str:
    amp = {"fp32": "off"}.get(precision, precision)
    if precision == "fp16" and device.type != "cuda":
        raise NotApplicable("fp16 with a grad scaler is for CUDA")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise NotApplicable("this GPU has no bf16")
    t = tiny_training(device, amp=amp)
    loss = train_steps(t)
    note = ""
    if precision == "bf16" and device.type == "cpu" and not runtime.cpu_has_native_bf16():
        note = "; works, but this CPU has no bf16 instructions (slow: --amp auto trains in fp32 here)"
    if precision == "fp16" and not t.scaler.is_enabled():
        raise RuntimeError("the fp16 grad scaler is not enabled")
    return f"{STEPS} steps, loss {loss:.3f}{note}"


def check_fp32(device):
    return check_precision(device, "fp32")


def check_bf16(device):
    return check_precision(device, "bf16")


def check_fp16(device):
    return check_precision(device, "fp16")


def check_channels_last(device: torch.device) -> str:
    t = tiny_training(device, channels_last=True)
    weight = next(p for p in t.model.parameters() if p.dim() == 4)
    if not weight.is_contiguous(memory_format=torch.channels_last):
        raise RuntimeError("the model's conv weights are not channels-last")
    return f"{STEPS} steps, loss {train_steps(t):.3f}"


def check_compile(device: torch.device, mode: str = "default") -> str:
    if device.type == "cpu" and runtime.COMPILE_BACKEND == "inductor" and cxx_compiler() is None:
        raise RuntimeError("no C++ compiler (g++ or clang++) on PATH; inductor needs one on a CPU")
    torch._dynamo.reset()
    t = tiny_training(device, compile=True, compile_mode=mode)
    loss = train_steps(t)
    return f"{STEPS} steps, loss {loss:.3f}, compiled in {t.step.compile_seconds or 0:.1f} s"


def check_compile_default(device):
    return check_compile(device, "default")


def check_cuda_graphs(device: torch.device) -> str:
    if device.type != "cuda":
        raise NotApplicable("CUDA graphs are for CUDA")
    return check_compile(device, "reduce-overhead")


def check_fused_adamw(device: torch.device) -> str:
    if device.type != "cuda":
        raise NotApplicable("fused AdamW is used on CUDA only")
    t = tiny_training(device)
    if not t.optimizer.defaults.get("fused"):
        raise RuntimeError("the optimizer built for CUDA is not fused")
    return f"{STEPS} steps, loss {train_steps(t):.3f}"


def check_device_loader(device: torch.device) -> str:
    t = tiny_training(device, loader="device", **ALL_AUGMENTATIONS)
    x, y = next(iter(t.loader))
    if t.train_ds.images.device != device or x.device != device or y.device != device:
        raise RuntimeError(f"data or batches are not on {device} (data {t.train_ds.images.device}, batch "
                           f"{x.device})")
    if x.dtype != torch.float32 or not bool(torch.isfinite(x).all()):
        raise RuntimeError(f"augmented batch is {x.dtype} or not finite")
    return (f"{STEPS} steps with RandAugment, crop, translate, flip, jitter, erasing, mixup/cutmix on {device}, "
            f"loss {train_steps(t):.3f}")


def check_ddp(device: torch.device) -> str:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and not torch_dist.is_nccl_available():
        raise RuntimeError("this torch build has no NCCL")
    if torch_dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process")
    with tempfile.TemporaryDirectory() as tmp:
        torch_dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1,
                                      timeout=datetime.timedelta(seconds=60),
                                      **({"device_id": device} if device.type == "cuda" else {}))
        try:
            t = tiny_training(device)
            t.step.model = ddp.wrap_ddp(t.model, ddp.Dist(0, 1, 0, device, backend))
            loss = train_steps(t)
            total = torch.ones((), device=device)
            torch_dist.all_reduce(total)
            if float(total) != 1.0:
                raise RuntimeError(f"all_reduce over one process gave {float(total)}")
        finally:
            torch_dist.destroy_process_group()
    return f"1-process {backend} group, DistributedDataParallel: {STEPS} steps, loss {loss:.3f}"


def tensors_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(tensors_equal, a, b))
    return a == b


def check_checkpoint(device: torch.device) -> str:
    t = tiny_training(device, **ALL_AUGMENTATIONS)
    train_steps(t, 2)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "run")
        run.path.mkdir()
        save_run_checkpoint(t, run, 0, 2, None, 0.0)
        state = load_checkpoint(run.checkpoint)
        size = run.checkpoint.stat().st_size
    fresh = tiny_training(device, **ALL_AUGMENTATIONS, seed=1)
    restore(fresh, state)
    for what, a, b in (("model weights", t.model.state_dict(), fresh.model.state_dict()),
                       ("optimizer state", t.optimizer.state_dict(), fresh.optimizer.state_dict()),
                       ("grad scaler", t.scaler.state_dict(), fresh.scaler.state_dict()),
                       ("data generator", t.generator.get_state(), fresh.generator.get_state())):
        if not tensors_equal(a, b):
            raise RuntimeError(f"the {what} after reloading differs from the saved run")
    return f"wrote {size / 1e3:.0f} kB, reloaded: weights, optimizer, scaler and RNG equal"


def check_eval(device: torch.device) -> str:
    t = tiny_training(device, amp="bf16" if device.type == "cuda" else "off")
    train_steps(t, 1)
    result = evaluate(t)
    if not 0.0 <= result["test_top1"] <= 1.0:
        raise RuntimeError(f"test top-1 {result['test_top1']} is not a fraction")
    return f"{len(t.test_ds)} images in {t.precision}, top-1 {result['test_top1']:.3f}"


def checks() -> list[tuple[str, Callable[[torch.device], str]]]:
    """(row name, check) in table order; looked up at call time, so a test can replace one."""
    return [("train fp32", check_fp32), ("train bf16 autocast", check_bf16),
            ("train fp16 + grad scaler", check_fp16), ("channels_last", check_channels_last),
            ("torch.compile", check_compile_default), ("compile reduce-overhead (CUDA graphs)", check_cuda_graphs),
            ("fused AdamW", check_fused_adamw), ("device loader, all augmentations", check_device_loader),
            ("DDP 1-process group", check_ddp), ("checkpoint write + exact resume", check_checkpoint),
            ("evaluation in training precision", check_eval)]


def first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text if isinstance(e, (UserError, NotApplicable)) else f"{type(e).__name__}: {text}"


def run_check(name: str, fn: Callable[[torch.device], str], device: torch.device) -> Check:
    t0 = time.perf_counter()
    try:
        status, detail = "ok", fn(device)
    except NotApplicable as e:
        status, detail = "n/a", first_line(e)
    except Exception as e:  # a doctor reports every failure and goes on
        status, detail = "fail", first_line(e)
    return Check(name, status, detail, time.perf_counter() - t0)


def table_lines(results: list[Check]) -> list[str]:
    width = max(len(c.name) for c in results)
    return [f"{'feature':<{width}}  ok  seconds  detail"] + [
        f"{c.name:<{width}}  {MARKS[c.status]:<2}  {c.seconds:>7.1f}  {c.detail}" for c in results]


def run_doctor(device_name: str = "auto", json_path: Optional[Path] = None, skip: Sequence[str] = ()) -> int:
    """Print the environment and the feature table; 0 when every check that applies passed, else 1.
    `skip`: words; a check whose name contains one is not run (e.g. "compile": compiling takes a minute on a CPU)."""
    device = resolve_device(device_name)
    env = environment(device)
    for line in environment_lines(env):
        log.info(line)
    log.info("")
    results = []
    for name, fn in checks():
        if any(word.lower() in name.lower() for word in skip):
            results.append(Check(name, "n/a", "skipped (--skip)", 0.0))
            continue
        results.append(run_check(name, fn, device))
        log.debug(f"{name}: {results[-1].status}")
    for line in table_lines(results):
        log.info(line)
    failed = [c.name for c in results if c.status == "fail"]
    log.info("")
    log.info(f"{len(failed)} of {sum(c.status != 'n/a' for c in results)} checks failed: {', '.join(failed)}"
             if failed else f"ready: every fast-path feature for {device} works")
    if json_path:
        report = {"device": str(device), "ok": not failed, "environment": env,
                  "checks": [asdict(c) for c in results]}
        atomic_write(Path(json_path), json.dumps(report, indent=2))
    return 1 if failed else 0
