"""Decode image files once into a cached uint8 tensor file, so later runs start in seconds.

A split's cache file is `<dataset folder>/.isoconv-cache/<name>-<split>-<size>-<key>.pt`, where `key`
hashes the sorted relative file list with each file's size and mtime, the labels, the image size and
DECODE_VERSION. Adding, removing or touching a file changes the key: the old file is stale and is
replaced. Files are written atomically (temporary file + os.replace), read with
`torch.load(weights_only=True)` and checked (key, shapes, CRC-32 of the pixels); a corrupt file is
rebuilt with a warning. Normalization statistics of a training split are kept beside them as
small JSON files.

Location: `$ISOCONV_CACHE` if set; else the dataset folder; if that is not writable,
`~/.cache/isoconv/cache`; if nothing is writable the data is decoded on every run (with a warning).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import stat
import sys
import time
import zlib
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from ..errors import UserError
from ..fileio import atomic_write
from .images import BadImageError, decode_image_array
from .splits import Stats

CACHE_ENV = "ISOCONV_CACHE"
WORKERS_ENV = "ISOCONV_DECODE_WORKERS"
CACHE_DIRNAME = ".isoconv-cache"
FALLBACK_DIR = "~/.cache/isoconv/cache"
DECODE_VERSION = 2  # bump when decoding changes (resampling, colour conversion): every cache is rebuilt
FORMAT = "isoconv-decoded-images"
CHUNK = 256  # images per pool task


log = logging.getLogger(__name__)
warn = log.warning  # the CLI prints these as `isoconv: warning: ...` on stderr
note = log.info  # progress notes (`isoconv: ...` on stderr)


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of obj."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def size_tag(image_size: Optional[int]) -> str:
    return "native" if image_size is None else str(image_size)


# ---------------------------------------------------------------------------------------------
# where cache files live


@dataclass(frozen=True)
class _Location:
    directory: Path
    prefix: str  # file-name prefix; outside the dataset folder it also names the folder's path


class DatasetCache:
    """Cache files of one dataset folder (`name` is the dataset name used as file-name prefix)."""

    def __init__(self, data_folder: Union[str, Path], name: str):
        self.data_folder = Path(data_folder)
        self.name = name

    def locations(self) -> List[_Location]:
        outside = f"{self.name}-{digest(str(self.data_folder.resolve()))[:8]}"
        env = os.environ.get(CACHE_ENV)
        if env:
            return [_Location(Path(env).expanduser(), outside)]
        return [_Location(self.data_folder / CACHE_DIRNAME, self.name),
                _Location(Path(FALLBACK_DIR).expanduser(), outside)]

    def existing(self, stem: str) -> List[Path]:
        """Cache files named `<prefix>-<stem>` that exist, in lookup order."""
        return [p for p in (loc.directory / f"{loc.prefix}-{stem}" for loc in self.locations()) if p.is_file()]

    def matching(self, pattern: str) -> List[Path]:
        """Cache files whose name after the prefix matches the glob `pattern`."""
        found = []
        for loc in self.locations():
            if loc.directory.is_dir():
                found += sorted(loc.directory.glob(f"{loc.prefix}-{pattern}"))
        return found

    def writable_path(self, stem: str) -> Optional[Path]:
        """Where to write `<prefix>-<stem>`: the first location that can be created and written, else None."""
        locs = self.locations()
        for i, loc in enumerate(locs):
            if loc.directory.parent == self.data_folder and not folder_writable(self.data_folder):
                continue
            try:
                loc.directory.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if folder_writable(loc.directory):
                if i > 0:
                    warn(f"cannot write a cache in {locs[0].directory}; caching in {loc.directory} instead")
                return loc.directory / f"{loc.prefix}-{stem}"
        where = " or ".join(str(loc.directory) for loc in locs)
        warn(f"cannot write a cache in {where}; the images are decoded again on every run "
             f"(set {CACHE_ENV} to a writable folder)")
        return None


class FailedLoadCleanup:
    """`with FailedLoadCleanup(cache):` a load that ends in an error removes the cache files it wrote (and cache
    folders it created that are left empty), so bad data leaves nothing behind."""

    def __init__(self, cache: DatasetCache):
        self.cache = cache

    def __enter__(self) -> "FailedLoadCleanup":
        self.folders = [loc.directory for loc in self.cache.locations()]
        self.new_folders = [d for d in self.folders if not d.exists()]
        self.before = set(self.cache.matching("*"))
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None or not issubclass(kind, UserError):
            return
        _remove([p for p in self.cache.matching("*") if p not in self.before])
        for folder in self.new_folders:
            try:
                folder.rmdir()
            except OSError:
                pass


def folder_writable(folder: Path) -> bool:
    """Writable, and for a folder whose mode has no write bit also read-only for root (a shared, protected dataset:
    root may write there, but should not)."""
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    return bool(stat.S_IMODE(mode) & 0o222) and os.access(folder, os.W_OK | os.X_OK)


def write_cache_file(path: Path, data: bytes) -> bool:
    """Write a cache file atomically; False (warned) on failure: the cache is an optimisation, never required."""
    try:
        atomic_write(path, data)
        return True
    except OSError as e:
        warn(f"could not write cache file {path} ({e.strerror or e}); continuing without it")
        return False


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# keys


def file_listing(base: Path, files: Sequence[str]) -> List[List[Any]]:
    """[relative path, size, mtime_ns] per file (paths relative to `base`, "/"-separated), in the given order."""
    rows = []
    prefix = os.path.join(str(base), "")
    for rel in files:
        try:
            st = os.stat(prefix + rel)
        except OSError as e:
            if os.path.islink(prefix + rel):  # dangling or looping: decoding says so (--skip-bad-images skips it)
                st = os.lstat(prefix + rel)
            elif isinstance(e, FileNotFoundError):
                    raise UserError(f"{prefix + rel} disappeared while the dataset was being read; run again") from None
            else:
                raise UserError(f"cannot read {prefix + rel} ({e.strerror or e}); check its permissions") from None
        rows.append([rel, st.st_size, st.st_mtime_ns])
    return rows


def split_key(base: Path, split: str, files: Sequence[str], labels: Sequence[int],
              image_size: Optional[int]) -> str:
    """The cache key of a split (files relative to base): changes whenever a file, a label or the decoding changes."""
    return digest({"version": DECODE_VERSION, "split": split, "image_size": image_size,
                   "files": file_listing(base, files), "labels": list(labels)})


# ---------------------------------------------------------------------------------------------
# decoding


def _decode_chunk(task: Tuple[List[str], Optional[int]]) -> List[Union[np.ndarray, str]]:
    """Decoded (H, W, 3) arrays, or the error message of each image that cannot be read (runs in pool workers)."""
    paths, image_size = task
    out: List[Union[np.ndarray, str]] = []
    for p in paths:
        try:
            out.append(decode_image_array(p, image_size))
        except BadImageError as e:
            out.append(str(e))
    return out


def decode_workers() -> int:
    env = os.environ.get(WORKERS_ENV)
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise UserError(f"{WORKERS_ENV}={env!r} is not a whole number; set it to the number of decoding "
                            f"processes (0 decodes in this process)") from None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(16, cpus)


def _executor(workers: int) -> Executor:
    # Processes scale past the GIL (decoding small images is mostly Python overhead). fork starts them
    # in milliseconds without re-importing the caller's main module; the workers use PIL and numpy only.
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    return ThreadPoolExecutor(workers)


@dataclass
class Decoded:
    images: torch.Tensor  # uint8 (N, 3, S, S) of the readable images
    kept: List[int]  # their positions in the input list
    bad: List[Tuple[int, str]]  # (position, error message) of the unreadable ones


def decode_files(paths: Sequence[Union[str, Path]], image_size: Optional[int], *, skip_bad: bool,
                 what: str) -> Decoded:
    """Decode every file (in a process pool when there are many); the first unreadable one raises unless skip_bad.

    Without image_size all images must share one square size.
    """
    n = len(paths)
    workers = decode_workers()
    chunks = [([str(p) for p in paths[s:s + CHUNK]], image_size) for s in range(0, n, CHUNK)]
    pool = _executor(min(workers, len(chunks))) if workers > 1 and len(chunks) > 1 else None
    note(f"decoding {n} images of {what} (only once: later runs read the cache) ...")
    t0 = time.perf_counter()
    images: Optional[torch.Tensor] = None
    kept: List[int] = []
    bad: List[Tuple[int, str]] = []
    bar = tqdm(total=n, desc=f"decoding {what}", unit="img", leave=False, disable=not sys.stderr.isatty())
    try:
        results = pool.map(_decode_chunk, chunks) if pool is not None else map(_decode_chunk, chunks)
        for c, items in enumerate(results):
            for j, item in enumerate(items):
                i = c * CHUNK + j
                if isinstance(item, str):
                    if not skip_bad:
                        raise BadImageError(item)
                    bad.append((i, item))
                    continue
                if images is None:
                    images = _allocate(n, item, paths[i])
                elif item.shape[:2] != images.shape[2:]:
                    first = paths[kept[0]]
                    raise UserError(f"images differ in size: {paths[i]} is {item.shape[1]}x{item.shape[0]} but "
                                    f"{first} is {images.shape[3]}x{images.shape[2]}; pass --image-size N to "
                                    f"resize them all")
                images[len(kept)] = torch.from_numpy(item).permute(2, 0, 1)
                kept.append(i)
            bar.update(len(items))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if images is None:
        raise UserError(f"none of the {n} images of {what} could be read (first: {bad[0][1]})")
    if len(kept) < n:
        images = images[:len(kept)].clone()  # a view would keep (and save) the whole allocation
    note(f"decoded {len(kept)} images of {what} in {time.perf_counter() - t0:.1f} s")
    return Decoded(images, kept, bad)


def _allocate(n: int, first: np.ndarray, path: Path) -> torch.Tensor:
    h, w = first.shape[:2]
    if h != w:
        raise UserError(f"{path} is {w}x{h}, not square; pass --image-size N to resize every image to N x N")
    return torch.empty((n, 3, h, w), dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# cached splits


@dataclass
class CachedSplit:
    images: torch.Tensor
    labels: torch.Tensor
    skipped: List[Tuple[str, str]]  # (relative path, error message) of unreadable files left out
    key: str


def _checksum(images: torch.Tensor, labels: torch.Tensor) -> int:
    crc = zlib.crc32(memoryview(images.contiguous().numpy()).cast("B"))
    return zlib.crc32(memoryview(labels.contiguous().numpy()).cast("B"), crc)


def _read_split(path: Path, key: str, image_size: Optional[int]) -> CachedSplit:
    """The cached split in `path`; raises ValueError saying why when it is not a valid cache for `key`."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, I/O error: all mean "rebuild"
        raise ValueError(f"cannot load it: {type(e).__name__}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != DECODE_VERSION:
        raise ValueError("not an isoconv cache of this version")
    if d.get("key") != key:
        raise ValueError("its key does not match its name")
    images, labels, skipped = d.get("images"), d.get("labels"), d.get("skipped")
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4
            and images.shape[1] == 3 and isinstance(labels, torch.Tensor) and labels.dtype == torch.int64
            and labels.shape == images.shape[:1] and isinstance(skipped, list)):
        raise ValueError("unexpected contents")
    if image_size is not None and tuple(images.shape[2:]) != (image_size, image_size):
        raise ValueError(f"images are {tuple(images.shape[2:])}, expected {image_size}x{image_size}")
    if d.get("checksum") != _checksum(images, labels):
        raise ValueError("checksum mismatch")
    return CachedSplit(images, labels, [tuple(s) for s in skipped], key)


