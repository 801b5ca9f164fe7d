"""What the CPU training fast paths (depthwise.py, act_norm.py) share: when to take them, and their kernels.

Two kinds of kernel: plain torch functions compiled by inductor (`CompiledKernel`, each a fused loop nest, kept in
inductor's on-disk FX graph cache, so each function, dtype and memory layout compiles once per machine), and C
sources in `csrc/` that the system C compiler builds once per machine into isoconv's cache folder
(`NativeLibrary`), for loops inductor generates poorly. Both fall back, after one warning, to code that needs no
compiler.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
import torch._dynamo.exc
import torch._inductor.exc
from torch.profiler import record_function

from ..fileio import atomic_write, atomic_write_with
from ..runtime import CACHE_ENV, cache_folder, cpu_flags

__all__ = ["CompiledKernel", "NativeLibrary", "fast_cpu_training", "FAST_MIN_ELEMENTS", "FAST_DTYPES"]

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
    for one: `COMPILE_FAILURES`) it warns once and calls `fallback` (default: `fn` itself, eagerly) for the rest of
    the process; any other error of a call is raised, and an error the inputs cause raises from the fallback too.

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
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT), record_function(self.name):
                    return self.compiled(*args)
            except COMPILE_FAILURES as e:
                # what is wrong with the inputs raises again here, eagerly, and leaves the compiled path in place
                result = self.fallback(*args)
                self.failed = True
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                log.warning("%s: torch.compile failed (%s: %s); continuing without it (slower)", self.name,
                            type(e).__name__, first_line)
                return result
        return self.fallback(*args)


# what torch.compile raises when it cannot compile (dynamo and inductor errors, wrapped or not; no C++ compiler);
# anything else a call raises is an error of the call, not a reason to fall back
COMPILE_FAILURES = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.CppCompileError,
                    torch._inductor.exc.InvalidCxxCompiler, OSError)


C_COMPILERS = ("cc", "gcc", "clang")
C_FLAGS = ("-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC")
OPENMP_FLAG = "-fopenmp"
SOURCES = Path(__file__).parent / "csrc"
NATIVE_FOLDER = "kernels"


class NativeLibrary:
    """`csrc/<source>` built by the system C compiler ($CC, else cc, gcc or clang) with `C_FLAGS` and OpenMP (without
    it where the compiler has none) and loaded with ctypes. Builds are cached in `<cache folder>/kernels/`, named by a
    hash of the source (with csrc's headers), compiler, flags and CPU, so a machine compiles each source once (well
    under a second); `declare(lib)` sets the functions' ctypes signatures; `extra_flags` (tests) build for another
    target, e.g. ("-mno-avx512f",) for the code AVX2-only CPUs get.

    Loading a library runs its code, so a cached build is checked first, like the data caches and as ssh checks its
    keys: the file and its folder must belong to the current user and be writable by no one else, and the file must
    match the sha256 digest recorded beside it (`<name>.sha256`) when it was built. A build that does not match
    (truncated by a full disk or a killed copy) is rebuilt, after a one-line warning; one that fails the ownership
    check is left alone and a private copy is built for this process, as where the cache cannot be written. A
    private copy is built in a temporary folder that is removed once the library is loaded.

    `load()` returns the library, or None after one warning when nothing could build it; callers then use aten's or
    inductor's kernels."""

    def __init__(self, source: str, declare: Callable[[ctypes.CDLL], None], extra_flags: tuple[str, ...] = ()):
        self.source, self.declare, self.flags = source, declare, C_FLAGS + tuple(extra_flags)
        self.library: Optional[ctypes.CDLL] = None
        self.failed = False

    def load(self) -> Optional[ctypes.CDLL]:
        if self.library is None and not self.failed:
            try:
                self.library = self.open()
                self.declare(self.library)
            except (OSError, subprocess.SubprocessError, AttributeError) as e:  # no compiler, a failed build
                self.library, self.failed = None, True
                log.warning("cannot build the CPU kernels in %s (%s); continuing without them (slower)", self.source,
                            str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        return self.library

    def open(self) -> ctypes.CDLL:
        """The library from the cache when it passes the checks, else built (into the cache where it can be)."""
        compiler = find_c_compiler()
        code = b"".join(path.read_bytes() for path in [SOURCES / self.source, *sorted(SOURCES.glob("*.h"))])
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        parts = (code, compiler, version, " ".join(self.flags), platform.machine(), " ".join(sorted(cpu_flags())))
        key = hashlib.sha256(b"\0".join(p.encode() if isinstance(p, str) else p for p in parts)).hexdigest()
        cached = cache_folder() / NATIVE_FOLDER / f"{Path(self.source).stem}-{key[:16]}.so"
        build = lambda output: compile_c(compiler, self.flags, SOURCES / self.source, output)  # noqa: E731
        distrust = untrusted(cached)
        if distrust:
            log.warning("not loading the cached CPU kernel %s: %s; building a private copy for this run", cached,
                        distrust)
            return private_build(cached.name, build)
        if cached.is_file():
            if verified(cached):
                return ctypes.CDLL(str(cached))
            log.warning("the cached CPU kernel %s does not match the digest recorded when it was built (truncated or "
                        "changed); rebuilding it", cached)
        try:
            cached.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_with(cached, build)
            os.chmod(cached, 0o755)  # whatever the umask: a group-writable build would be refused next time
            atomic_write(digest_file(cached), file_digest(cached) + "\n")
            os.chmod(digest_file(cached), 0o644)
        except OSError:  # an unwritable cache (read-only, full): build for this process only
            return private_build(cached.name, build)
        return ctypes.CDLL(str(cached))


def digest_file(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else \
            hashlib.sha256(f.read()).hexdigest()


def verified(library: Path) -> bool:
    """Whether `library` matches the digest recorded when it was built (False when none was recorded)."""
    try:
        return digest_file(library).read_text().strip() == file_digest(library)
    except OSError:
        return False


def untrusted(library: Path) -> Optional[str]:
    """Why `library` (when it exists), its digest file and its folder (when they exist) cannot be trusted to run:
    not owned by the current user, writable by group or others, or not a plain file/folder; None when they can."""
    if not hasattr(os, "getuid"):  # Windows: no POSIX owners and modes to check
        return None
    for path, kind in ((library.parent, stat.S_ISDIR), (library, stat.S_ISREG), (digest_file(library), stat.S_ISREG)):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not kind(st.st_mode):
            return (f"{path} is not a plain {'folder' if kind is stat.S_ISDIR else 'file'} (remove it, or point "
                    f"${CACHE_ENV} at a folder of your own)")
        if st.st_uid != os.getuid():
            return (f"{path} belongs to user id {st.st_uid}, not to you ({os.getuid()}) (point ${CACHE_ENV} at a "
                    f"folder of your own)")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return (f"{path} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} (run "
                    f"`chmod go-w {path}` to use the cache)")
    return None


def private_build(name: str, build: Callable[[Path], None]) -> ctypes.CDLL:
    """`build` into a temporary folder, loaded, then the folder removed (a loaded library needs no file)."""
    folder = Path(tempfile.mkdtemp(prefix="isoconv-kernels-"))
    try:
        build(folder / name)
        return ctypes.CDLL(str(folder / name))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def c_compiler() -> Optional[str]:
    """The C compiler `NativeLibrary` uses, or None."""
    try:
        return find_c_compiler()
    except OSError:
        return None


def find_c_compiler() -> str:
    for name in ([os.environ["CC"]] if os.environ.get("CC") else []) + list(C_COMPILERS):
        if shutil.which(name):
            return name
    raise OSError("no C compiler found (set CC, or install gcc or clang)")


def compile_c(compiler: str, flags: tuple[str, ...], source: Path, output: Path) -> None:
    """Compile `source` into the shared library `output`, with OpenMP if the compiler has it."""
    errors = ""
    for openmp in ([OPENMP_FLAG], []):
        done = subprocess.run([compiler, *flags, *openmp, "-o", str(output), str(source)], capture_output=True,
                              text=True, timeout=300)
        if done.returncode == 0:
            return
        errors = done.stderr.strip() or done.stdout.strip()
    raise subprocess.SubprocessError(f"{compiler} failed: {errors.splitlines()[0] if errors else 'no output'}")
