"""Batched, on-device training augmentation with per-image randomness (airbench-style data path).

The training set lives on the device as one uint8 tensor ``(N, 3, H, W)``; a batch is drawn by
index and :class:`BatchAugment` augments it with batched tensor ops.  Every image still gets its
own random parameters, reproducing the reference ConvMixer CIFAR-10 trainer's per-image
torchvision pipeline (see :func:`isoconv.augment.reference.torchvision_train_transform`)::

    RandomResizedCrop(size, scale=(scale, 1), ratio=(1, 1))   # bilinear, antialias
    -> RandomHorizontalFlip(0.5)
    -> RandomVerticalFlip(0.5)                                # only with vflip=True
    -> RandomAffine(rotate, (shift, shift), (1-zoom, 1+zoom), fill=affine_fill)  # only if any is > 0
    -> RandAugment(num_ops=ra_n, magnitude=ra_m)              # 31 bins, nearest, fill 0
    -> ColorJitter(brightness=j, contrast=j, saturation=j)
    -> ToDtype(float32, scale=True) -> Normalize(mean, std)
    -> RandomErasing(p=reprob, scale=(0.02, erase_max_area), ratio=(0.3, 3.3),
                     value=0 (erase_mode="const") or "random" (erase_mode="pixel"))

Fidelity to torchvision (uint8 CHW tensors, transforms.v2), measured by ``tests/test_augment.py``:

* RandAugment: **exact** (``torch.equal``) for a given op, magnitude and sign.  Ops are sampled
  per image, the batch is grouped by (op, sign) and every group goes through the very
  ``torchvision.transforms.v2.functional`` call torchvision's ``RandAugment`` makes.
* RandomResizedCrop: the crop box is sampled as torchvision does (area fraction uniform in
  ``[scale, 1]``, side ``round(sqrt(area))``, integer top/left uniform over the valid positions).
  The resize is a batched separable interpolation (two ``bmm``) whose weights are those of
  torch's antialiased bilinear kernel (triangle filter, widened when downscaling, renormalised
  at the crop border), in float32, rounded back to uint8.  Tolerance vs
  ``F.resized_crop(img, top, left, h, w, [size, size], antialias=True)``:
  - torchvision's float path (float input, CUDA, CPUs without AVX2), rounded to uint8: identical
    up to float summation order -- max abs diff <= 1 on < 0.1% of pixels (none observed when
    upscaling, ~0.01% when downscaling);
  - torchvision's CPU uint8 kernel (AVX2, fixed-point weights and an intermediate uint8
    rounding between the two passes): max abs diff <= 1 gray level, mean abs diff ~0.17
    (about 17% of pixels off by one; checked < 0.25).
  Crops of side == size are copied exactly.
* ColorJitter: per-image factors and per-image op order.  The arithmetic emulates torchvision's
  uint8 path (each op is a blend ``x*f + g*(1-f)``, clamped to [0, 255] and truncated to an
  integer; the grayscale image used by contrast/saturation is floored), carried out in float32
  with the same rounding (``addcmul`` == torchvision's ``mul(f).add_(g, alpha=1-f)``).  Result:
  bit-identical to torchvision on CPU in the tests; on other hardware a fused/unfused
  multiply-add can flip a truncation, so the documented tolerance is max abs diff <= 1 gray
  level on < 0.1% of pixels.  (A pure-float jitter without the per-op truncation would differ
  by up to ~1-2 levels everywhere; this emulation avoids that.)
* Flip, ToDtype+Normalize and RandomErasing (value 0): exact for the same parameters.
* Vertical flip: exact.  Affine (rotate / zoom / shift): the parameters are sampled as
  torchvision v2 ``RandomAffine(degrees=rotate, translate=(shift, shift), scale=(1-zoom, 1+zoom))``
  does (angle ~ U[-rotate, rotate], integer pixel shifts ``round(U[-shift*W, shift*W])``, scale
  ~ U[1-zoom, 1+zoom], no shear); the warp builds torchvision's own inverse matrix and sampling
  grid per image and runs one batched ``grid_sample`` with torchvision's fill-mask blending, so it
  equals ``F.affine(img, angle, [tx, ty], scale, [0, 0], interpolation, fill)`` up to float
  rounding of the matrix: nearest -- identical except (rarely) a pixel whose source lies exactly
  on a rounding boundary (checked: >= 99.9% of pixels equal); bilinear -- max abs diff <= 1 gray
  level.  Keras options (the Keras seeds' RandomRotation/RandomZoom/ImageDataGenerator): ``affine_fill_mode``
  "nearest"/"reflect" (grid_sample padding "border"/"reflection", equal to scipy.ndimage's modes at order 1),
  ``zoom_mode`` "region" (the factor scales the sampled region, so the image by 1/z) or "region-xy" (independent
  x/y factors, ImageDataGenerator), ``fractional_shift`` (shifts not rounded).  The region modes compose as
  ImageDataGenerator does (input = R (Z o + t) about the centre); checked against torchvision (isotropic) and
  scipy.ndimage.affine_transform (independent x/y, fill modes), max abs diff <= 1 gray level.
* Pixel-mode erasing (timm ``RandomErasing(mode="pixel")``): the box is filled with per-pixel,
  per-channel N(0, 1) noise in normalized space.  timm's aspect range is (0.3, 1/0.3) where
  torchvision's (used here) is (0.3, 3.3); with ``erase_after_mix`` the stage is left to the caller
  (:meth:`BatchAugment.erase_stage` on the mixed batch), as the simple-convnext seed erases after Mixup.

Randomness: every random number comes from the ``torch.Generator`` passed to ``__call__`` (on the
same device as the images), so a run is reproducible and resumable from the generator state.
The random streams differ from torchvision's (which draws per image from the global RNG), only
the distributions match.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..lazy import lazy_module

# torchvision's ops are RandAugment's only (the recipes without it never import torchvision)
TF = lazy_module("torchvision.transforms.v2.functional")

__all__ = [
    "RA_OPS",
    "RA_SIGNED",
    "BatchAugment",
    "normalize",
    "ra_magnitude",
    "apply_ra_op",
    "randaugment_apply",
    "resized_crop",
    "color_jitter",
    "erase",
    "sample_aspect_crop_boxes",
    "sample_crop_boxes",
    "sample_ra_ops",
    "sample_jitter_params",
    "sample_erase_boxes",
    "sample_affine_params",
    "affine_warp",
    "erase_pixels",
    "ERASE_MODES",
    "AFFINE_INTERPOLATIONS",
    "FILL_MODES",
    "ZOOM_MODES",
]

ERASE_MODES = ("const", "pixel")
AFFINE_INTERPOLATIONS = ("nearest", "bilinear")
FILL_MODES = ("constant", "nearest", "reflect")
ZOOM_MODES = ("image", "region", "region-xy")

# Same order as torchvision.transforms.v2.RandAugment._AUGMENTATION_SPACE.
RA_OPS: tuple[str, ...] = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
RA_SIGNED: tuple[bool, ...] = (
    False, True, True, True, True, True, True, True, True, True, False, False, False, False,
)


def _check_generator(images: Tensor, generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != images.device.type:
        raise ValueError(
            f"generator is on {generator.device} but images are on {images.device}; "
            f"create it with torch.Generator(device=images.device)"
        )


def _rand(shape, generator: torch.Generator, device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _randint_below(n: Tensor, generator: torch.Generator) -> Tensor:
    """Per-element integer uniform on ``[0, n)`` (``n`` >= 1, int64 tensor)."""
    u = _rand(n.shape, generator, n.device)
    return torch.minimum((u * n).long(), n - 1)


def random_translate(x: Tensor, pad: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """torchvision ``RandomCrop(size, padding=pad)`` per image: zero-pad by ``pad``, then crop the
    original size at a per-image offset (uniform integers in ``[0, 2*pad]``). Returns (out, dy, dx)."""
    B, _, H, W = x.shape
    dev = x.device
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator, device=dev)
    rows = (dy[:, None] + torch.arange(H, device=dev))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=dev))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(B, device=dev)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=dev)[None, :, None, None]
    return xp[batch, chans, rows, cols], dy, dx


def _select(a: Tensor, b: Tensor, use_b: Tensor) -> Tensor:
    """Per-image ``b if use_b else a`` (``use_b`` bool ``(B,)``): an index_select of whole images,
    several times faster on CPU than a broadcast ``torch.where``."""
    B = a.shape[0]
    both = torch.stack([a, b], dim=1).flatten(0, 1)
    return both.index_select(0, torch.arange(B, device=a.device) * 2 + use_b.long())


# --------------------------------------------------------------------------------------------
# normalize
# --------------------------------------------------------------------------------------------

def normalize(images_uint8: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32 ``(x / 255 - mean) / std``.

    Bit-identical to torchvision ``ToDtype(float32, scale=True)`` followed by ``Normalize``.
    ``mean``/``std`` are on the [0, 1] scale.
    """
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images_uint8.dtype}")
    return _normalize_float255(images_uint8.to(torch.float32), mean, std)


