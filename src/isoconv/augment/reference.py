"""The conventional per-image torchvision pipeline of the reference ConvMixer CIFAR-10 trainer.

Used for the ``--loader torchvision`` baseline (in DataLoader workers) and as ground truth for
:class:`isoconv.augment.BatchAugment` in the tests.  The transforms act on ONE image: a uint8
CHW tensor or a PIL image (RandAugment/ColorJitter then use PIL semantics, as the original
trainer did), and return a normalized float32 CHW tensor.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2 as T

__all__ = ["torchvision_train_transform", "torchvision_test_transform"]


def torchvision_train_transform(
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: float = 0.75,
    hflip: bool = True,
    ra_n: int = 1,
    ra_m: int = 8,
    jitter: float = 0.1,
    reprob: float = 0.25,
    no_aug: bool = False,
    translate: int = 0,
    vflip: bool = False,
    rotate: float = 0.0,
    zoom: float = 0.0,
    shift: float = 0.0,
    affine_fill: float = 0.0,
    affine_interpolation: str = "nearest",
    erase_mode: str = "const",
    erase_max_area: float = 0.33,
    erase_after_mix: bool = False,
    crop_ratio: float = 1.0,
) -> T.Compose:
    """RandomResizedCrop -> flips -> RandomAffine -> RandAugment -> ColorJitter -> to float -> Normalize
    -> RandomErasing.

    Stages are left out exactly when :class:`~isoconv.augment.BatchAugment` skips them
    (``hflip=False``, ``vflip=False``, ``rotate=zoom=shift=0``, ``ra_n=0``, ``jitter=0``, ``reprob=0`` or
    ``erase_after_mix``, when the caller erases the mixed batch); ``no_aug`` gives the test transform.
    ``erase_mode="pixel"`` fills the box with N(0, 1) noise per pixel (torchvision ``value="random"``).
    """
    if no_aug:
        return torchvision_test_transform(image_size=image_size, mean=mean, std=std)
    steps: list = [
        T.RandomResizedCrop(
            image_size, scale=(scale, 1.0), ratio=(1.0 / crop_ratio, crop_ratio),
            interpolation=T.InterpolationMode.BILINEAR, antialias=True,
        )
    ]
    if translate > 0:
        steps.append(T.RandomCrop(image_size, padding=translate))
    if hflip:
        steps.append(T.RandomHorizontalFlip(p=0.5))
    if vflip:
        steps.append(T.RandomVerticalFlip(p=0.5))
    if rotate > 0 or zoom > 0 or shift > 0:
        steps.append(T.RandomAffine(
            degrees=rotate, translate=(shift, shift) if shift > 0 else None,
            scale=(1.0 - zoom, 1.0 + zoom) if zoom > 0 else None,
            interpolation=T.InterpolationMode(affine_interpolation), fill=affine_fill,
        ))
    if ra_n > 0:
        steps.append(T.RandAugment(num_ops=ra_n, magnitude=ra_m))
    if jitter > 0:
        steps.append(T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    steps += [
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(mean), std=list(std)),
    ]
    if reprob > 0 and not erase_after_mix:
        steps.append(T.RandomErasing(p=reprob, scale=(0.02, erase_max_area), ratio=(0.3, 3.3),
                                     value="random" if erase_mode == "pixel" else 0))
    steps.append(T.ToPureTensor())  # a plain torch.Tensor, not a tv_tensors.Image
    return T.Compose(steps)


def torchvision_test_transform(*, image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Resize to ``image_size`` (bilinear, antialias; a no-op at the native size) -> to float -> Normalize."""
    return T.Compose([
        T.Resize([image_size, image_size], interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(mean), std=list(std)),
        T.ToPureTensor(),
    ])
