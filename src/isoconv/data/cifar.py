"""CIFAR-10 from the official python pickles (`cifar-10-batches-py`), loaded whole into uint8 tensors.

The pickles are read with a restricted unpickler that only admits the numpy globals the official
files use, plus the harmless ones Python 3 and numpy write for the same content (`_codecs.encode`
for bytes under protocols 0-2, `_frombuffer` for arrays under protocol 5), so a tampered file cannot run code. If the folder is missing the official
archive is downloaded (urllib only), md5-checked and extracted atomically. The pickle helpers
here serve CIFAR-100 too (`cifar100.py`).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import UserError
from .dataset import ImageDataset
from .download import download_and_extract, folder_or_download
from .images import resize_images

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
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The lossless pixels of official train 0-3999 and test 0-999 that ship beside the JPEG-degraded copy
# (shared/data/README.md): `--dataset cifar10-lossless` measures what the JPEG degradation costs.
LOSSLESS_SUBSET_FILE = "cifar10_lossless_reference_subset.npz"

# ---------------------------------------------------------------------------------------------
# restricted unpickling


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_frombuffer():
    try:  # numpy >= 2
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy 1.x
        from numpy.core.numeric import _frombuffer
    return _frombuffer


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes with protocols 0-2: only str -> latin-1 bytes."""
    # torch's weights_only unpickler admits _codecs.encode for this; we also pin the codec and argument type
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise ValueError(f"_codecs.encode is only allowed as str -> latin1 bytes, got {type(text).__name__}, "
                         f"{encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """`bytes()` as Python 3 pickles an empty bytes object with protocols 0-2; any argument is refused."""
    if args:
        raise ValueError("bytes(...) with arguments is not allowed in a CIFAR pickle")
    return b""


# (module, name) -> resolver. Resolving ourselves avoids importing `numpy.core` on numpy 2
# (deprecated alias) and guarantees nothing else can be looked up. Beyond the three numpy globals
# of the official files: how Python 3 writes bytes with protocols 0-2 (`_codecs.encode`, `bytes()`
# for b"") and how numpy writes arrays with protocol 5 (`_frombuffer`).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
    ("__builtin__", "bytes"): lambda: _empty_bytes,
    ("builtins", "bytes"): lambda: _empty_bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only the globals a CIFAR-format pickle needs (see `_ALLOWED_GLOBALS`)."""

    def __init__(self, file, *, path: Union[str, Path] = "<pickle>", encoding: str = "latin1",
                 what: str = "CIFAR-10"):
        super().__init__(file, encoding=encoding)
        self._path = str(path)
        self._what = what

    def find_class(self, module: str, name: str) -> Any:
        resolver = _ALLOWED_GLOBALS.get((module, name))
        if resolver is None:
            raise UserError(
                f"{self._path}: refusing to unpickle {module}.{name}: CIFAR files contain only numpy "
                f"arrays; the file may be malicious or corrupt (delete it and download {self._what} again)"
            )
        return resolver()

    def persistent_load(self, pid: Any) -> Any:
        raise UserError(
            f"{self._path}: refusing to unpickle a persistent id: CIFAR files contain only numpy arrays; "
            f"the file may be malicious or corrupt (delete it and download {self._what} again)"
        )


def _decode(x: Any) -> Any:
    return x.decode("latin1") if isinstance(x, (bytes, bytearray)) else x


def load_pickle(path: Union[str, Path], what: str = "CIFAR-10") -> Dict[str, Any]:
    """Load one CIFAR pickle safely; returns a dict with str keys (bytes keys are decoded)."""
    path = Path(path)
    redo = f"delete {path} (or its whole folder) and download {what} again"
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, path=path, encoding="latin1", what=what).load()
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


def read_batch(path: Path, label_key: str = "labels", num_classes: int = CIFAR10_NUM_CLASSES,
               what: str = "CIFAR-10") -> Tuple[np.ndarray, np.ndarray]:
    """(data uint8 (N, 3072), labels int64 (N,)) of one CIFAR batch file, checked; labels from `label_key`."""
    d = load_pickle(path, what)
    redo = f"delete {path.parent} and download {what} again"
    for key in ("data", label_key):
        if key not in d:
            raise UserError(f"{path}: missing key {key!r} (has {sorted(map(str, d))}); not a {what} batch; {redo}")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__)
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}; {redo}")
    try:
        labels = np.asarray(d[label_key])
    except Exception:
        labels = np.asarray([], dtype=object)
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"{path}: {label_key!r} must be {data.shape[0]} integers (one per image), got "
            f"{labels.dtype} array of shape {labels.shape}; {redo}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"{path}: {label_key} must lie in 0..{num_classes - 1}, found "
            f"{int(labels.min())}..{int(labels.max())}; {redo}"
        )
    return data, labels.astype(np.int64, copy=False)


