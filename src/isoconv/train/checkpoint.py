"""Atomic, verified checkpoint files, loaded with weights_only=True so a checkpoint can never run code.

File format: a fixed header (magic, payload length, SHA-256 of the payload) followed by the payload,
which is an ordinary `torch.save` stream. The header lets a truncated or bit-flipped file be detected
before anything is unpickled. Files without the header (plain `torch.save` files) still load.

Writing keeps the previous good checkpoint as `<name>.prev.pt` (a hard link, so `last.pt` exists at
every moment), writes the new one to a temporary file, fsyncs it and renames it over `last.pt`.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import UserError

MAGIC = b"ISOCONV-CKPT-v1\n"
_HEADER = struct.Struct(f"<{len(MAGIC)}sQ32s")  # magic, payload length, sha256


class CorruptCheckpointError(UserError):
    """A checkpoint file that is truncated, altered or not a checkpoint at all."""


def previous_path(path: Path) -> Path:
    """Where the previous good checkpoint of `path` is kept (last.pt -> last.prev.pt)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def encode_checkpoint(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    return _HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()) + payload


def _write_file(path: str, data: bytes) -> None:
    """Write and fsync (a separate function so tests can simulate a full disk)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
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


def _keep_previous(path: Path) -> None:
    """Make `<name>.prev.pt` the current `path` without ever leaving `path` missing."""
    prev = previous_path(path)
    tmp = prev.with_name(f".{prev.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files left by a writer that was killed mid-write (one writer per run, so none is live)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def save_checkpoint(state: dict[str, Any], path: Path, keep_previous: bool = True,
                    _hook: Optional[Callable[[str], None]] = None) -> None:
    """Write `state` to `path` atomically; the previous file survives as `<name>.prev.pt`.

    A crash at any moment leaves `path` holding either the old checkpoint or the new one. A full disk
    raises a UserError and leaves the old checkpoint untouched.
    """
    path = Path(path)
    data = encode_checkpoint(state)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if _hook is not None:  # test hook: write half the file first, then pause (see tests/test_crash.py)
            _write_file(tmp, data[: len(data) // 2])
            _hook("checkpoint-write")
        _write_file(tmp, data)
        if keep_previous and path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        _remove_stale_temporaries(path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = f"the previous checkpoint {path} is intact" if path.exists() else "no checkpoint was written yet"
            raise UserError(f"no space left on the device writing checkpoint {path} ({len(data) / 1e6:.1f} MB); "
                            f"{kept}; free some space, then resume with `isoconv train --resume {path.parent}`"
                            ) from None
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}; check the folder's permissions "
                        f"and space") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _decode(path: Path, data: bytes) -> bytes:
    """The torch payload of a checkpoint file, verified against its checksum."""
    if not data.startswith(MAGIC):
        return data  # a plain torch.save file (older isoconv or another tool)
    if len(data) < _HEADER.size:
        raise CorruptCheckpointError(f"checkpoint {path} is truncated (header incomplete)")
    _, length, digest = _HEADER.unpack_from(data)
    payload = data[_HEADER.size:]
    if len(payload) != length:
        raise CorruptCheckpointError(f"checkpoint {path} is truncated ({len(payload)} of {length} bytes)")
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")
    return payload


def _refusal_reason(e: Exception) -> str:
    """The informative line of torch's weights_only refusal (e.g. `Unsupported global: GLOBAL builtins.print`)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    for line in lines:
        if "Unsupported" in line or "global" in line.lower():
            return line.split("error: ")[-1].split(" was not an allowed")[0][:160]
    return next((line[:160] for line in lines if line), "unsupported content")


def load_checkpoint(path: Path, map_location="cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass a run directory holding last.pt or a .pt file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    payload = _decode(path, data)
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing to load {path}: it holds objects other than tensors and plain data "
                        f"({_refusal_reason(e)}); nothing in it was run; only load checkpoints you trust and that "
                        f"isoconv wrote") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); "
                                     f"delete it or resume from another run") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not an isoconv checkpoint (no model/config entries)")
    return state


def load_latest_checkpoint(path: Path, warn: Callable[[str], None] = None) -> dict[str, Any]:
    """`path`, or — when it is missing, truncated or corrupt — the previous good checkpoint, with a warning."""
    path = Path(path)
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    try:
        return load_checkpoint(path)
    except CorruptCheckpointError as e:
        problem = str(e)
    except UserError as e:
        if path.exists():
            raise  # a refused pickle or a foreign file: do not silently use something else
        problem = str(e)
    prev = previous_path(path)
    if not prev.is_file():
        raise UserError(f"{problem}; no previous checkpoint {prev.name} to fall back to") from None
    state = load_checkpoint(prev)
    where = f"epoch {state.get('epoch')}" + (f" step {state['step']}" if state.get("step") else "")
    warn(f"isoconv: warning: {problem}; falling back to the previous checkpoint {prev} ({where})")
    return state
