"""Datasets held whole in memory as uint8 tensors."""
from .cifar import (
    CIFAR10_MD5,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_URL,
    RestrictedUnpickler,
    download_cifar10,
    load_cifar10,
    load_pickle,
)
from .cifar100 import CIFAR100_MD5, CIFAR100_URL, download_cifar100, load_cifar100
from .dataset import ImageDataset
from .folder import load_folder
from .load import DATASETS, SPLITS, canonical_name, load_data, load_dataset, normalization
from .root import resolve_data_root
from .splits import (
    HALF_SPLIT_SEED,
    HOLDOUT_SEED,
    channel_stats,
    half_split_indices,
    holdout_indices,
    seeded_half,
    select_test_split,
    xl_half_indices,
)
from .tinyimagenet import TINY_IMAGENET_MD5, TINY_IMAGENET_URL, download_tiny_imagenet, load_tiny_imagenet

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_URL",
    "CIFAR100_MD5",
    "CIFAR100_URL",
    "DATASETS",
    "HALF_SPLIT_SEED",
    "HOLDOUT_SEED",
    "SPLITS",
    "TINY_IMAGENET_MD5",
    "TINY_IMAGENET_URL",
    "ImageDataset",
    "RestrictedUnpickler",
    "canonical_name",
    "channel_stats",
    "download_cifar10",
    "download_cifar100",
    "download_tiny_imagenet",
    "half_split_indices",
    "holdout_indices",
    "load_cifar10",
    "load_cifar100",
    "load_data",
    "load_dataset",
    "normalization",
    "load_folder",
    "load_pickle",
    "load_tiny_imagenet",
    "resolve_data_root",
    "seeded_half",
    "select_test_split",
    "xl_half_indices",
]
