"""Training-time augmentation.

* :class:`BatchAugment` / :func:`normalize` (``batched``): the fast on-device path, batched ops
  with per-image randomness, matching the reference torchvision pipeline.
* :class:`MixupCutmix`, :class:`MixThenErase`, :func:`one_hot_smooth` (``mix``); the loss of mixed (soft) targets
  is ``F.cross_entropy`` with probabilities.
* :func:`torchvision_train_transform`, :func:`torchvision_test_transform` (``reference``): the
  conventional per-image torchvision pipeline.
"""
from ..lazy import lazy_exports
from .batched import BatchAugment, normalize
from .mix import MixThenErase, MixupCutmix, one_hot_smooth

# torchvision's pipeline loads torchvision: only when it is used (the device loader does not need it)
__getattr__, __dir__ = lazy_exports(__name__, {name: "isoconv.augment.reference" for name in
                                               ("torchvision_test_transform", "torchvision_train_transform")})

__all__ = [
    "BatchAugment",
    "normalize",
    "MixupCutmix",
    "one_hot_smooth",
    "MixThenErase",
    "torchvision_train_transform",
    "torchvision_test_transform",
]
