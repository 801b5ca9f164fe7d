"""`--amp auto` on a CPU: decided by measurement, not by a rule.

A CPU with bf16 instructions (AVX512-BF16, AMX) is not always faster in bf16: on a 2-core AVX512-BF16 CPU `cm-cpu`
trains at 779 img/s in fp32 and 621 in bf16, while `cm-vanilla` at batch 128 is faster in bf16. So the first run of
a model config and batch size on a machine times a few real training steps (forward, backward, AdamW) in each
precision on a copy of the model, keeps the faster, and caches the verdict in `amp-auto.json` in the isoconv cache
folder ($ISOCONV_CACHE or ~/.cache/isoconv), keyed by the CPU (model name and flags), torch version and thread
count, the model config and the batch size. A CPU without bf16 instructions always trains in fp32 (bf16 there is
10-40x slower) without measuring; GPUs keep runtime.resolve_precision's rule.

The measurement runs under a forked RNG on a deep copy, so a run's results do not depend on whether it measured.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import TrainConfig
from ..fileio import atomic_write
from ..runtime import CACHE_ENV, autocast, cache_folder, cpu_flags, cpu_has_native_bf16, cpu_name, resolve_precision
from . import distributed as ddp
from .distributed import SINGLE, Dist

log = logging.getLogger(__name__)

CACHE_FILE = "amp-auto.json"
CANDIDATES = ("fp32", "bf16")
WARMUP_STEPS = 1
TIMED_STEPS = 3
MARGIN = 1.03  # bf16 must be at least 3% faster: a tie keeps the exact precision
# Part of the cache key: bump it when the CPU training path changes speed (kernels, fast paths), so that verdicts
# measured with the old code are measured again. 2: fast depthwise backward from 2^19 elements (cm-cpu); 3: fused
# activation + BatchNorm; 4: C kernels for the depthwise weight gradient and GELU + statistics.
MEASUREMENT_VERSION = 4
clock = time.perf_counter  # tests replace it


def cache_path() -> Path:
    return cache_folder() / CACHE_FILE


def measurement_key(cfg: TrainConfig, batch: int, image_size: int, num_classes: int) -> str:
    machine = {"cpu": cpu_name(), "flags": sorted(cpu_flags()), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "version": MEASUREMENT_VERSION}
    model = {"model": cfg.model, "overrides": cfg.model_overrides(), "channels_last": cfg.channels_last,
             "compile": cfg.compile, "image_size": image_size, "classes": num_classes, "batch": batch}
    text = json.dumps({"machine": machine, "model": model}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, key: str, entry: dict) -> None:
    data = read_cache(path)
    data[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError as e:  # an unwritable cache only costs a new measurement next time
        log.warning(f"cannot cache the --amp auto measurement in {path} ({e.strerror or e}); set {CACHE_ENV} to a "
                    f"writable folder")


def images_per_second(model: torch.nn.Module, precisions: tuple[str, ...], batch: int, image_size: int,
                      num_classes: int, channels_last: bool, steps: int = TIMED_STEPS,
                      warmup: int = WARMUP_STEPS) -> dict[str, float]:
    """Training images/s per precision: real steps (forward, cross-entropy, backward, AdamW) of a copy of `model`
    on random images on the CPU. The precisions take turns step by step, so a machine busy with other work slows
    them alike; each one's median step time counts."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    device = torch.device("cpu")
    runs = {}
    for p in precisions:
        net = copy.deepcopy(model).train()
        runs[p] = (net, torch.optim.AdamW(net.parameters(), lr=1e-6), [])
    for i in range(warmup + steps):
        for p, (net, opt, times) in runs.items():
            t0 = clock()
            with autocast(device, p):
                loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= warmup:
                times.append(clock() - t0)
    return {p: batch / max(statistics.median(times), 1e-9) for p, (_, _, times) in runs.items()}


def choose_precision(cfg: TrainConfig, model: torch.nn.Module, device: torch.device, *, batch: int, image_size: int,
                     num_classes: int, dist: Dist = SINGLE) -> tuple[str, Optional[str]]:
    """(precision, why) for `--amp`; `why` is None when there was nothing to decide (an explicit --amp, a GPU)."""
    if cfg.amp != "auto" or device.type != "cpu":
        return resolve_precision(cfg.amp, device, cfg.cuda_amp), None
    if not cpu_has_native_bf16():
        return "fp32", "this CPU has no bf16 instructions (bf16 would be many times slower)"
    key = measurement_key(cfg, batch, image_size, num_classes)
    path = cache_path()
    entry = read_cache(path).get(key)
    source = f"measured earlier on this machine, cached in {path}"
    if not (isinstance(entry, dict) and set(CANDIDATES) <= set(entry)):
        with torch.random.fork_rng(devices=[]):
            entry = images_per_second(model, CANDIDATES, batch, image_size, num_classes, cfg.channels_last)
        entry.update(model=cfg.model, batch=batch, cpu=cpu_name())
        if dist.is_main:
            write_cache(path, key, entry)
        source = f"measured now, {TIMED_STEPS} training steps each; cached in {path}"
    chosen = "bf16" if entry["bf16"] > MARGIN * entry["fp32"] else "fp32"
    if dist.enabled:  # every process trains in rank 0's choice
        code = torch.tensor([CANDIDATES.index(chosen) if dist.is_main else 0], dtype=torch.float64)
        chosen = CANDIDATES[int(ddp.sum_over_ranks(dist, code.to(dist.device or device)).item())]
    why = (f"--amp auto chose {chosen} on this CPU: fp32 {entry['fp32']:.0f} img/s, bf16 {entry['bf16']:.0f} img/s "
           f"for {cfg.model} at batch {batch} ({source})")
    return chosen, why