def read_names(path: Path, key: str, count: int, what: str = "CIFAR-10") -> List[str]:
    """The `count` class names stored under `key` in a CIFAR meta pickle."""
    d = load_pickle(path, what)
    names = d.get(key)
    if not isinstance(names, (list, tuple)) or len(names) != count:
        raise UserError(
            f"{path}: {key!r} must be a list of {count} class names, got {names!r:.200}; "
            f"delete {path.parent} and download {what} again"
        )
    names = [_decode(n) for n in names]
    if not all(isinstance(n, str) and n for n in names):
        raise UserError(f"{path}: {key!r} must be non-empty strings, got {names!r:.200}; "
                        f"delete {path.parent} and download {what} again")
    return names


def stack_batches(batches: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (data, labels) batches into uint8 (N, 3, 32, 32) images and int64 labels."""
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
    return images.view(n, *CIFAR10_IMAGE_SHAPE), labels


# ---------------------------------------------------------------------------------------------
# download


def download_cifar10(root: Path) -> Path:
    """Download, md5-check and extract the official archive into `root`; returns the batches folder.

    Everything is written to temporary names inside `root` first and renamed into place at the
    end, so an interrupted or failed download leaves nothing half-written behind.
    """
    # read at call time (tests patch them)
    return download_and_extract(CIFAR10_URL, CIFAR10_MD5, Path(root), CIFAR10_FOLDER, what="CIFAR-10")


# ---------------------------------------------------------------------------------------------
# loading


def _find_folder(root: Path) -> Path:
    folder = root / CIFAR10_FOLDER
    if not folder.is_dir() and root.name == CIFAR10_FOLDER and (root / CIFAR10_META_FILE).is_file():
        return root  # the user pointed at the batches folder itself
    return folder


def load_cifar10(root: Union[str, Path], train: bool, download: bool = True,
                 image_size: Optional[int] = None) -> ImageDataset:
    """Load the CIFAR-10 train (50,000) or test (10,000) split from `root/cifar-10-batches-py`.

    Normalization stats are the reference trainer's constants; `image_size` resizes the images once here.
    """
    root = Path(root).expanduser()
    folder = folder_or_download(_find_folder(root), download, "CIFAR-10", lambda: download_cifar10(root))

    files: Sequence[str] = CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES
    for name in (*files, CIFAR10_META_FILE):
        if not (folder / name).is_file():
            raise UserError(
                f"CIFAR-10 at {folder} is incomplete: {name} is missing; delete {folder} to download it again, "
                f"or pass --data-dir DIR pointing to a complete copy"
            )
    classes = read_names(folder / CIFAR10_META_FILE, "label_names", CIFAR10_NUM_CLASSES)

    images, labels = stack_batches([read_batch(folder / name) for name in files])
    if image_size is not None:
        images = resize_images(images, image_size)
    return ImageDataset(
        images=images,
        labels=labels,
        classes=classes,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        name="cifar10",
        split="train" if train else "test",
    )


def _lossless_file(root: Path) -> Path:
    if root.is_file():
        return root  # the user pointed at the .npz itself
    if not (root / LOSSLESS_SUBSET_FILE).is_file() and (root.parent / LOSSLESS_SUBSET_FILE).is_file():
        return root.parent / LOSSLESS_SUBSET_FILE  # pointed at cifar-10-batches-py beside it
    return root / LOSSLESS_SUBSET_FILE


def load_cifar10_lossless(root: Union[str, Path], train: bool, image_size: Optional[int] = None) -> ImageDataset:
    """The lossless CIFAR-10 reference subset: official train indices 0-3999 or test indices 0-999.

    Same labels, order, class names and normalization constants as `load_cifar10`, so a model trained on one is
    evaluated on the other as it is, and `--dataset cifar10 --train-subset 4000 --test-subset 1000` is the same
    images with the JPEG-degraded pixels of the shared copy.
    """
    path = _lossless_file(Path(root).expanduser())
    split = "train" if train else "test"
    if not path.is_file():
        raise UserError(f"{path} not found: --dataset cifar10-lossless reads {LOSSLESS_SUBSET_FILE}; pass --data-dir "
                        f"DIR for the folder that holds it (shared/data)")
    try:
        with np.load(path, allow_pickle=False) as z:
            pixels, labels, indices = (z[f"{split}_{key}"] for key in ("images_hwc", "labels", "indices"))
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path} is not a readable CIFAR-10 lossless subset ({exc}); restore the file from "
                        f"shared/data") from None
    if pixels.ndim != 4 or pixels.shape[1:] != (32, 32, 3) or not (len(pixels) == len(labels) == len(indices)):
        raise UserError(f"{path}: {split}_images_hwc has shape {pixels.shape}, expected (N, 32, 32, 3) with N labels "
                        f"and indices; restore the file from shared/data")
    if not np.array_equal(indices, np.arange(len(indices))):
        raise UserError(f"{path}: {split}_indices are not 0..{len(indices) - 1} in order; restore the file from "
                        f"shared/data")
    images = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    if image_size is not None:
        images = resize_images(images, image_size)
    return ImageDataset(images=images, labels=torch.from_numpy(labels.astype(np.int64)),
                        classes=list(CIFAR10_CLASSES), mean=CIFAR10_MEAN, std=CIFAR10_STD,
                        name="cifar10-lossless", split=split)