def load_or_decode(cache: DatasetCache, split: str, files: Sequence[str], labels: Sequence[int], *,
                   image_size: Optional[int], skip_bad: bool, what: str) -> CachedSplit:
    """The decoded split of `files` (relative to the dataset folder): from a valid cache, else decoded and cached.

    Unreadable images raise BadImageError naming the file, or with skip_bad are left out, counted and
    reported (the cache remembers them, so a later run without --skip-bad-images fails the same way).
    """
    key = split_key(cache.data_folder, split, files, labels, image_size)
    tag = size_tag(image_size)
    stem = f"{split}-{tag}-{key[:16]}.pt"
    result = None
    for path in cache.existing(stem):
        try:
            result = _read_split(path, key, image_size)
            break
        except ValueError as e:
            warn(f"cache file {path} is corrupt ({e}); rebuilding it")
            _remove([path])
    if result is None:
        stale = [p for p in cache.matching(f"{split}-{tag}-*.pt") if not p.name.endswith(stem)]
        for p in stale:
            warn(f"cache file {p} is stale (the files of {what} changed since it was built); rebuilding it")
        result = _decode_and_store(cache, stem, key, files, labels, image_size=image_size, skip_bad=skip_bad,
                                   what=what)
        _remove(stale)
    if result.skipped:
        rel, reason = result.skipped[0]
        if not skip_bad:
            raise BadImageError(reason)
        warn(f"skipped {len(result.skipped)} unreadable image(s) of {what} (first: {rel})")
    return result


