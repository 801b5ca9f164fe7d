"""`isoconv bench`: training and inference throughput, side by side over loaders and precisions.

Each configuration gets `warmup` untimed steps, then `windows` timed windows of `steps` steps each;
the median window is reported. Training steps are the real ones (augmentation, mixing, AdamW).
`epoch_seconds_estimate` is a 50,000-image (CIFAR-10) epoch at the measured training rate.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch

from .config import TrainConfig
from .train.loop import amp_name, autocast, build_training, train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_rate(run_window, images_per_window: int, windows: int, device) -> float:
    times = []
    for _ in range(windows):
        _sync(device)
        t0 = time.perf_counter()
        run_window()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return images_per_window / statistics.median(times)


def bench_one(cfg: TrainConfig, *, steps: int, warmup: int, windows: int) -> dict[str, Any]:
    setup = build_training(cfg)
    device, amp_dtype, gen, model = setup.device, setup.amp_dtype, setup.generator, setup.model
    optimizer, scaler, loader, mix = setup.optimizer, setup.scaler, setup.loader, setup.mix
    image_size = setup.train_ds.image_size
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr_max / 10
    batches = iter(())

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    def train_window(n=steps):
        model.train()
        for _ in range(n):
            x, y = next_batch()
            train_step(model, optimizer, scaler, mix, x, y, cfg, gen, device, amp_dtype)

    train_window(warmup)
    train_rate = _median_rate(train_window, steps * cfg.batch_size, windows, device)

    x = torch.randn(cfg.batch_size, 3, image_size, image_size, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def infer_window(n=steps):
        model.eval()
        for _ in range(n):
            with autocast(device, amp_dtype):
                model(x)

    infer_window(warmup)
    infer_rate = _median_rate(infer_window, steps * cfg.batch_size, windows, device)
    return {"model": cfg.model, "loader": cfg.loader, "amp": amp_name(amp_dtype),
            "batch_size": cfg.batch_size, "channels_last": cfg.channels_last, "device": str(device),
            "train_images_per_second": train_rate, "epoch_seconds_estimate": 50000 / train_rate, "inference_images_per_second": infer_rate}


def run_bench(cfg: TrainConfig, *, models: list[str], amps: list[str], loaders: list[str], steps: int = 5,
              warmup: int = 2, windows: int = 3, json_path: Optional[Path] = None, log=print) -> list[dict]:
    rows = []
    log(f"{'model':<16} {'loader':<12} {'amp':<5} {'train img/s':>12} {'infer img/s':>12} {'epoch s (50k)':>14}")
    for model in models:
        for loader in loaders:
            for amp in amps:
                row = bench_one(replace(cfg, model=model, amp=amp, loader=loader).validate(), steps=steps,
                                warmup=warmup, windows=windows)
                rows.append(row)
                log(f"{model:<16} {loader:<12} {row['amp']:<5} {row['train_images_per_second']:>12.1f} "
                    f"{row['inference_images_per_second']:>12.1f} {row['epoch_seconds_estimate']:>14.0f}")
    if json_path:
        json_path.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "rows": rows}, indent=2))
    return rows
