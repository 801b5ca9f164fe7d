"""glibc malloc settings for training on CPUs.

By default glibc serves allocations above a dynamic threshold (128 KiB up to 32 MiB) with fresh mmap()s and
hands them back with munmap() on free, and trims the heap top back to the OS. A CPU training step allocates
and frees the same large activation buffers every step, so every step pays for page faults and zeroing of
new pages. Turning mmap off (M_MMAP_MAX = 0) and raising the trim threshold keeps freed memory in the heap
for reuse: the same effect as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large> in the environment, applied
from inside the process.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["tune_allocator"]

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt takes an int, so the largest trim threshold it accepts is 2 GiB - 1 (MALLOC_TRIM_THRESHOLD_ in the
# environment is parsed as a size_t and could be larger); with mmap off, 2 GiB of free heap top kept is ample.
TRIM_THRESHOLD = 2**31 - 1

USER_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
USER_TUNABLES = ("glibc.malloc.mmap_max", "glibc.malloc.trim_threshold")

DONE = "glibc mallopt: mmap off, trim 2 GiB"

_applied: list[str] = []  # what the first call did


def user_settings() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(name in os.environ for name in USER_ENV) or any(name in tunables for name in USER_TUNABLES)


def tune_allocator() -> str:
    """Turn off glibc's mmap for large allocations and raise its trim threshold, unless the process does not
    use glibc or the user set either through the environment. Returns what it did: DONE, "not glibc",
    "user-set", "mallopt failed", or, on later calls, "already tuned (<what the first call did>)".
    Never raises."""
    if _applied:
        return f"already tuned ({_applied[0]})"
    result = _tune()
    _applied.append(result)
    return result


def _tune() -> str:
    try:
        if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
            return "not glibc"
        if user_settings():
            return "user-set"
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt.restype = ctypes.c_int
        # mallopt returns 1 on success, 0 on error
        if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
            return "mallopt failed"
        return DONE
    except Exception as e:  # a missing symbol or an odd libc: leave the allocator as it is
        return f"not tuned ({type(e).__name__})"
