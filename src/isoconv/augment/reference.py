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
from torchvision.transforms.v2 import functional as TF

from .batched import affine_warp, sample_affine_params

__all__ = ["torchvision_train_transform", "torchvision_test_transform", "KerasAffine"]


class KerasAffine(torch.nn.Module):
    """Per-image rotation / shift / zoom with the Keras options torchvision's RandomAffine lacks (fill mode
    "nearest"/"reflect", the zoom factor scaling the sampled region, independent x/y zoom, fractional shifts):
    one image through :func:`isoconv.augment.batched.affine_warp`, parameters drawn from the global RNG as
    torchvision's transforms draw theirs. Takes a uint8 CHW tensor or a PIL image, returns a uint8 CHW tensor."""

    def __init__(self, *, rotate: float, shift: float, zoom: float, fill: float, interpolation: str,
                 fill_mode: str, zoom_mode: str, fractional_shift: bool) -> None:
        super().__init__()
        self.rotate, self.shift, self.zoom, self.fill = rotate, shift, zoom, fill
        self.interpolation, self.fill_mode, self.zoom_mode = interpolation, fill_mode, zoom_mode
        self.fractional_shift = fractional_shift

    def forward(self, img):
        x = img if isinstance(img, torch.Tensor) else TF.pil_to_tensor(img)
        _, h, w = x.shape
        params = sample_affine_params(1, h, w, self.rotate, self.shift, self.zoom, None, x.device,
                                      fractional_shift=self.fractional_shift, zoom_xy=self.zoom_mode == "region-xy")
        return affine_warp(x[None], *params, fill=self.fill, interpolation=self.interpolation,
                           fill_mode=self.fill_mode, zoom_mode=self.zoom_mode)[0]


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
    affine_fill_mode: str = "constant",
    zoom_mode: str = "image",
    fractional_shift: bool = False,
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
    The Keras affine options (``affine_fill_mode``, ``zoom_mode``, ``fractional_shift``) use :class:`KerasAffine`.
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
    keras = affine_fill_mode != "constant" or zoom_mode != "image" or fractional_shift
    if (rotate > 0 or zoom > 0 or shift > 0) and keras:
        steps.append(KerasAffine(rotate=rotate, shift=shift, zoom=zoom, fill=affine_fill,
                                 interpolation=affine_interpolation, fill_mode=affine_fill_mode, zoom_mode=zoom_mode,
                                 fractional_shift=fractional_shift))
    elif rotate > 0 or zoom > 0 or shift > 0:
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
