"""CIFAR-100 from the official python pickles (`cifar-100-python/{train,test,meta}`).

Same restricted unpickler and download path as CIFAR-10. Labels are the 100 fine classes, or with
label_type="coarse" the 20 superclasses. Normalization stats are computed once from the training
split (at the requested image size) and kept in the dataset's cache folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from ..errors import ConfigError, UserError
from .cache import DatasetCache, cached_stats, file_listing
from .cifar import read_batch, read_names, stack_batches
from .dataset import ImageDataset
from .download import download_and_extract, folder_or_download
from .images import resize_images
from .splits import Stats, channel_stats

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_META_FILE = "meta"
# label_type -> (label key in the batches, class-name key in meta, number of classes)
LABEL_TYPES = {"fine": ("fine_labels", "fine_label_names", 100), "coarse": ("coarse_labels", "coarse_label_names", 20)}
WHAT = "CIFAR-100"


def download_cifar100(root: Path) -> Path:
    """Download, md5-check and extract the official archive into `root`; returns root/cifar-100-python."""
    return download_and_extract(CIFAR100_URL, CIFAR100_MD5, Path(root), CIFAR100_FOLDER, what=WHAT)


def _find_folder(root: Path) -> Path:
    folder = root / CIFAR100_FOLDER
    if not folder.is_dir() and root.name == CIFAR100_FOLDER and (root / CIFAR100_META_FILE).is_file():
        return root  # the user pointed at the folder itself
    return folder


def _read_split(folder: Path, split: str, label_type: str,
                image_size: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    label_key, _, num_classes = LABEL_TYPES[label_type]
    images, labels = stack_batches([read_batch(folder / split, label_key, num_classes, WHAT)])
    if image_size is not None:
        images = resize_images(images, image_size)
    return images, labels


def load_cifar100(root: Union[str, Path], train: bool, download: bool = True, label_type: str = "fine",
                  image_size: Optional[int] = None, norm: Optional[Stats] = None) -> ImageDataset:
    """Load the CIFAR-100 train (50,000) or test (10,000) split from `root/cifar-100-python`.

    `norm` = (mean, std) replaces the computed statistics (evaluation uses the training run's).
    """
    if label_type not in LABEL_TYPES:
        raise ConfigError(f"--label-type must be one of {', '.join(LABEL_TYPES)}, got {label_type!r}")
    root = Path(root).expanduser()
    folder = folder_or_download(_find_folder(root), download, "CIFAR-100", lambda: download_cifar100(root))
    split = "train" if train else "test"
    for name in (split, CIFAR100_META_FILE):
        if not (folder / name).is_file():
            raise UserError(f"CIFAR-100 at {folder} is incomplete: {name} is missing; delete {folder} to download "
                            f"it again, or pass --data-dir DIR pointing to a complete copy")
    _, names_key, num_classes = LABEL_TYPES[label_type]
    classes = read_names(folder / CIFAR100_META_FILE, names_key, num_classes, WHAT)
    images, labels = _read_split(folder, split, label_type, image_size)

    if norm is None:
        if not (folder / "train").is_file():
            raise UserError(f"CIFAR-100 at {folder} is incomplete: train is missing (its normalization statistics "
                            f"are needed); delete {folder} to download it again")

        def compute() -> Stats:
            train_images = images if train else _read_split(folder, "train", label_type, image_size)[0]
            return channel_stats(train_images)

        key = {"dataset": "cifar100", "train": file_listing(folder, ["train"]), "image_size": image_size}
        norm = cached_stats(DatasetCache(folder, "cifar100"), key, compute)
    mean, std = norm
    return ImageDataset(images=images, labels=labels, classes=classes, mean=tuple(mean), std=tuple(std),
                        name="cifar100", split=split)
