"""A torchvision-style ImageFolder tree: `train/<class>/*` and `val/<class>/*` (or a held-out part of train/).

Classes are the sub-folders of train/ in sorted order; every common image format is read (files
with other extensions and hidden files are ignored) and resized to `image_size` once, at decode time;
the decoded splits are cached like Tiny ImageNet's. Without val/, `val_split` holds out that fraction
of train/ at random with a fixed seed (splits.HOLDOUT_SEED), so every run sees the same split.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from ..errors import ConfigError, UserError
from .cache import DatasetCache, cached_stats, load_or_decode, split_key
from .dataset import ImageDataset
from .images import IMAGE_EXTENSIONS
from .splits import HOLDOUT_SEED, Stats, channel_stats, holdout_indices


def _subfolders(folder: Path) -> List[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise UserError(f"cannot list {folder} ({e.strerror or e}); check its permissions") from None


def _images_under(root: Path, rel: str) -> List[str]:
    """Image files below root/rel (recursively, following links once) relative to root, in a fixed sorted order.

    A folder link inside root/rel that leads back into the dataset outside root/rel (`loop -> ..`, a link to
    another class) is refused: its images would be counted again under this class. Links to folders elsewhere
    (other disks) are followed."""
    found: List[str] = []
    visited = set()
    start = os.path.join(str(root), "")
    real_root, real_class = os.path.realpath(root), os.path.realpath(start + rel)
    for dirpath, dirnames, filenames in os.walk(start + rel, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a link loop
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            _check_folder_link(os.path.join(dirpath, d), real_root, real_class, start + rel)
        here = Path(dirpath[len(start):]).as_posix()
        found += [f"{here}/{f}" for f in sorted(filenames)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return found


def _check_folder_link(path: str, real_root: str, real_class: str, class_dir: str) -> None:
    if not os.path.islink(path):
        return
    target = os.path.realpath(path)
    inside = lambda folder: os.path.commonpath([target, folder]) == folder  # noqa: E731
    if inside(real_class):
        return
    if inside(real_root) or os.path.commonpath([target, real_class]) == target:
        raise UserError(f"{path} is a link to {target}, out of its class folder {class_dir} into the dataset's own "
                        f"folders (their images would be labelled {os.path.basename(class_dir)} too); remove the link")


def class_files(root: Path, split: str, classes: Sequence[str],
                class_dirs: Sequence[str]) -> Tuple[List[str], List[int]]:
    """Files (relative to root) and labels of the class folders `class_dirs` of root/split; labels index `classes`."""
    index = {c: i for i, c in enumerate(classes)}
    paths: List[str] = []
    labels: List[int] = []
    for name in class_dirs:
        if name not in index:
            raise UserError(f"{root / split / name} is not a class of {root / 'train'} (its label would lie "
                            f"outside the {len(classes)} training classes); remove it or add the class to train/")
        files = _images_under(root, f"{split}/{name}")
        if not files:
            raise UserError(f"class folder {root / split / name} has no images (extensions: "
                            f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        paths += files
        labels += [index[name]] * len(files)
    return paths, labels


def load_folder(root: Union[str, Path], split: str, image_size: Optional[int] = None,
                val_split: Optional[float] = None, skip_bad_images: bool = False,
                norm: Optional[Stats] = None) -> ImageDataset:
    """The train or test split of the tree at `root`; test is val/ or, with val_split, the held-out part.

    Either val/ or val_split is required, for the train split too (training always evaluates).
    """
    root = Path(root).expanduser()
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        raise UserError(f"folder dataset at {root} has no train/ folder (expected train/<class>/<images>); pass "
                        f"--data-dir pointing to the folder that holds train/")
    classes = _subfolders(train_dir)
    if not classes:
        raise UserError(f"{train_dir} has no class folders (expected train/<class>/<images>)")
    has_val = val_dir.is_dir()
    if has_val and val_split is not None:
        raise ConfigError(f"{root} has a val/ folder, so --val-split {val_split} would be ignored; drop --val-split "
                          f"to evaluate on val/, or move val/ away to hold out part of train/")
    if not has_val and val_split is None:  # checked for train too: fail before decoding anything
        raise UserError(f"folder dataset at {root} has no val/ folder (the test split); add val/<class>/<images> "
                        f"or pass --val-split 0.1 to hold out part of train/")

    cache = DatasetCache(root, "folder")
    train_paths, train_labels = class_files(root, "train", classes, classes)

    def load_train():
        return load_or_decode(cache, "train", train_paths, train_labels, image_size=image_size,
                              skip_bad=skip_bad_images, what=str(train_dir))

    if val_split is not None:
        data = load_train()
        kept, held = holdout_indices(len(data.labels), val_split)
        idx = kept if split == "train" else held
        images, labels = data.images[idx], data.labels[idx]
        stats_key = {"stats-of": data.key, "holdout": val_split, "seed": HOLDOUT_SEED}
        compute = lambda: channel_stats(data.images[kept])  # noqa: E731
    else:
        if split == "train":
            data = load_train()
            train_key = data.key
        else:
            val_paths, val_labels = class_files(root, "val", classes, _subfolders(val_dir))
            if not val_paths:
                raise UserError(f"{val_dir} has no class folders (expected val/<class>/<images>)")
            data = load_or_decode(cache, "val", val_paths, val_labels, image_size=image_size,
                                  skip_bad=skip_bad_images, what=str(val_dir))
            train_key = split_key(root, "train", train_paths, train_labels, image_size)
        images, labels = data.images, data.labels
        stats_key = {"stats-of": train_key}
        compute = lambda: channel_stats((data if split == "train" else load_train()).images)  # noqa: E731
    mean, std = norm if norm is not None else cached_stats(cache, stats_key, compute)
    return ImageDataset(images=images, labels=labels, classes=classes, mean=tuple(mean), std=tuple(std),
                        name="folder", split=split, skipped=tuple(s[0] for s in data.skipped))
