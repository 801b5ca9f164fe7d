"""Tiny ImageNet from the official `tiny-imagenet-200` layout, decoded once into a cached uint8 tensor.

Layout: `wnids.txt` (the 200 class ids), `words.txt` (id -> names), `train/<wnid>/images/*.JPEG`,
`val/images/*.JPEG` with labels in `val/val_annotations.txt`. The unlabeled `test/` folder is ignored,
so the "test" split is `val/`. Classes are the wnids in sorted order (as torchvision's ImageFolder
numbers them); their names are the first name of each id in words.txt.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from ..errors import UserError
from .cache import DatasetCache, cached_stats, load_or_decode, split_key, warn
from .dataset import ImageDataset
from .download import download_and_extract, folder_or_download
from .images import IMAGE_EXTENSIONS
from .splits import Stats, channel_stats

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
WHAT = "Tiny ImageNet"


def download_tiny_imagenet(root: Path) -> Path:
    """Download, md5-check and extract the official zip into `root`; returns root/tiny-imagenet-200."""
    return download_and_extract(TINY_IMAGENET_URL, TINY_IMAGENET_MD5, Path(root), TINY_IMAGENET_FOLDER, what=WHAT)


def _find_folder(root: Path) -> Path:
    folder = root / TINY_IMAGENET_FOLDER
    if not folder.is_dir() and (root / "wnids.txt").is_file():
        return root  # the user pointed at the folder itself
    return folder


def _incomplete(folder: Path, what: str) -> UserError:
    return UserError(f"Tiny ImageNet at {folder} is incomplete: {what}; delete {folder} to download it again, or "
                     f"pass --data-dir DIR pointing to a complete copy")


def _read_lines(path: Path, folder: Path) -> List[str]:
    if not path.is_file():
        raise _incomplete(folder, f"{path.relative_to(folder)} is missing")
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); check its permissions") from None


def read_wnids(folder: Path) -> List[str]:
    """The class ids of wnids.txt, sorted; duplicates and an empty file are errors."""
    path = folder / "wnids.txt"
    wnids = [line.strip() for line in _read_lines(path, folder) if line.strip()]
    if not wnids:
        raise _incomplete(folder, "wnids.txt lists no classes")
    dup = sorted({w for w in wnids if wnids.count(w) > 1}) if len(set(wnids)) != len(wnids) else []
    if dup:
        raise UserError(f"{path} lists class {dup[0]} more than once; fix the file or download Tiny ImageNet again")
    return sorted(wnids)


def class_names(folder: Path, wnids: List[str]) -> List[str]:
    """First name of each wnid in words.txt ("goldfish, Carassius auratus" -> "goldfish"); the wnid if unnamed.

    A name shared by two classes gets its wnid appended, so names stay unique.
    """
    path = folder / "words.txt"
    words: Dict[str, str] = {}
    wanted = set(wnids)
    if path.is_file():
        for line in _read_lines(path, folder):
            wnid, _, text = line.partition("\t")
            if wnid in wanted and text.strip():
                words[wnid] = text.split(",")[0].strip()
    else:
        warn(f"{path} is missing; classes are named by their wnids")
    names = [words.get(w, w) for w in wnids]
    return [f"{n} ({w})" if names.count(n) > 1 else n for n, w in zip(names, wnids)]


def _image_names(folder: Path) -> List[str]:
    """Sorted names of the image files in `folder` (not recursive; hidden files skipped)."""
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if not e.name.startswith(".") and e.is_file()
                     and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
    except OSError as e:
        raise UserError(f"cannot list {folder} ({e.strerror or e}); check its permissions") from None
    return sorted(names)


def train_files(folder: Path, wnids: List[str]) -> Tuple[List[str], List[int]]:
    """Train image paths relative to `folder` (class by class in wnid order) and their labels."""
    train = folder / "train"
    if not train.is_dir():
        raise _incomplete(folder, "the train/ split is missing")
    known = set(wnids)
    extra = sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith(".")
                   and e.name not in known)
    if extra:
        raise UserError(f"{train / extra[0]} is not a class of {folder / 'wnids.txt'} (its label would lie outside "
                        f"the {len(wnids)} classes); add it to wnids.txt or remove the folder")
    paths: List[str] = []
    labels: List[int] = []
    for label, wnid in enumerate(wnids):
        images = train / wnid / "images"
        if not images.is_dir():
            raise _incomplete(folder, f"train/{wnid}/images/ is missing (class {wnid} is listed in wnids.txt)")
        names = _image_names(images)
        if not names:
            raise UserError(f"class folder {images} has no images; add its images or remove {wnid} from wnids.txt")
        paths += [f"train/{wnid}/images/{n}" for n in names]
        labels += [label] * len(names)
    return paths, labels


def val_files(folder: Path, wnids: List[str]) -> Tuple[List[str], List[int]]:
    """The val/ image paths relative to `folder`, in val_annotations.txt order, and their labels."""
    val = folder / "val"
    if not (val / "val_annotations.txt").is_file():
        raise _incomplete(folder, "the val/ split (val/val_annotations.txt) is missing")
    ann = val / "val_annotations.txt"
    index = {w: i for i, w in enumerate(wnids)}
    paths: List[str] = []
    labels: List[int] = []
    present = set(_image_names(val / "images")) if (val / "images").is_dir() else set()
    seen = set()
    for n, line in enumerate(_read_lines(ann, folder), start=1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2:
            raise UserError(f"{ann} line {n}: expected '<file> <wnid> ...', got {line!r:.80}; fix the file")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise UserError(f"{ann} line {n}: class {wnid!r} of {name} is not in wnids.txt (labels must lie in "
                            f"the {len(wnids)} classes); fix the line or the class list")
        if name in seen:
            raise UserError(f"{ann} line {n}: {name} is listed twice; fix the file")
        if name not in present:
            raise _incomplete(folder, f"val/images/{name} (line {n} of val_annotations.txt) is missing")
        seen.add(name)
        paths.append(f"val/images/{name}")
        labels.append(index[wnid])
    if not paths:
        raise _incomplete(folder, "val/val_annotations.txt lists no images")
    return paths, labels


def load_tiny_imagenet(root: Union[str, Path], split: str, download: bool = True,
                       image_size: Optional[int] = None, skip_bad_images: bool = False,
                       norm: Optional[Stats] = None) -> ImageDataset:
    """Load the train (500 per class) or test (= val, 10,000) split; `norm` replaces the computed statistics."""
    root = Path(root).expanduser()
    folder = folder_or_download(_find_folder(root), download, "Tiny ImageNet",
                                lambda: download_tiny_imagenet(root))
    wnids = read_wnids(folder)
    classes = class_names(folder, wnids)
    if not (folder / "val" / "val_annotations.txt").is_file():  # checked for train too: fail before decoding
        raise _incomplete(folder, "the val/ split (val/val_annotations.txt) is missing")
    cache = DatasetCache(folder, "tiny-imagenet")
    train_list = train_files(folder, wnids) if split == "train" or norm is None else None

    def load_train():
        return load_or_decode(cache, "train", *train_list, image_size=image_size, skip_bad=skip_bad_images,
                              what=f"{WHAT} train")

    if split == "train":
        data = load_train()
    else:
        paths, labels = val_files(folder, wnids)
        data = load_or_decode(cache, "val", paths, labels, image_size=image_size, skip_bad=skip_bad_images,
                              what=f"{WHAT} val")
    if norm is None:
        train_key = data.key if split == "train" else split_key(folder, "train", *train_list, image_size)
        norm = cached_stats(cache, {"stats-of": train_key},
                            lambda: channel_stats((data if split == "train" else load_train()).images))
    mean, std = norm
    return ImageDataset(images=data.images, labels=data.labels, classes=classes, mean=tuple(mean), std=tuple(std),
                        name="tiny-imagenet", split=split, skipped=tuple(s[0] for s in data.skipped))
