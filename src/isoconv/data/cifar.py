"""CIFAR-10 from the official python pickles (`cifar-10-batches-py`), loaded whole into uint8 tensors.

The pickles are read with a restricted unpickler that only admits the three numpy globals the
official files use, so a tampered file cannot run code. If the folder is missing the official
archive is downloaded (urllib only), md5-checked and extracted atomically.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import UserError
from .dataset import ImageDataset

# Reference trainer constants (per channel R, G, B on the [0, 1] scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
CIFAR10_META_FILE = "batches.meta"
CIFAR10_NUM_CLASSES = 10
CIFAR10_IMAGE_SHAPE = (3, 32, 32)

DATASETS = ("cifar10",)
SPLITS = ("train", "test")

_DOWNLOAD_TIMEOUT_S = 60
_CHUNK = 1 << 20

# ---------------------------------------------------------------------------------------------
# restricted unpickling


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


# (module, name) -> resolver. Resolving ourselves avoids importing `numpy.core` on numpy 2
# (deprecated alias) and guarantees nothing else can be looked up.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only the numpy globals found in the official CIFAR pickles."""

    def __init__(self, file, *, path: Union[str, Path] = "<pickle>", encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)
        self._path = str(path)

    def find_class(self, module: str, name: str) -> Any:
        resolver = _ALLOWED_GLOBALS.get((module, name))
        if resolver is None:
            raise UserError(
                f"{self._path}: refusing to unpickle {module}.{name}: CIFAR files contain only numpy "
                f"arrays; the file may be malicious or corrupt (delete it and download CIFAR-10 again)"
            )
        return resolver()

    def persistent_load(self, pid: Any) -> Any:
        raise UserError(
            f"{self._path}: refusing to unpickle a persistent id: CIFAR files contain only numpy arrays; "
            f"the file may be malicious or corrupt (delete it and download CIFAR-10 again)"
        )


def _decode(x: Any) -> Any:
    return x.decode("latin1") if isinstance(x, (bytes, bytearray)) else x


def load_pickle(path: Union[str, Path]) -> Dict[str, Any]:
    """Load one CIFAR pickle safely; returns a dict with str keys (bytes keys are decoded)."""
    path = Path(path)
    redo = f"delete {path} (or its whole folder) and download CIFAR-10 again"
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, path=path, encoding="latin1").load()
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: file is missing; {redo}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read file ({e.strerror or e}); check its permissions") from None
    except MemoryError:
        raise UserError(f"{path}: ran out of memory while unpickling; the file is probably corrupt; {redo}") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, struct.error, ...
        raise UserError(f"{path}: not a valid CIFAR pickle ({type(e).__name__}: {e}); "
                        f"it is truncated or corrupt; {redo}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a pickled dict, got {type(obj).__name__}; the file is corrupt; {redo}")
    return {_decode(k): v for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------
# validation helpers


def _read_batch(path: Path) -> "tuple[np.ndarray, np.ndarray]":
    d = load_pickle(path)
    redo = f"delete {path.parent} and download CIFAR-10 again"
    for key in ("data", "labels"):
        if key not in d:
            raise UserError(f"{path}: missing key {key!r} (has {sorted(map(str, d))}); not a CIFAR-10 batch; {redo}")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__)
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}; {redo}")
    try:
        labels = np.asarray(d["labels"])
    except Exception:
        labels = np.asarray([], dtype=object)
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"{path}: 'labels' must be {data.shape[0]} integers (one per image), got "
            f"{labels.dtype} array of shape {labels.shape}; {redo}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= CIFAR10_NUM_CLASSES):
        raise UserError(
            f"{path}: labels must lie in 0..{CIFAR10_NUM_CLASSES - 1}, found "
            f"{int(labels.min())}..{int(labels.max())}; {redo}"
        )
    return data, labels.astype(np.int64, copy=False)


def _read_meta(path: Path) -> List[str]:
    d = load_pickle(path)
    names = d.get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != CIFAR10_NUM_CLASSES:
        raise UserError(
            f"{path}: 'label_names' must be a list of {CIFAR10_NUM_CLASSES} class names, got {names!r:.200}; "
            f"delete {path.parent} and download CIFAR-10 again"
        )
    names = [_decode(n) for n in names]
    if not all(isinstance(n, str) and n for n in names):
        raise UserError(f"{path}: 'label_names' must be non-empty strings, got {names!r:.200}; "
                        f"delete {path.parent} and download CIFAR-10 again")
    return names


# ---------------------------------------------------------------------------------------------
# download


def _fmt_reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    if reason is not None and not isinstance(e, urllib.error.HTTPError):
        return str(reason)
    return str(e) or type(e).__name__


def _safe_members(tar: tarfile.TarFile, archive_desc: str) -> List[tarfile.TarInfo]:
    members = []
    for m in tar.getmembers():
        p = PurePosixPath(m.name.replace("\\", "/"))
        unsafe_path = (
            not m.name
            or m.name.startswith(("/", "\\"))
            or p.is_absolute()
            or ".." in p.parts
            or (bool(p.parts) and ":" in p.parts[0])  # Windows drive letters
        )
        if unsafe_path:
            raise UserError(f"{archive_desc}: refusing to extract member {m.name!r} (absolute path or '..'); "
                            f"the archive may be malicious or corrupt")
        if not (m.isfile() or m.isdir()):
            raise UserError(f"{archive_desc}: refusing to extract member {m.name!r} (links and special files are "
                            f"not allowed); the archive may be malicious or corrupt")
        members.append(m)
    return members


