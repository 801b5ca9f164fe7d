"""`load_dataset`: one entry point for every dataset by name."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import torch

from ..config import DATASET_CHOICES, TrainConfig
from ..errors import ConfigError, UserError
from .cache import DatasetCache, FailedLoadCleanup
from .cifar import load_cifar10, load_cifar10_lossless
from .cifar100 import load_cifar100
from .dataset import ImageDataset
from .folder import load_folder
from .root import resolve_data_root
from .splits import Stats, holdout_indices, select_test_split
from .tinyimagenet import TINY_IMAGENET_FOLDER, load_tiny_imagenet

DATASETS = DATASET_CHOICES
RAW_PIXELS = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # (mean, std) that leave pixels in [0, 1]: --no-normalize
SPLITS = ("train", "test")


def canonical_name(name: str) -> str:
    """The dataset's canonical name ("Tiny_ImageNet" -> "tiny-imagenet"); unknown names are an error."""
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    for known in DATASETS:
        if known.replace("-", "") == key:
            return known
    raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def load_dataset(name: str, root: Union[str, Path], split: str, download: bool = True, *,
                 label_type: str = "fine", image_size: Optional[int] = None, val_split: Optional[float] = None,
                 skip_bad_images: bool = False, norm: Optional[Stats] = None) -> ImageDataset:
    """Load split "train" or "test" of a dataset as uint8 tensors in memory.

    root: the folder holding cifar-10-batches-py / cifar-100-python / tiny-imagenet-200, or for "folder" the
    folder holding train/ (and val/). label_type: CIFAR-100 fine or coarse labels. image_size: resize once
    while loading. val_split: "folder" without val/ holds out this fraction of train/. norm: (mean, std) to
    use instead of the dataset's own statistics (a trained model's).
    """
    dataset = canonical_name(name)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} for dataset {name!r}; choose one of: {', '.join(SPLITS)}")
    if label_type != "fine" and dataset != "cifar100":
        raise ConfigError(f"--label-type {label_type} applies only to --dataset cifar100, not {dataset}")
    if val_split is not None and dataset != "folder":
        raise ConfigError(f"load_dataset's val_split applies only to the folder dataset; for {dataset} the held-out "
                          f"part is taken by load_data (--val-split)")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"--image-size must be positive, got {image_size}")
    if dataset == "cifar10":
        ds = load_cifar10(root, train=split == "train", download=download, image_size=image_size)
        if norm is not None:
            ds = replace(ds, mean=tuple(norm[0]), std=tuple(norm[1]))
        return ds
    if dataset == "cifar10-lossless":
        return load_cifar10_lossless(root, train=split == "train", image_size=image_size)
    if dataset == "cifar100":
        return load_cifar100(root, train=split == "train", download=download, label_type=label_type,
                             image_size=image_size, norm=norm)
    if dataset == "tiny-imagenet":
        ds = load_tiny_imagenet(root, split, download=download, image_size=image_size,
                                skip_bad_images=skip_bad_images, norm=norm)
        return interleave_classes(ds) if split == "train" else ds  # val/ is already in mixed order
    return interleave_classes(load_folder(root, split, image_size=image_size, val_split=val_split,
                                          skip_bad_images=skip_bad_images, norm=norm))


def normalization(ds: ImageDataset, cfg: TrainConfig) -> ImageDataset:
    """ds with the statistics cfg normalizes by: its own, or mean 0 / std 1 (raw [0, 1] pixels) for
    --no-normalize."""
    return ds if cfg.normalize else replace(ds, mean=RAW_PIXELS[0], std=RAW_PIXELS[1])


def interleave_classes(ds: ImageDataset) -> ImageDataset:
    """Reorder a class-by-class split round-robin over classes (1st image of every class, then the 2nd, ...),
    so `--train-subset N` / `--test-subset N` take about N / classes images of every class, as the first N
    images of CIFAR do, instead of whole classes."""
    labels = ds.labels.cpu()
    rank = torch.empty_like(labels)
    for c in labels.unique():
        where = (labels == c).nonzero().flatten()
        rank[where] = torch.arange(len(where))
    order = torch.argsort(rank * ds.num_classes + labels, stable=True)
    return ds.select(order)


def decode_cache(dataset: str, root: Path) -> DatasetCache:
    """The cache of decoded images (and statistics) of a dataset under the data root."""
    folder = {"folder": root, "tiny-imagenet": root / TINY_IMAGENET_FOLDER}.get(dataset)
    return DatasetCache(Path(root).expanduser() if folder is None else folder.expanduser(), dataset)


def load_data(cfg: TrainConfig, device: torch.device, train: bool = True, norm: Optional[Stats] = None):
    """(train, test) datasets for cfg, test on the device; train is None when train=False.

    The training set moves to the device only for the device loader; the torchvision loader reads it on the CPU.
    The test set is normalized with the training split's statistics, or with `norm` = (mean, std) (a trained
    model's) when train=False. --test-split half / xl-half keep a fixed half of it before --test-subset.
    --no-normalize: the statistics are mean 0, std 1, so every consumer of them (augmentation, evaluation, the
    checkpoint) feeds raw [0, 1] pixels.
    --val-split F: a fixed-seed fraction F of the training images is held out and evaluated instead of the test
    set, which is then never read (the folder dataset does this itself: without val/ that part is its test set).
    """
    root = resolve_data_root(cfg.data_dir)
    dataset = canonical_name(cfg.dataset)
    holdout = cfg.val_split is not None and dataset != "folder"
    opts = dict(download=cfg.download, label_type=cfg.label_type, image_size=cfg.image_size,
                val_split=None if holdout else cfg.val_split, skip_bad_images=cfg.skip_bad_images)
    train_ds = None
    with FailedLoadCleanup(decode_cache(cfg.dataset, root)):  # bad data: no cache of it is left behind
        if holdout:
            full = load_dataset(cfg.dataset, root, "train", norm=norm if not train else None, **opts)
            full = normalization(full, cfg) if train else full
            kept, held = holdout_indices(len(full), cfg.val_split)
            train_ds = full.select(kept).subset(cfg.train_subset) if train else None
            test = replace(full.select(held), split="val")
        else:
            if train:
                train_ds = load_dataset(cfg.dataset, root, "train", **opts)
                train_ds = normalization(train_ds, cfg)
                norm = (train_ds.mean, train_ds.std)
                train_ds = train_ds.subset(cfg.train_subset)
            test = load_dataset(cfg.dataset, root, "test", norm=norm, **opts)
    test = replace(test, split_images=len(test))
    test = select_test_split(test, cfg.test_split)
    if cfg.pad_to:
        test = test.zero_padded(cfg.pad_to)
        train_ds = train_ds.zero_padded(cfg.pad_to) if train_ds is not None else None
    test = test.subset(cfg.test_subset).to(device)
    if not train:
        return None, test
    return (train_ds.to(device) if cfg.loader == "device" else train_ds), test
