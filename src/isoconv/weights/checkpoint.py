"""Checkpoints: plain `torch.save` files that `torch.load(path, weights_only=True)` opens, written atomically and
verified on load.

Integrity: the saved dict carries `sha256`, a digest of everything else in it (every tensor's dtype, shape and
bytes, every other value's repr, in key order). A truncated file fails to unzip; a bit flip inside fails the
digest. Either way the loader falls back to the previous good checkpoint.

Writing keeps the previous good checkpoint as `<name>.prev.pt` (a hard link, so `last.pt` exists at every
moment), writes the new one to a temporary file, fsyncs it and renames it over `last.pt` (`isoconv.fileio`).
Files written by isoconv 0.1 (a 56-byte header with the digest in front of the torch.save stream) still load.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
import shutil
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..fileio import DISK_FULL, atomic_write, describe_file, remove_stale_temporaries

log = logging.getLogger(__name__)

DIGEST_KEY = "sha256"
MAGIC = b"ISOCONV-CKPT-v1\n"  # isoconv 0.1's header, read for one release
_HEADER = struct.Struct(f"<{len(MAGIC)}sQ32s")  # magic, payload length, sha256


class CorruptCheckpointError(UserError):
    """A checkpoint file that is truncated, altered or not a checkpoint at all."""


def previous_path(path: Path) -> Path:
    """Where the previous good checkpoint of `path` is kept (last.pt -> last.prev.pt)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def content_digest(obj: Any) -> str:
    """sha256 over a nested state (dicts in key order, lists, tensors by dtype/shape/bytes, other values by repr)."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=repr):
                walk(k)
                walk(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                walk(v)
            h.update(b"]")
        elif isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(o.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(f"{type(o).__name__}:{o!r}".encode())

    walk(obj)
    return h.hexdigest()


def encode_checkpoint(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save({**state, DIGEST_KEY: content_digest(state)}, buf)
    return buf.getvalue()


def _keep_previous(path: Path) -> None:
    """Make `<name>.prev.pt` the current `path` without ever leaving `path` missing."""
    if not path.exists():
        return
    prev = previous_path(path)
    tmp = prev.with_name(f".{prev.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` atomically; the previous file survives as `<name>.prev.pt`.

    A crash at any moment leaves `path` holding either the old checkpoint or the new one. A full disk
    raises a UserError and leaves the old checkpoint untouched.
    """
    path = Path(path)
    data = encode_checkpoint(state)
    try:
        atomic_write(path, data, before_replace=_keep_previous)
        remove_stale_temporaries(path)
    except OSError as e:
        if e.errno in DISK_FULL:
            then = (f"the previous checkpoint {path} is intact; free some space, then resume with `isoconv train "
                    f"--resume {path.parent}`") if path.exists() else \
                ("no checkpoint was written yet, so the run cannot be resumed; free some space, then run the "
                 "training command again")
            raise UserError(f"no space left on the device writing checkpoint {path} ({len(data) / 1e6:.1f} MB); "
                            f"{then}") from None
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}; check the folder's permissions "
                        f"and space") from None


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


# torch.save's pre-1.6 format starts with a pickled magic number (protocol 2, a long of 10 bytes)
LEGACY_TORCH_HEAD = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def check_weights_file(path: Path, what: str = "a checkpoint",
                       hint: str = "pass a run folder or a .pt written by isoconv train") -> None:
    """A UserError saying what `path` is when it evidently is not a torch.save file (text, an image, a plain
    pickle), before torch is asked to read it."""
    kind = describe_file(path)
    if kind is None:
        try:
            with open(path, "rb") as f:
                head = f.read(len(LEGACY_TORCH_HEAD))
        except OSError:
            return
        if head.startswith(b"\x80") and not head.startswith(LEGACY_TORCH_HEAD) and not zipfile.is_zipfile(path):
            kind = "a plain pickle (pickle.dump)"
    if kind is not None:
        raise UserError(f"{path} is {kind}, not {what}; {hint}")


def torch_load(source, map_location="cpu"):
    """torch.load(weights_only=True) without torch's warnings about the pickle protocol of foreign files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(source, map_location=map_location, weights_only=True)


def load_checkpoint(path: Path, map_location="cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass a run directory holding last.pt or a .pt file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if not data.startswith(MAGIC):
        check_weights_file(path)
    payload = _decode(path, data)
    try:
        state = torch_load(io.BytesIO(payload), map_location=map_location)
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing to load {path}: it holds objects other than tensors and plain data "
                        f"({_refusal_reason(e)}); nothing in it was run; only load checkpoints you trust and that "
                        f"isoconv wrote") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise CorruptCheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); "
                                     f"delete it or resume from another run") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not an isoconv checkpoint (no model/config entries)")
    digest = state.pop(DIGEST_KEY, None)
    if digest is not None and digest != content_digest(state):
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt (checksum mismatch); delete it or resume "
                                     f"from another run")
    return state


def load_latest_checkpoint(path: Path) -> dict[str, Any]:
    """`path`, or — when it is missing, truncated or corrupt — the previous good checkpoint, with a warning."""
    path = Path(path)
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
    log.warning(f"{problem}; falling back to the previous checkpoint {prev} ({where})")
    return state