def download_cifar10(root: Path) -> Path:
    """Download, md5-check and extract the official archive into `root`; returns the batches folder.

    Everything is written to temporary names inside `root` first and renamed into place at the
    end, so an interrupted or failed download leaves nothing half-written behind.
    """
    url, md5 = CIFAR10_URL, CIFAR10_MD5  # read at call time (tests patch them)
    root = Path(root)
    target = root / CIFAR10_FOLDER
    hint = f"put {CIFAR10_FOLDER} under a folder and pass --data-dir DIR or set ISOCONV_DATA"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create data folder {root} ({e.strerror or e}); pass --data-dir DIR "
                        f"pointing to a writable folder, or set ISOCONV_DATA") from None

    try:
        fd, tmp_name = tempfile.mkstemp(dir=root, prefix=".cifar-10-python.", suffix=".tar.gz.part")
    except OSError as e:
        raise UserError(f"cannot write to data folder {root} ({e.strerror or e}); pass --data-dir DIR "
                        f"pointing to a writable folder, or set ISOCONV_DATA") from None
    out = os.fdopen(fd, "wb")
    archive = Path(tmp_name)
    extract_dir: Optional[Path] = None
    try:
        print(f"isoconv: downloading CIFAR-10 from {url} to {root} ...", file=sys.stderr, flush=True)
        h = hashlib.md5()
        try:
            with out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    h.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            raise UserError(f"could not download CIFAR-10 from {url} ({_fmt_reason(e)}); {hint}") from None
        got = h.hexdigest()
        if got != md5:
            raise UserError(f"downloaded CIFAR-10 archive from {url} has md5 {got}, expected {md5} "
                            f"(incomplete or altered download); retry, or {hint}")

        extract_dir = Path(tempfile.mkdtemp(dir=root, prefix=".cifar-10-extract."))
        desc = f"CIFAR-10 archive from {url}"
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = _safe_members(tar, desc)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(extract_dir, members=members, filter="data")
                else:  # pragma: no cover - old Pythons without extraction filters
                    tar.extractall(extract_dir, members=members)
        except UserError:
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise UserError(f"{desc}: cannot extract ({e}); retry, or {hint}") from None
        extracted = extract_dir / CIFAR10_FOLDER
        if not extracted.is_dir():
            raise UserError(f"{desc}: archive has no {CIFAR10_FOLDER}/ folder; retry, or {hint}")
        try:
            os.replace(extracted, target)
        except OSError:
            if not target.is_dir():  # lost a race with a concurrent download: theirs is fine
                raise
        return target
    finally:
        out.close()
        archive.unlink(missing_ok=True)
        if extract_dir is not None:
            shutil.rmtree(extract_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# loading


def _find_folder(root: Path) -> Path:
    folder = root / CIFAR10_FOLDER
    if not folder.is_dir() and root.name == CIFAR10_FOLDER and (root / CIFAR10_META_FILE).is_file():
        return root  # the user pointed at the batches folder itself
    return folder


def load_cifar10(root: Union[str, Path], train: bool, download: bool = True) -> ImageDataset:
    """Load the CIFAR-10 train (50,000) or test (10,000) split from `root/cifar-10-batches-py`."""
    root = Path(root).expanduser()
    folder = _find_folder(root)
    if not folder.is_dir():
        if not download:
            raise UserError(
                f"CIFAR-10 not found at {folder}; pass --data-dir DIR (the folder holding {CIFAR10_FOLDER}), "
                f"set ISOCONV_DATA, or drop --no-download"
            )
        folder = download_cifar10(root)

    files: Sequence[str] = CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES
    for name in (*files, CIFAR10_META_FILE):
        if not (folder / name).is_file():
            raise UserError(
                f"CIFAR-10 at {folder} is incomplete: {name} is missing; delete {folder} to download it again, "
                f"or pass --data-dir DIR pointing to a complete copy"
            )
    classes = _read_meta(folder / CIFAR10_META_FILE)

    batches = [_read_batch(folder / name) for name in files]
    n = sum(d.shape[0] for d, _ in batches)
    images = torch.empty((n, 3072), dtype=torch.uint8)
    labels = torch.empty((n,), dtype=torch.int64)
    img_np, lab_np = images.numpy(), labels.numpy()
    i = 0
    for data, lab in batches:
        j = i + data.shape[0]
        img_np[i:j] = data
        lab_np[i:j] = lab
        i = j
    del batches
    return ImageDataset(
        images=images.view(n, *CIFAR10_IMAGE_SHAPE),
        labels=labels,
        classes=classes,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        name="cifar10",
        split="train" if train else "test",
    )


def load_dataset(name: str, root: Union[str, Path], split: str, download: bool = True) -> ImageDataset:
    """Load a dataset split by name. Only "cifar10" is available for now."""
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} for dataset {name!r}; choose one of: {', '.join(SPLITS)}")
    return load_cifar10(root, train=(split == "train"), download=download)