def _decode_and_store(cache: DatasetCache, stem: str, key: str, files: Sequence[str], labels: Sequence[int], *,
                      image_size: Optional[int], skip_bad: bool, what: str) -> CachedSplit:
    prefix = os.path.join(str(cache.data_folder), "")
    dec = decode_files([prefix + f for f in files], image_size, skip_bad=skip_bad, what=what)
    kept_labels = torch.as_tensor([labels[i] for i in dec.kept], dtype=torch.int64)
    skipped = [(files[i], reason) for i, reason in dec.bad]
    payload = {"format": FORMAT, "version": DECODE_VERSION, "key": key, "images": dec.images,
               "labels": kept_labels, "skipped": [list(s) for s in skipped],
               "checksum": _checksum(dec.images, kept_labels)}
    target = cache.writable_path(stem)
    if target is not None:
        buf = io.BytesIO()
        torch.save(payload, buf)
        write_cache_file(target, buf.getvalue())
    return CachedSplit(dec.images, kept_labels, skipped, key)


# ---------------------------------------------------------------------------------------------
# normalization statistics


def _valid_stats(d: Any, key: str) -> Optional[Stats]:
    try:
        mean, std = d["mean"], d["std"]
        ok = (d["key"] == key and len(mean) == 3 and len(std) == 3
              and all(isinstance(v, float) and math.isfinite(v) for v in (*mean, *std)) and min(std) > 0)
    except (KeyError, TypeError):
        return None
    return (tuple(mean), tuple(std)) if ok else None


def cached_stats(cache: DatasetCache, key_obj: Any, compute: Callable[[], Stats]) -> Stats:
    """Normalization stats for `key_obj` (what they were computed from): from the cache, else compute() and store."""
    key = digest(key_obj)
    stem = f"stats-{key[:16]}.json"
    for path in cache.existing(stem):
        try:
            found = _valid_stats(json.loads(path.read_text()), key)
        except (OSError, ValueError):
            found = None
        if found is not None:
            return found
        warn(f"cache file {path} is corrupt; recomputing the normalization statistics")
        _remove([path])
    mean, std = compute()
    target = cache.writable_path(stem)
    if target is not None:
        text = json.dumps({"key": key, "mean": list(mean), "std": list(std)}).encode()
        write_cache_file(target, text)
    return mean, std
