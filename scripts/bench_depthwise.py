"""Benchmarks for the fast depthwise convolution (docs/depthwise-bench.md).

    PYTHONPATH=src python3 scripts/bench_depthwise.py block [--repeats 20]
        fwd+bwd of one depthwise conv, x (128, 256, 16, 16) channels-last, k5 "same", aten vs fast,
        fp32 and bf16 autocast; best wall time and best process CPU time of `repeats` calls.

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


def train(aten: bool, tune_malloc: bool, bench_args: list[str]) -> int:
    if tune_malloc:
        from isoconv.malloc_tuning import tune_allocator
        print("allocator:", tune_allocator(), flush=True)
    if aten:
        import isoconv.models.depthwise as depthwise
        depthwise.use_fast_depthwise = lambda device, dtype: False
    from isoconv.cli import main

    return main(["bench", *bench_args])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("block")
    b.add_argument("--repeats", type=int, default=20)
    t = sub.add_parser("train")
    t.add_argument("--aten", action="store_true")
    t.add_argument("--tune-malloc", action="store_true")
    t.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.what == "block":
        block(args.repeats)
    else:
        rest = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
        sys.exit(train(args.aten, args.tune_malloc, rest))
