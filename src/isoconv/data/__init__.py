"""Datasets held whole in memory as uint8 tensors."""
from .cifar import (
    CIFAR10_MD5,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_URL,
    DATASETS,
    SPLITS,
    RestrictedUnpickler,
    download_cifar10,
    load_cifar10,
    load_dataset,
    load_pickle,
)
from .dataset import ImageDataset
from .root import resolve_data_root

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_URL",
    "DATASETS",
    "SPLITS",
    "ImageDataset",
    "RestrictedUnpickler",
    "download_cifar10",
    "load_cifar10",
    "load_dataset",
    "load_pickle",
    "resolve_data_root",
]
