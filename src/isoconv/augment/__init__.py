"""Training-time augmentation.

* :class:`BatchAugment` / :func:`normalize` (``batched``): the fast on-device path, batched ops
  with per-image randomness, matching the reference torchvision pipeline.
* :class:`MixupCutmix`, :class:`MixThenErase`, :func:`one_hot_smooth` (``mix``); the loss of mixed (soft) targets
  is ``F.cross_entropy`` with probabilities.
* :func:`torchvision_train_transform`, :func:`torchvision_test_transform` (``reference``): the
  conventional per-image torchvision pipeline.
"""
from .batched import BatchAugment, normalize
from .mix import MixThenErase, MixupCutmix, one_hot_smooth
from .reference import torchvision_test_transform, torchvision_train_transform

__all__ = [
    "BatchAugment",
    "normalize",
    "MixupCutmix",
    "one_hot_smooth",
    "MixThenErase",
    "torchvision_train_transform",
    "torchvision_test_transform",
]
