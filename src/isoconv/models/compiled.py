"""What the CPU training fast paths (depthwise.py, act_norm.py) share: when to take them, and their inductor kernels.

The fast paths are plain torch functions compiled by inductor, each a fused loop nest. Compiled kernels land in
inductor's on-disk FX graph cache, so each (function, dtype, memory layout) is compiled once per machine.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

__all__ = ["CompiledKernel", "fast_cpu_training", "FAST_MIN_ELEMENTS", "FAST_DTYPES"]

log = logging.getLogger(__name__)

FAST_DTYPES = (torch.float32, torch.bfloat16)

# Each new (kernel, dtype, memory layout, kernel size) costs a compile once per machine (seconds, then inductor's
# disk cache). From this many activation elements per call the depthwise fast path saves about 3 ms per block and
# training step (fp32, k5: 5.7 vs 2.9 ms fwd+bwd at [64, 64, 8, 8] on a 2-core EPYC), so it pays back within a
# few hundred steps; smaller calls (tests, toy runs) stay on aten. cm-cpu at batch 128 is [128, 128, 8, 8] = 2^20,
# cm-vanilla [128, 256, 16, 16] = 2^23.
FAST_MIN_ELEMENTS = 2 ** 19

# dynamo keeps one compiled variant per dtype, shape and constant argument on each function; its default limit of
# 8 is soon reached by a process training several models
RECOMPILE_LIMIT = 64


def fast_cpu_training(device: torch.device, dtype: torch.dtype, numel: int) -> bool:
    """Whether training on `device` in `dtype`, on `numel` activation elements per call, takes the fast paths.

    Only CPUs: on CUDA cuDNN and aten's fused kernels are fast. fp16 on CPUs is left to aten (rarely used there)
    and float64 gains nothing worth a compile."""
    return device.type == "cpu" and dtype in FAST_DTYPES and numel >= FAST_MIN_ELEMENTS


class CompiledKernel:
    """`fn` compiled by inductor on first call (fullgraph, dynamic shapes). When compiling fails (no C++ compiler,
    for one) it warns once and calls `fallback` (default: `fn` itself, eagerly) for the rest of the process.

    Dynamic shapes: one compile serves every batch size and image size (an epoch's last, smaller batch, another
    model width), and runs as fast as the shape-specialised kernels did (measured at cm-vanilla's shape in bf16:
    within 3% for each kernel); it costs more the first time (31 s instead of 12 s for all kernels at once), which
    inductor's disk cache then saves on every later run."""

    def __init__(self, fn: Callable, name: str, fallback: Optional[Callable] = None):
        self.fn, self.name, self.fallback = fn, name, fallback or fn
        self.compiled: Optional[Callable] = None
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, fullgraph=True, dynamic=True)
            try:
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    return self.compiled(*args)
            except Exception as e:  # whatever failed in compiling, the fallback computes the same
                self.failed = True
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                log.warning("%s: torch.compile failed (%s: %s); continuing without it (slower)", self.name,
                            type(e).__name__, first_line)
        return self.fallback(*args)
