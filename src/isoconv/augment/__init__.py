"""Training-time augmentation.

* :class:`BatchAugment` / :func:`normalize` (``batched``): the fast on-device path, batched ops
  with per-image randomness, matching the reference torchvision pipeline.
* :class:`MixupCutmix`, :func:`one_hot_smooth`, :func:`soft_target_cross_entropy` (``mix``).
* :func:`torchvision_train_transform`, :func:`torchvision_test_transform` (``reference``): the
  conventional per-image torchvision pipeline.
"""
from .batched import BatchAugment, normalize
from .mix import MixupCutmix, one_hot_smooth, soft_target_cross_entropy
from .reference import torchvision_test_transform, torchvision_train_transform

__all__ = [
    "BatchAugment",
    "normalize",
    "MixupCutmix",
    "one_hot_smooth",
    "soft_target_cross_entropy",
    "torchvision_train_transform",
    "torchvision_test_transform",
]
