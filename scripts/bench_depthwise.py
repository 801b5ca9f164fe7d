"""Benchmarks for the fast depthwise convolution (docs/depthwise-bench.md).

    PYTHONPATH=src python3 scripts/bench_depthwise.py block [--repeats 20]
        fwd+bwd of one depthwise conv, x (128, 256, 16, 16) channels-last, k5 "same", aten vs fast,
        fp32 and bf16 autocast; best wall time and best process CPU time of `repeats` calls.

    PYTHONPATH=src python3 scripts/bench_depthwise.py step [--repeats 6] [--tune-malloc]
        training steps (fwd, bwd, AdamW) of cm-vanilla (ConvMixer-256/8 k5 p2) on one random batch of 128
        32x32 images, channels-last, fp32 and bf16 autocast, aten and fast steps alternating (so that other
        load on the machine hits both alike); best step time of `repeats` each.

    PYTHONPATH=src python3 scripts/bench_depthwise.py train [--aten] [--tune-malloc] -- <isoconv bench args>
        `isoconv bench` in this process; --aten makes DepthwiseConv2d use nn.Conv2d's path everywhere,
        --tune-malloc calls isoconv.malloc_tuning.tune_allocator() first.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        cpus.append(time.process_time() - c)
        walls.append(time.perf_counter() - w)
    return min(walls) * 1e3, min(cpus) * 1e3


def block(repeats: int) -> None:
    from isoconv.models.depthwise import DepthwiseConv2d

    torch.manual_seed(0)
    n, c, h, k = 128, 256, 16, 5
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; x ({n}, {c}, {h}, {h}) channels_last, "
          f"k{k} same; best of {repeats}: wall ms / process CPU ms")
    for amp in ("fp32", "bf16"):
        fast = DepthwiseConv2d(c, k).to(memory_format=torch.channels_last)
        x = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last).requires_grad_()
        g = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)

        def step(use_fast: bool) -> None:
            with torch.autocast("cpu", torch.bfloat16, enabled=amp == "bf16"):
                y = fast(x) if use_fast else F.conv2d(x, fast.weight, fast.bias, padding="same", groups=c)
            y.backward(g.to(y.dtype))

        def forward_only() -> None:
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=amp == "bf16"):
                fast(x)

        fwd = best_of(forward_only, repeats)
        aten = best_of(lambda: step(False), repeats)
        ours = best_of(lambda: step(True), repeats)
        print(f"{amp}: forward {fwd[0]:.1f} / {fwd[1]:.1f}; fwd+bwd aten {aten[0]:.1f} / {aten[1]:.1f}, "
              f"fast {ours[0]:.1f} / {ours[1]:.1f}; speedup (wall) {aten[0] / ours[0]:.2f}x", flush=True)


def step(repeats: int, tune_malloc: bool) -> None:
    if tune_malloc:
        from isoconv.malloc_tuning import tune_allocator
        print("allocator:", tune_allocator(), flush=True)
    import isoconv.models.depthwise as depthwise
    from isoconv.models import create_model

    chooser = depthwise.use_fast_depthwise
    torch.manual_seed(0)
    model = create_model("cm-vanilla", num_classes=10).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    for amp in ("fp32", "bf16"):
        def one(use_fast: bool) -> None:
            depthwise.use_fast_depthwise = chooser if use_fast else (lambda device, dtype: False)
            with torch.autocast("cpu", torch.bfloat16, enabled=amp == "bf16"):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        times: dict[bool, list[float]] = {False: [], True: []}
        one(True), one(False)  # compile / warm up
        for _ in range(repeats):
            for use_fast in (False, True):
                t = time.perf_counter()
                one(use_fast)
                times[use_fast].append(time.perf_counter() - t)
        aten, fast = min(times[False]), min(times[True])
        print(f"cm-vanilla train step {amp}, batch 128: aten {aten * 1e3:.0f} ms ({128 / aten:.1f} img/s), "
              f"fast {fast * 1e3:.0f} ms ({128 / fast:.1f} img/s), speedup {aten / fast:.2f}x", flush=True)
    depthwise.use_fast_depthwise = chooser


def train(aten: bool, tune_malloc: bool, bench_args: list[str]) -> int:
    if tune_malloc:
        from isoconv.malloc_tuning import tune_allocator
        print("allocator:", tune_allocator(), flush=True)
    if aten:
        import isoconv.models.depthwise as depthwise
        depthwise.use_fast_depthwise = lambda *args: False
    from isoconv.cli import main

    return main(["bench", *bench_args])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("block")
    b.add_argument("--repeats", type=int, default=20)
    s = sub.add_parser("step")
    s.add_argument("--repeats", type=int, default=6)
    s.add_argument("--tune-malloc", action="store_true")
    t = sub.add_parser("train")
    t.add_argument("--aten", action="store_true")
    t.add_argument("--tune-malloc", action="store_true")
    t.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.what == "block":
        block(args.repeats)
    elif args.what == "step":
        step(args.repeats, args.tune_malloc)
    else:
        rest = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
        sys.exit(train(args.aten, args.tune_malloc, rest))