def _normalize_float255(x: Tensor, mean, std) -> Tensor:
    """Same as :func:`normalize` for a float tensor holding integer values in [0, 255]."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.to(torch.float32).mul(1.0 / 255).sub_(m).div_(s)


# --------------------------------------------------------------------------------------------
# RandomResizedCrop
# --------------------------------------------------------------------------------------------

def sample_crop_boxes(
    batch: int, height: int, width: int, scale: float, generator: torch.Generator, device
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image square crop boxes as torchvision ``RandomResizedCrop(scale=(scale, 1), ratio=(1, 1))``.

    Area fraction ~ U[scale, 1]; side = round(sqrt(fraction * H * W)) (round half to even, like
    Python's ``round``); top/left uniform integers over the valid positions.  For non-square
    images a side larger than ``min(H, W)`` is clipped to it (torchvision would resample).
    Returns int64 tensors ``(top, left, side)`` of shape ``(batch,)``.
    """
    frac = scale + (1.0 - scale) * _rand((batch,), generator, device)
    side = torch.round(torch.sqrt(frac.double() * (height * width))).long()
    side = side.clamp(1, min(height, width))
    top = _randint_below(height - side + 1, generator)
    left = _randint_below(width - side + 1, generator)
    return top, left, side


def first_fitting(h: Tensor, w: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of `attempts` candidate boxes ``(batch, attempts)``: the first valid one's (h, w), and whether any was
    valid (when none is, the first candidate's size is returned)."""
    first = valid.to(torch.int8).argmax(dim=1, keepdim=True)
    return h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1), valid.any(dim=1)


def sample_aspect_crop_boxes(
    batch: int, height: int, width: int, scale: float, ratio: float, generator: torch.Generator, device,
    attempts: int = 10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-image crop boxes as torchvision ``RandomResizedCrop(scale=(scale, 1), ratio=(1/ratio, ratio))``.

    ``attempts`` candidates per image: area ~ U[scale, 1] * H * W, aspect log-uniform in [1/ratio, ratio],
    ``w = round(sqrt(area * aspect))``, ``h = round(sqrt(area / aspect))``; the first candidate with
    ``0 < w <= W`` and ``0 < h <= H`` is used with uniform integer top/left. An image with no fitting candidate gets
    torchvision's fallback, the whole image clipped to the ratio range and centred.
    Returns int64 ``(top, left, h, w)`` of shape ``(batch,)``.
    """
    area = (height * width) * (scale + (1.0 - scale) * _rand((batch, attempts), generator, device).double())
    log_r = math.log(ratio)
    aspect = torch.exp(-log_r + 2 * log_r * _rand((batch, attempts), generator, device).double())
    w = torch.round(torch.sqrt(area * aspect)).long()
    h = torch.round(torch.sqrt(area / aspect)).long()
    h, w, ok = first_fitting(h, w, (w > 0) & (w <= width) & (h > 0) & (h <= height))
    in_ratio = width / height
    if in_ratio < 1 / ratio:
        fallback_w, fallback_h = width, int(round(width * ratio))
    elif in_ratio > ratio:
        fallback_w, fallback_h = int(round(height * ratio)), height
    else:
        fallback_w, fallback_h = width, height
    h = torch.where(ok, h, torch.full_like(h, fallback_h))
    w = torch.where(ok, w, torch.full_like(w, fallback_w))
    top = torch.where(ok, _randint_below(height - h + 1, generator), (height - h) // 2)
    left = torch.where(ok, _randint_below(width - w + 1, generator), (width - w) // 2)
    return top, left, h, w


def _aa_bilinear_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """``(B, out_size, in_size)`` interpolation matrices mapping the window [start, start+length)
    of each image's axis to ``out_size`` samples, with the weights of torch's antialiased bilinear
    kernel (PIL-style triangle filter, support scaled by max(1, length / out_size), renormalised
    over the pixels inside the window)."""
    dev = start.device
    scale = (length.to(torch.float32) / out_size)[:, None, None]  # (B,1,1)
    support_scale = torch.clamp(scale, min=1.0)
    i = torch.arange(out_size, device=dev, dtype=torch.float32)[None, :, None]  # (1,S,1)
    center = scale * (i + 0.5)  # crop-relative coordinate of each output sample
    p = torch.arange(in_size, device=dev, dtype=torch.float32)[None, None, :]  # (1,1,N)
    rel = p - start.to(torch.float32)[:, None, None]  # crop-relative pixel index, (B,1,N)
    inside = ((rel >= 0) & (rel < length.to(torch.float32)[:, None, None])).to(torch.float32)
    w = (rel + 0.5) - center  # (B,S,N) distance from each output sample's centre
    w.abs_().div_(support_scale).neg_().add_(1.0).clamp_(min=0.0).mul_(inside)  # triangle filter
    return w.div_(w.sum(dim=-1, keepdim=True))


def resized_crop(images: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor, size: int) -> Tensor:
    """Batched per-image ``F.resized_crop(img, top, left, h, w, [size, size], antialias=True)``.

    ``images`` is uint8 ``(B, C, H, W)``; box tensors are int64 ``(B,)``.  Returns uint8
    ``(B, C, size, size)``.  Matches torchvision within 1 gray level (see module docstring).
    """
    B, C, H, W = images.shape
    wy = _aa_bilinear_weights(top, height, H, size)  # (B,S,H)
    wx = _aa_bilinear_weights(left, width, W, size)  # (B,S,W)
    S = size
    x = images.to(torch.float32).reshape(B, C * H, W)
    t = torch.bmm(x, wx.transpose(1, 2))  # (B, C*H, S): resize along W
    t = t.view(B, C, H, S).transpose(2, 3).reshape(B, C * S, H)
    t = torch.bmm(t, wy.transpose(1, 2))  # (B, C*S_x, S_y): resize along H
    out = t.view(B, C, S, S).transpose(2, 3).contiguous()
    return out.round_().clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# RandAugment
# --------------------------------------------------------------------------------------------

def _own_ra_space(num_bins: int, height: int, width: int) -> dict:
    """Fallback copy of torchvision (0.29) ``RandAugment._AUGMENTATION_SPACE`` evaluated at a size."""
    lin = lambda lo, hi: torch.linspace(lo, hi, num_bins)  # noqa: E731
    return {
        "Identity": (None, False),
        "ShearX": (lin(0.0, 0.3), True),
        "ShearY": (lin(0.0, 0.3), True),
        "TranslateX": (lin(0.0, 150.0 / 331.0 * width), True),
        "TranslateY": (lin(0.0, 150.0 / 331.0 * height), True),
        "Rotate": (lin(0.0, 30.0), True),
        "Brightness": (lin(0.0, 0.9), True),
        "Color": (lin(0.0, 0.9), True),
        "Contrast": (lin(0.0, 0.9), True),
        "Sharpness": (lin(0.0, 0.9), True),
        "Posterize": ((8 - (torch.arange(num_bins) / ((num_bins - 1) / 4))).round().int(), False),
        "Solarize": (lin(1.0, 0.0), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
    }


@functools.lru_cache(maxsize=64)
def _ra_space(num_bins: int, height: int, width: int) -> dict:
    """op -> (tuple of per-bin magnitudes or None, signed).

    Taken from the installed torchvision's ``RandAugment._AUGMENTATION_SPACE`` so that the float
    values (and version differences such as the Solarize scale) are exactly torchvision's; falls
    back to a built-in copy if that private table is missing or has another layout.
    """
    def evaluate(space, call):
        out = {}
        for op, signed in zip(RA_OPS, RA_SIGNED):
            fn_or_mags, tv_signed = space[op]
            mags = call(fn_or_mags)
            if bool(tv_signed) != signed:
                raise ValueError(op)
            out[op] = (None if mags is None else tuple(float(v) for v in mags), signed)
        return out

    try:
        from torchvision.transforms.v2 import RandAugment

        return evaluate(RandAugment._AUGMENTATION_SPACE, lambda fn: fn(num_bins, height, width))
    except Exception:  # pragma: no cover - depends on the torchvision version
        return evaluate(_own_ra_space(num_bins, height, width), lambda mags: mags)


def _solarize_threshold(magnitude: float, num_bins: int = 31) -> float:
    # torchvision >= 0.16-ish tabulates Solarize on [1, 0] and scales by the dtype's max (255);
    # older versions tabulated [255, 0] and used it as is.
    solarize = _ra_space(num_bins, 1, 1)["Solarize"][0]
    return magnitude if max(solarize) > 1.0 else 255.0 * magnitude


def ra_magnitude(op: str, magnitude_bin: int, height: int, width: int, num_bins: int = 31, negative: bool = False) -> float:
    """Magnitude torchvision's ``RandAugment`` uses for ``op`` at bin ``magnitude_bin`` for an
    image of size ``(height, width)``: ``float(magnitudes[bin])``, negated for signed ops when
    ``negative``; 0.0 for ops without a magnitude (Identity, AutoContrast, Equalize)."""
    if op not in RA_OPS:
        raise ValueError(f"unknown RandAugment op {op!r}")
    mags, signed = _ra_space(num_bins, height, width)[op]
    if mags is None:
        return 0.0
    mag = mags[magnitude_bin]
    return -mag if (signed and negative) else mag


def apply_ra_op(images: Tensor, op: str, magnitude: float) -> Tensor:
    """Apply one RandAugment op with a fixed magnitude to a uint8 batch ``(..., C, H, W)``.

    The calls are those of torchvision v2 ``RandAugment._apply_image_or_video_transform``
    (nearest interpolation, fill ``None`` -> 0); all of them treat leading dimensions as
    independent images, so the result equals per-image application exactly.
    """
    nearest = TF.InterpolationMode.NEAREST
    if op == "Identity":
        return images
    if op == "ShearX":
        return TF.affine(images, angle=0.0, translate=[0, 0], scale=1.0,
                         shear=[math.degrees(math.atan(magnitude)), 0.0],
                         interpolation=nearest, fill=None, center=[0, 0])
    if op == "ShearY":
        return TF.affine(images, angle=0.0, translate=[0, 0], scale=1.0,
                         shear=[0.0, math.degrees(math.atan(magnitude))],
                         interpolation=nearest, fill=None, center=[0, 0])
    if op == "TranslateX":
        return TF.affine(images, angle=0.0, translate=[int(magnitude), 0], scale=1.0,
                         interpolation=nearest, shear=[0.0, 0.0], fill=None)
    if op == "TranslateY":
        return TF.affine(images, angle=0.0, translate=[0, int(magnitude)], scale=1.0,
                         interpolation=nearest, shear=[0.0, 0.0], fill=None)
    if op == "Rotate":
        return TF.rotate(images, angle=magnitude, interpolation=nearest, fill=None)
    if op == "Brightness":
        return TF.adjust_brightness(images, brightness_factor=1.0 + magnitude)
    if op == "Color":
        return TF.adjust_saturation(images, saturation_factor=1.0 + magnitude)
    if op == "Contrast":
        return TF.adjust_contrast(images, contrast_factor=1.0 + magnitude)
    if op == "Sharpness":
        return TF.adjust_sharpness(images, sharpness_factor=1.0 + magnitude)
    if op == "Posterize":
        return TF.posterize(images, bits=int(magnitude))
    if op == "Solarize":
        return TF.solarize(images, threshold=_solarize_threshold(magnitude))
    if op == "AutoContrast":
        return TF.autocontrast(images)
    if op == "Equalize":
        return TF.equalize(images)
    raise ValueError(f"unknown RandAugment op {op!r}")


def sample_ra_ops(batch: int, generator: torch.Generator, device) -> tuple[Tensor, Tensor]:
    """One RandAugment round: per-image op index (uniform over the 14 ops) and sign
    (negative with probability 0.5, as torchvision's ``torch.rand(()) <= 0.5``)."""
    ops = torch.randint(len(RA_OPS), (batch,), generator=generator, device=device)
    negative = _rand((batch,), generator, device) <= 0.5
    return ops, negative


def randaugment_apply(images: Tensor, ops: Tensor, negative: Tensor, magnitude_bin: int, num_bins: int = 31) -> Tensor:
    """Apply per-image RandAugment ops (one round) to a uint8 batch.

    ``ops`` (int64, ``(B,)``) indexes :data:`RA_OPS`; ``negative`` (bool, ``(B,)``) flips the sign of
    signed ops.  The batch is grouped by (op, sign); each group gets one torchvision call with
    the shared magnitude and the results are scattered back.  One host sync (group sizes).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"RandAugment expects uint8 images, got {images.dtype}")
    B, _, H, W = images.shape
    signed = torch.tensor(RA_SIGNED, device=images.device)[ops]
    key = ops * 2 + (negative & signed).long()
    counts = torch.bincount(key, minlength=2 * len(RA_OPS)).tolist()
    order = torch.argsort(key, stable=True)
    parts = []
    start = 0
    for k, cnt in enumerate(counts):
        if cnt == 0:
            continue
        idx = order[start:start + cnt]
        start += cnt
        name = RA_OPS[k // 2]
        mag = ra_magnitude(name, magnitude_bin, H, W, num_bins, negative=bool(k % 2))
        parts.append(apply_ra_op(images.index_select(0, idx), name, mag))
    out = torch.empty_like(images)
    out[order] = torch.cat(parts)
    return out


# --------------------------------------------------------------------------------------------
# ColorJitter
# --------------------------------------------------------------------------------------------

def sample_jitter_params(batch: int, jitter: float, generator: torch.Generator, device) -> tuple[Tensor, Tensor]:
    """Per-image factors ``(B, 3)`` [brightness, contrast, saturation], each uniform in
    ``[max(0, 1 - jitter), 1 + jitter]``, and a per-image order ``(B, 3)`` (a uniform random
    permutation of 0=brightness, 1=contrast, 2=saturation)."""
    lo, hi = max(0.0, 1.0 - jitter), 1.0 + jitter
    factors = lo + (hi - lo) * _rand((batch, 3), generator, device)
    order = torch.argsort(_rand((batch, 3), generator, device), dim=1)
    return factors, order


def _grayscale(x: Tensor) -> Tensor:
    # Same expression (and therefore the same float rounding) as torchvision's _rgb_to_grayscale_image.
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Batched ColorJitter (brightness, contrast, saturation; no hue) with per-image parameters.

    ``x``: float32 ``(B, 3, H, W)`` holding integer values in [0, 255] (a uint8 image cast to
    float).  Emulates torchvision on uint8 input: every op is a blend ``x*f + g*(1-f)`` with
    ``g`` = 0 (brightness), mean of the floored grayscale image (contrast) or the floored
    grayscale image (saturation), clamped to [0, 255] and truncated to an integer.  Returns
    float32 with integer values (within 1 gray level of torchvision, see module docstring).
    """
    B = x.shape[0]
    for k in range(order.shape[1]):
        op = order[:, k].view(B, 1, 1, 1)
        f = factors.gather(1, order[:, k:k + 1]).view(B, 1, 1, 1)
        gray = _grayscale(x).floor_()
        mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
        # g = 0 (brightness), mean (contrast) or gray (saturation); exact selection by 0/1 weights
        # (cheaper than a broadcast torch.where on CPU).
        is_con = (op == 1).to(x.dtype)
        is_sat = (op == 2).to(x.dtype)
        g = torch.addcmul(mean * is_con, gray, is_sat)
        # addcmul rounds like torchvision's ``image.mul(f).add_(g, alpha=1 - f)`` (bit-identical
        # on CPU); for brightness g == 0 and this is exactly ``image.mul(f)``.
        x = torch.addcmul(x * f, g, 1.0 - f).clamp_(0, 255).floor_()
    return x


# --------------------------------------------------------------------------------------------
# RandomErasing
# --------------------------------------------------------------------------------------------

def sample_erase_boxes(
    batch: int, height: int, width: int, p: float, generator: torch.Generator, device,
    scale=(0.02, 0.33), ratio=(0.3, 3.3), attempts: int = 10,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-image RandomErasing boxes with torchvision semantics, vectorised.

    ``attempts`` candidates per image: area ~ U[scale] * H * W, aspect ratio log-uniform in
    ``ratio``, ``h = round(sqrt(area * r))``, ``w = round(sqrt(area / r))``; the first candidate
    with ``h < H`` and ``w < W`` is used, top/left uniform integers.  An image is erased with
    probability ``p`` (and only if some candidate fits).
    Returns ``(top, left, h, w, apply)``, int64 and bool tensors of shape ``(batch,)``.
    """
    area = (height * width) * (scale[0] + (scale[1] - scale[0]) * _rand((batch, attempts), generator, device))
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lr0 + (lr1 - lr0) * _rand((batch, attempts), generator, device))
    h = torch.round(torch.sqrt(area * aspect)).long()
    w = torch.round(torch.sqrt(area / aspect)).long()
    h, w, ok = first_fitting(h, w, (h < height) & (w < width))
    h = torch.where(ok, h, torch.zeros_like(h))
    w = torch.where(ok, w, torch.zeros_like(w))
    top = _randint_below(height - h + 1, generator)
    left = _randint_below(width - w + 1, generator)
    apply = (_rand((batch,), generator, device) < p) & ok
    return top, left, h, w, apply


def box_mask(x: Tensor, top: Tensor, left: Tensor, h: Tensor, w: Tensor, apply: Tensor) -> Tensor:
    """``(B, H, W)`` bool: inside the box ``[top, top+h) x [left, left+w)`` of every image with ``apply``; built
    from ``arange`` comparisons, no Python loop."""
    B, _, H, W = x.shape
    rows = torch.arange(H, device=x.device).view(1, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    t, l_ = top.view(B, 1, 1), left.view(B, 1, 1)
    mask = (rows >= t) & (rows < t + h.view(B, 1, 1)) & (cols >= l_) & (cols < l_ + w.view(B, 1, 1))
    return mask & apply.view(B, 1, 1)


def erase(x: Tensor, top: Tensor, left: Tensor, h: Tensor, w: Tensor, apply: Tensor, value: float = 0.0) -> Tensor:
    """Set the box ``[top, top+h) x [left, left+w)`` of every image with ``apply`` to ``value``
    (all channels); a mask built from ``arange`` comparisons, no Python loop."""
    keep = (~box_mask(x, top, left, h, w, apply)).to(x.dtype)[:, None]
    # multiply by a 0/1 mask (a broadcast masked_fill/where is several times slower on CPU);
    # the erased pixels become (+/-)0.0, then ``value`` is added there.
    out = x * keep
    if value != 0:
        out = out + (1.0 - keep) * value
    return out


def erase_pixels(x: Tensor, top: Tensor, left: Tensor, h: Tensor, w: Tensor, apply: Tensor,
                 generator: torch.Generator) -> Tensor:
    """Like :func:`erase`, but the box gets N(0, 1) noise per pixel and channel (timm ``mode="pixel"``;
    torchvision ``RandomErasing(value="random")``).  Noise is drawn for the whole batch from ``generator``."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.where(box_mask(x, top, left, h, w, apply)[:, None], noise, x)


# --------------------------------------------------------------------------------------------
# RandomAffine (rotate / zoom / shift) and vertical flip
# --------------------------------------------------------------------------------------------

def sample_affine_params(batch: int, height: int, width: int, rotate: float, shift: float, zoom: float,
                         generator: torch.Generator, device, *, fractional_shift: bool = False,
                         zoom_xy: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-image torchvision v2 ``RandomAffine(degrees=rotate, translate=(shift, shift), scale=(1-zoom, 1+zoom))``
    parameters: angle (degrees) ~ U[-rotate, rotate]; integer shifts tx = round(U[-shift*W, shift*W]),
    ty likewise with H (round half to even, like Python's ``round``); scale ~ U[1-zoom, 1+zoom].
    Returns float32 angle, int64 tx, int64 ty, float32 scale, each ``(batch,)``.

    ``fractional_shift``: tx, ty stay float32 fractions of a pixel (Keras ImageDataGenerator). ``zoom_xy``: scale
    is ``(batch, 2)``, independent factors for x and y (ImageDataGenerator's zoom_range), drawn after the rest."""
    u = _rand((batch, 4), generator, device)
    angle = (2.0 * u[:, 0] - 1.0) * rotate
    max_dx, max_dy = float(shift * width), float(shift * height)
    tx = (2.0 * u[:, 1] - 1.0) * max_dx
    ty = (2.0 * u[:, 2] - 1.0) * max_dy
    if not fractional_shift:
        tx, ty = torch.round(tx).long(), torch.round(ty).long()
    scale = (1.0 - zoom) + 2.0 * zoom * u[:, 3]
    if zoom_xy:
        scale = torch.stack([scale, (1.0 - zoom) + 2.0 * zoom * _rand((batch,), generator, device)], dim=1)
    return angle, tx, ty, scale


def _inverse_affine_theta(angle: Tensor, tx: Tensor, ty: Tensor, scale: Tensor) -> Tensor:
    """``(B, 2, 3)`` float32 inverse matrices, torchvision's ``_get_inverse_affine_matrix`` (centre (0, 0) =
    the image centre, no shear) evaluated in float64 as it is in Python, then cast like its ``torch.tensor``."""
    rot = torch.deg2rad(angle.double())
    s = scale.double()
    a, b, c, d = torch.cos(rot), -torch.sin(rot), torch.sin(rot), torch.cos(rot)
    m0, m1, m3, m4 = d / s, -b / s, -c / s, a / s
    txd, tyd = tx.double(), ty.double()
    m2 = 0.0 - m0 * txd - m1 * tyd
    m5 = 0.0 - m3 * txd - m4 * tyd
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).to(torch.float32).view(-1, 2, 3)


def _region_affine_theta(angle: Tensor, tx: Tensor, ty: Tensor, zoom: Tensor) -> Tensor:
    """``(B, 2, 3)`` float32 inverse matrices in Keras' form (ImageDataGenerator's ``rotation @ shift @ zoom`` about
    the image centre): input = R (Z o + t), with R torchvision's inverse rotation and Z = diag(zx, zy) scaling the
    sampled region. With zx = zy = z this is torchvision's matrix for scale 1/z and translate -t/z."""
    rot = torch.deg2rad(angle.double())
    zoom = zoom.double()
    zx, zy = (zoom[:, 0], zoom[:, 1]) if zoom.ndim == 2 else (zoom, zoom)
    cos, sin = torch.cos(rot), torch.sin(rot)
    txd, tyd = tx.double(), ty.double()
    rows = [cos * zx, sin * zy, cos * txd + sin * tyd, -sin * zx, cos * zy, -sin * txd + cos * tyd]
    return torch.stack(rows, dim=1).to(torch.float32).view(-1, 2, 3)


PADDING_MODES = {"constant": "zeros", "nearest": "border", "reflect": "reflection"}


def affine_warp(images: Tensor, angle: Tensor, tx: Tensor, ty: Tensor, scale: Tensor, fill: float = 0.0,
                interpolation: str = "nearest", fill_mode: str = "constant", zoom_mode: str = "image") -> Tensor:
    """Batched per-image ``F.affine(img, angle, [tx, ty], scale, [0, 0], interpolation, fill)`` on uint8
    ``(B, C, H, W)`` images: torchvision's sampling grid per image, one ``grid_sample``, its fill-mask blend and
    rounding.  Returns uint8.

    ``zoom_mode`` "region"/"region-xy": ``scale`` (``(B,)`` or ``(B, 2)``) scales the sampled region, Keras' way
    (`_region_affine_theta`). ``fill_mode``: "constant" fills uncovered pixels with ``fill``; "nearest" repeats the
    edge pixel and "reflect" mirrors about the image edge (d c b a | a b c d), Keras' and scipy.ndimage's modes
    (``grid_sample`` padding "border" and "reflection")."""
    if interpolation not in AFFINE_INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {AFFINE_INTERPOLATIONS}, got {interpolation!r}")
    if fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")
    if zoom_mode not in ZOOM_MODES:
        raise ValueError(f"zoom_mode must be one of {ZOOM_MODES}, got {zoom_mode!r}")
    B, C, H, W = images.shape
    dev = images.device
    theta = (_inverse_affine_theta(angle, tx, ty, scale) if zoom_mode == "image"
             else _region_affine_theta(angle, tx, ty, scale)).to(dev)
    base = torch.empty(1, H, W, 3, dtype=torch.float32, device=dev)
    base[..., 0].copy_(torch.linspace((1.0 - W) * 0.5, (W - 1.0) * 0.5, steps=W, device=dev))
    base[..., 1].copy_(torch.linspace((1.0 - H) * 0.5, (H - 1.0) * 0.5, steps=H, device=dev).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * W, 0.5 * H], dtype=torch.float32, device=dev))
    grid = base.view(1, H * W, 3).expand(B, -1, -1).bmm(rescaled).view(B, H, W, 2)
    if fill_mode != "constant":
        x = torch.nn.functional.grid_sample(images.to(torch.float32), grid, mode=interpolation,
                                            padding_mode=PADDING_MODES[fill_mode], align_corners=False)
        return x.round_().to(images.dtype)
    x = torch.cat([images.to(torch.float32), torch.ones((B, 1, H, W), dtype=torch.float32, device=dev)], dim=1)
    x = torch.nn.functional.grid_sample(x, grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    x, mask = x[:, :C], x[:, C:].expand(B, C, H, W)
    fill_t = torch.tensor(float(fill), dtype=torch.float32, device=dev)
    if interpolation == "nearest":
        x = torch.where(mask < 0.5, fill_t, x)
    else:
        x = x.sub_(fill_t).mul_(mask).add_(fill_t)
    return x.round_().to(images.dtype)


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------

class BatchAugment:
    """Per-image-random augmentation of a uint8 batch with batched tensor ops.

    ``__call__(images, generator)``: uint8 ``(B, 3, H, W)`` on any device -> float32 normalized
    ``(B, 3, image_size, image_size)`` on the same device.  See the module docstring for the
    pipeline and the tolerances against torchvision.

    After each call, ``last_params`` holds the sampled parameters (tensors on the device, stages
    that were skipped are absent): ``crop`` (top, left, side), ``flip`` (bool mask),
    ``ra_ops``/``ra_negative`` ``(B, ra_n)``, ``jitter`` (factors, order), ``erase``
    (top, left, h, w, apply).  ``last_ops`` is ``last_params["ra_ops"]`` (or None).
    """

    def __init__(
        self,
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
    ) -> None:
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        if ra_n < 0 or int(ra_n) != ra_n:
            raise ValueError(f"ra_n must be a non-negative integer, got {ra_n}")
        if not 0 <= ra_m <= 30 or int(ra_m) != ra_m:
            raise ValueError(f"ra_m must be an integer magnitude bin in [0, 30], got {ra_m}")
        if jitter < 0:
            raise ValueError(f"jitter must be non-negative, got {jitter}")
        if not 0.0 <= reprob <= 1.0:
            raise ValueError(f"reprob must be in [0, 1], got {reprob}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std must have 3 values, got {mean!r}, {std!r}")
        if any(s == 0 for s in std):
            raise ValueError(f"std must be non-zero, got {std!r}")
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.scale = float(scale)
        self.crop_ratio = float(crop_ratio)  # aspect ratios of the crop: [1/crop_ratio, crop_ratio]
        self.hflip = bool(hflip)
        self.ra_n = int(ra_n)
        self.ra_m = int(ra_m)
        self.num_magnitude_bins = 31
        self.jitter = float(jitter)
        self.reprob = float(reprob)
        self.no_aug = bool(no_aug)
        if translate < 0 or int(translate) != translate:
            raise ValueError(f"translate must be a non-negative integer, got {translate}")
        self.translate = int(translate)
        if not 0.0 <= rotate <= 180.0:
            raise ValueError(f"rotate must be in [0, 180] degrees, got {rotate}")
        if not 0.0 <= zoom < 1.0:
            raise ValueError(f"zoom must be in [0, 1), got {zoom}")
        if not 0.0 <= shift <= 1.0:
            raise ValueError(f"shift must be in [0, 1], got {shift}")
        if not 0.0 <= affine_fill <= 255.0:
            raise ValueError(f"affine_fill must be a gray level in [0, 255], got {affine_fill}")
        if affine_interpolation not in AFFINE_INTERPOLATIONS:
            raise ValueError(f"affine_interpolation must be one of {AFFINE_INTERPOLATIONS}, got {affine_interpolation!r}")
        if affine_fill_mode not in FILL_MODES:
            raise ValueError(f"affine_fill_mode must be one of {FILL_MODES}, got {affine_fill_mode!r}")
        if zoom_mode not in ZOOM_MODES:
            raise ValueError(f"zoom_mode must be one of {ZOOM_MODES}, got {zoom_mode!r}")
        if erase_mode not in ERASE_MODES:
            raise ValueError(f"erase_mode must be one of {ERASE_MODES}, got {erase_mode!r}")
        if not 0.02 < erase_max_area < 1.0:
            raise ValueError(f"erase_max_area must be in (0.02, 1), got {erase_max_area}")
        self.vflip = bool(vflip)
        self.rotate = float(rotate)
        self.zoom = float(zoom)
        self.shift = float(shift)
        self.affine_fill = float(affine_fill)
        self.affine_interpolation = affine_interpolation
        self.affine_fill_mode = affine_fill_mode
        self.zoom_mode = zoom_mode
        self.fractional_shift = bool(fractional_shift)
        self.erase_mode = erase_mode
        self.erase_max_area = float(erase_max_area)
        self.erase_after_mix = bool(erase_after_mix)
        self.last_params: dict = {}

    def __repr__(self) -> str:
        return (
            f"BatchAugment(image_size={self.image_size}, scale={self.scale}, hflip={self.hflip}, "
            f"ra_n={self.ra_n}, ra_m={self.ra_m}, jitter={self.jitter}, reprob={self.reprob}, "
            f"no_aug={self.no_aug}, vflip={self.vflip}, rotate={self.rotate}, zoom={self.zoom}, shift={self.shift}, "
            f"erase_mode={self.erase_mode!r}, erase_max_area={self.erase_max_area})"
        )

    @property
    def last_ops(self) -> Optional[Tensor]:
        return self.last_params.get("ra_ops")

    @torch.no_grad()
    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"BatchAugment expects uint8 images of shape (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        S = self.image_size
        B, _, H, W = images.shape
        dev = images.device
        params: dict = {}
        self.last_params = params
        if B == 0:
            return torch.empty((0, 3, S, S), dtype=torch.float32, device=dev)

        if self.no_aug:
            if (H, W) != (S, S):
                images = TF.resize(images, [S, S], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            return normalize(images, self.mean, self.std)

        _check_generator(images, generator)
        x = images
        # RandomResizedCrop
        if self.crop_ratio != 1.0:
            top, left, h, w = sample_aspect_crop_boxes(B, H, W, self.scale, self.crop_ratio, generator, dev)
            params["crop"] = (top, left, h, w)
            x = resized_crop(x, top, left, h, w, S)
        elif self.scale < 1.0 or (H, W) != (S, S):
            top, left, side = sample_crop_boxes(B, H, W, self.scale, generator, dev)
            params["crop"] = (top, left, side)
            x = resized_crop(x, top, left, side, side, S)
        # RandomCrop with zero padding (translation)
        if self.translate > 0:
            x, dy, dx = random_translate(x, self.translate, generator)
            params["translate"] = (dy, dx)
        # RandomHorizontalFlip
        if self.hflip:
            flip = _rand((B,), generator, dev) < 0.5
            params["flip"] = flip
            x = _select(x, x.flip(-1), flip)
        # RandomVerticalFlip
        if self.vflip:
            vflip = _rand((B,), generator, dev) < 0.5
            params["vflip"] = vflip
            x = _select(x, x.flip(-2), vflip)
        # RandomAffine (rotate / shift / zoom)
        if self.rotate > 0 or self.shift > 0 or self.zoom > 0:
            affine = sample_affine_params(B, S, S, self.rotate, self.shift, self.zoom, generator, dev,
                                          fractional_shift=self.fractional_shift,
                                          zoom_xy=self.zoom_mode == "region-xy")
            params["affine"] = affine
            x = affine_warp(x, *affine, fill=self.affine_fill, interpolation=self.affine_interpolation,
                            fill_mode=self.affine_fill_mode, zoom_mode=self.zoom_mode)
        # RandAugment
        if self.ra_n > 0:
            all_ops, all_neg = [], []
            for _ in range(self.ra_n):
                ops, neg = sample_ra_ops(B, generator, dev)
                x = randaugment_apply(x, ops, neg, self.ra_m, self.num_magnitude_bins)
                all_ops.append(ops)
                all_neg.append(neg)
            params["ra_ops"] = torch.stack(all_ops, dim=1)
            params["ra_negative"] = torch.stack(all_neg, dim=1)
        xf = x.to(torch.float32)
        # ColorJitter
        if self.jitter > 0:
            factors, order = sample_jitter_params(B, self.jitter, generator, dev)
            params["jitter"] = (factors, order)
            xf = color_jitter(xf, factors, order)
        out = _normalize_float255(xf, self.mean, self.std)
        # RandomErasing (after Normalize), unless the caller erases after mixing
        if self.reprob > 0 and not self.erase_after_mix:
            out = self._erase(out, generator, params)
        return out

    def _erase(self, x: Tensor, generator: torch.Generator, params: dict) -> Tensor:
        B, _, H, W = x.shape
        box = sample_erase_boxes(B, H, W, self.reprob, generator, x.device, scale=(0.02, self.erase_max_area))
        params["erase"] = box
        if self.erase_mode == "pixel":
            return erase_pixels(x, *box, generator=generator)
        return erase(x, *box)

    @torch.no_grad()
    def erase_stage(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """The RandomErasing stage alone, on a normalized float batch (e.g. after Mixup/CutMix when
        ``erase_after_mix``); records ``last_params["erase"]``.  A no-op when ``reprob`` is 0."""
        if self.reprob <= 0 or x.shape[0] == 0:
            return x
        _check_generator(x, generator)
        return self._erase(x, generator, self.last_params)
