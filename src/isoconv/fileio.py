"""Atomic file writes: every file isoconv writes appears whole or not at all.

The data goes to a temporary file in the same folder, is fsynced, then renamed over the target (a rename within
one folder is atomic on POSIX and Windows), and the folder is fsynced so the rename survives a power cut.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable, Union

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform (e.g. Windows); the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_and_sync(path: Union[str, Path], data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Union[str, Path], data: Union[bytes, str],
                 before_replace: Callable[[Path], None] = lambda target: None) -> None:
    """Write `data` (text is UTF-8 encoded) to `path` atomically. `before_replace(path)` runs after the new data is
    safely on disk and just before it replaces `path` (the checkpoint writer keeps the previous file there).
    On any error the temporary file is removed and the old `path`, if any, is untouched."""
    payload = data.encode() if isinstance(data, str) else data
    atomic_write_with(path, lambda tmp: write_and_sync(tmp, payload), before_replace)


def atomic_write_with(path: Union[str, Path], write: Callable[[Path], None],
                      before_replace: Callable[[Path], None] = lambda target: None) -> None:
    """Like atomic_write, for writers that need a file name (`write(tmp_path)`, e.g. an ONNX exporter).

    The temporary file is `.NAME.PID-RANDOM.tmp`; those that a killed process (PID no longer running) left for the
    same `path` are removed first."""
    path = Path(path)
    remove_orphaned_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        before_replace(path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: do it once, not at every write
    os.umask(mask)
    return mask


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files of `path` left by a writer that was killed mid-write."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def remove_orphaned_temporaries(path: Path) -> None:
    """The temporary files of `path` whose writer (the PID in their name) is no longer running: a `kill -9` or a
    power cut mid-write. Others' (a writer still running, a name not of this form) are left alone."""
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows
        return
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*-*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split("-", 1)[0]
        if pid.isdigit() and not process_running(int(pid)):
            tmp.unlink(missing_ok=True)


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process (or not a pid): keep its files
        return True
    return True


def append_line(path: Union[str, Path], line: str) -> None:
    """Append one line and fsync: after a crash the file ends at a whole line or at most one line short."""
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


# magic bytes -> what a file that starts with them is, in messages ("report.png is a PNG image, not ...")
_MAGICS = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
           (b"BM", "a BMP image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
           (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"), (b"7z\xbc\xaf", "a 7-Zip archive"))


def describe_file(path: Union[str, Path]) -> Union[str, None]:
    """What a file evidently is when it is not a PyTorch/zip/pickle file: "a text file", "a PNG image", "an empty
    file", ...; None when it may be a weights file (a zip archive, a pickle, a checkpoint) or cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head:
        return "an empty file"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    for magic, what in _MAGICS:
        if head.startswith(magic):
            return what
    if head.startswith((b"PK", b"\x80", b"ISOCONV-CKPT")):
        return None  # zip (torch.save, TorchScript), pickle, isoconv 0.1 checkpoint
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < len(head) - 4:  # not just a multi-byte character cut at the end of the sample
                return None
        return "a text file"
    return None


def folders_to_create(path: Union[str, Path]) -> list[Path]:
    """The folders that writing into `path` would create (`path` first, then its missing parents)."""
    path, missing = Path(path).expanduser(), []
    while not path.exists() and path.parent != path:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) as long as they are empty: what a failed run or download created."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue  # already removed (a failed run removes its own folder)
        except OSError:
            return


def atomic_write_folder(path: Union[str, Path], write: Callable[[Path], None]) -> None:
    """Fill a folder atomically: `write(tmp)` fills a temporary folder next to `path`, which is then renamed to
    `path`. An existing `path` (the caller decided it may be replaced) is swapped out and removed only after the new
    folder is in place. On any error the temporary folder is removed and the old `path`, if any, is untouched."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        write(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
                os.chmod(f, 0o666 & ~_umask())  # some writers (safetensors) make 0600 files
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the permissions mkdir would
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / path.name).exists() and not path.exists():
            os.replace(old / path.name, path)  # put the previous folder back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)


def file_digest(path: Union[str, Path], algorithm: str) -> str:
    """The hex digest of a file's bytes (hashlib's `algorithm`, e.g. "md5", "sha256"), read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
