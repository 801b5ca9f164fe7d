"""Where and how a model runs: device, precision and torch.compile, resolved once from the settings.

One table maps precision names to dtypes; the user's `--amp off` is reported as `fp32` everywhere.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

# precision name (as reports print it) -> autocast dtype (None: plain fp32)
PRECISIONS: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_TO_PRECISION = {"off": "fp32", "bf16": "bf16", "fp16": "fp16"}
PRECISION_AMP = {p: a for a, p in AMP_TO_PRECISION.items()}  # the --amp value that asks for a precision
CXX_COMPILERS = ("g++", "clang++", "c++", "cl")
COMPILE_BACKEND = "inductor"
CACHE_ENV = "ISOCONV_CACHE"
DEFAULT_CACHE = "~/.cache/isoconv"


def cache_folder() -> Path:
    """Where isoconv keeps what it measured or built for this machine (`--amp auto` verdicts, CPU kernels):
    $ISOCONV_CACHE, else ~/.cache/isoconv."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def resolve_device(name) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name} asked for but this machine has no usable Apple MPS device; use --device "
                          f"cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: isoconv runs on cpu, cuda or mps devices; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


SPEED_FLAGS = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})  # what CPU speed depends on


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions; without them bf16 autocast is 10-40x slower than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_precision(amp: str, device: torch.device, cuda_amp: Optional[str] = None) -> str:
    """The precision name (fp32, bf16, fp16) that `--amp` means on `device` (`cuda_amp`: what auto means there)."""
    if amp == "auto":
        if device.type == "cuda" and cuda_amp is not None:
            return AMP_TO_PRECISION[cuda_amp]
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device (fp16 with a grad scaler); use --amp bf16 or off on CPU")
    return AMP_TO_PRECISION[amp]


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def configure_device(device: torch.device) -> None:
    """Process-wide speed settings for training on `device`: on CUDA, cuDNN benchmarks the convolution algorithms
    for each new input shape once and keeps the fastest (shapes are fixed here: one batch size, one image size)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def cxx_compiler() -> Optional[str]:
    """The C++ compiler inductor would use on a CPU ($CXX first), or None."""
    return next((path for c in (os.environ.get("CXX", ""), *CXX_COMPILERS) if c for path in [shutil.which(c)]
                 if path), None)


def compile_model(model: torch.nn.Module, device: torch.device, mode: str = "default") -> torch.nn.Module:
    """torch.compile(model), sharing its parameters, with COMPILE_BACKEND in `mode` (default, reduce-overhead:
    CUDA graphs on a GPU, max-autotune)."""
    if COMPILE_BACKEND == "inductor" and device.type == "cpu" and cxx_compiler() is None:
        raise ConfigError("--compile on a CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop "
                          "--compile")
    try:
        if mode == "default" or COMPILE_BACKEND != "inductor":  # modes are inductor's
            return torch.compile(model, backend=COMPILE_BACKEND)
        return torch.compile(model, backend=COMPILE_BACKEND, mode=mode)
    except RuntimeError as e:  # platforms and Pythons this torch cannot compile on, unknown backends
        raise ConfigError(f"--compile is not available here ({str(e).splitlines()[0]}); drop --compile") from None


def is_compile_error(e: BaseException) -> bool:
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))


def compile_error(e: BaseException) -> ConfigError:
    first_line = (str(e).strip().splitlines() or [""])[0]
    return ConfigError(f"torch.compile failed on this model ({type(e).__name__}: {first_line}); drop --compile")


class CompileClock:
    """Measures a compiled function's compile time: the first call compiles, so its extra time over the second
    call is the compile time (`seconds`; the whole first call when there is no second)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    @property
    def seconds(self) -> Optional[float]:
        if not self.times:
            return None
        return max(0.0, self.times[0] - (self.times[1] if len(self.times) > 1 else 0.0))

    def time(self, fn, *args, **kwargs):
        if len(self.times) >= 2:
            return fn(*args, **kwargs)
        synchronize(self.device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        synchronize(self.device)
        self.times.append(time.perf_counter() - t0)
        return out
