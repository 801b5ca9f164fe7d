"""Time each kernel of a cm-vanilla training step on this CPU, at its shape ([128, 256, 16, 16], k5, channels-last),
and how many of each a step runs: where a CPU training step's time goes, without a profiler's overhead.

    python scripts/cpu-step-breakdown.py [bf16|fp32]

Best of 3 rounds of 10 calls per kernel, after 2 warm-up calls; 2 threads, allocator tuned as isoconv does."""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from isoconv.malloc_tuning import tune_allocator
from isoconv.models import act_norm, depthwise
from isoconv.runtime import cpu_flags

N, C, H, W, K = 128, 256, 16, 16, 5
BLOCKS, BN_LAYERS = 8, 17  # cm-vanilla: 8 blocks, a GELU -> BatchNorm after the stem and after each of 16 convs


def best_ms(fn, reps: int = 10) -> float:
    fn(), fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - start) / reps * 1e3)
    return min(times)


def main(dtype: torch.dtype) -> None:
    tune_allocator()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags: "
          f"{' '.join(sorted(cpu_flags() & {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16'}))}, {dtype}")
    gen = torch.Generator().manual_seed(0)
    a, g = (torch.randn(N, C, H, W, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
            for _ in range(2))
    h, slope, sum_d, _, _ = act_norm.gelu_and_channel_sums(a)
    mean, rstd, weight, bias = sum_d / (N * H * W), torch.ones(C), torch.ones(C), torch.zeros(C)
    sum_g, sum_gx = act_norm._backward_sums(g, h, mean, rstd)
    dw_weight = torch.randn(C, 1, K, K, generator=gen).to(dtype)
    pw_weight = torch.randn(C, C, 1, 1, generator=gen).to(dtype)
    kernels = {
        "GELU + statistics (C)": (BN_LAYERS, lambda: act_norm.gelu_and_channel_sums(a)),
        "BatchNorm normalisation": (BN_LAYERS, lambda: act_norm._normalize(h, mean, rstd, bias)),
        "BatchNorm backward sums": (BN_LAYERS, lambda: act_norm._backward_sums(g, h, mean, rstd)),
        "GELU + BatchNorm input grad": (BN_LAYERS, lambda: act_norm._input_grad(g, h, slope, mean, rstd, weight,
                                                                                 sum_g, sum_gx)),
        "depthwise weight+bias grad (C)": (BLOCKS, lambda: depthwise.param_grads_native(g, a, K, K, [2, 2, 2, 2])),
        "depthwise conv forward": (BLOCKS, lambda: F.conv2d(a, dw_weight, None, padding=2, groups=C)),
        "depthwise input grad": (BLOCKS, lambda: F.conv2d(g, dw_weight.flip(2, 3), None, padding=2, groups=C)),
        "pointwise conv forward": (BLOCKS, lambda: F.conv2d(a, pw_weight)),
        "pointwise conv backward": (BLOCKS, lambda: torch.ops.aten.convolution_backward(
            g, a, pw_weight, [0], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])),
        "residual add": (BLOCKS, lambda: a + g),
    }
    per_step = {name: count * best_ms(fn) for name, (count, fn) in kernels.items()}
    total = sum(per_step.values())
    print(f"{'kernel':32} {'ms/call':>8} {'calls':>6} {'ms/step':>8} {'share':>6}")
    for name, (count, _) in kernels.items():
        print(f"{name:32} {per_step[name] / count:8.2f} {count:6d} {per_step[name]:8.1f} {per_step[name] / total:6.1%}")
    print(f"{'sum':32} {'':8} {'':6} {total:8.1f}")


if __name__ == "__main__":
    main(torch.float32 if sys.argv[1:] == ["fp32"] else torch.bfloat16)
