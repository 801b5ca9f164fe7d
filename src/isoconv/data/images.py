"""Decoding image files into uint8 tensors (shared by the folder datasets and `isoconv predict`)."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
import torch

from ..errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# modes whose pixels are 16-bit integers: 16-bit PNG, TIFF and PGM files ("I": how older Pillows and PGM open them)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class BadImageError(UserError):
    """An image file that cannot be decoded (unreadable, truncated, not an image)."""


def is_image_file(path: Union[str, Path]) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def decode_image(path: Union[str, Path, BinaryIO], image_size: Optional[int] = None) -> torch.Tensor:
    """The image at `path` (or in a binary file object, e.g. an upload in a BytesIO) as uint8 RGB (3, H, W);
    resized to image_size x image_size when given.

    Any image Pillow opens becomes 8-bit RGB (`to_rgb`). Truncated files are errors (PIL would otherwise
    pad them silently), raised as BadImageError naming the file.
    """
    return torch.from_numpy(decode_image_array(path, image_size)).permute(2, 0, 1).contiguous()


def decode_image_array(path: Union[str, Path, BinaryIO], image_size: Optional[int] = None) -> np.ndarray:
    """Like `decode_image` but as a uint8 (H, W, 3) numpy array; uses no torch ops, so pool workers can run it."""
    from PIL import Image, UnidentifiedImageError

    path = path if hasattr(path, "read") else Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            rgb = to_rgb(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = (None if hasattr(path, "read") else broken_link(path)) or str(e) or type(e).__name__
        raise BadImageError(f"cannot read image {path}: {reason}; fix or remove the file "
                            f"(or pass --skip-bad-images)") from None
    if image_size is not None and rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.BICUBIC)
    return np.array(rgb, dtype=np.uint8)


def broken_link(path: Path) -> Optional[str]:
    """Why `path` is a symbolic link that leads to no file (dangling, or in a loop), else None."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
        return None
    except OSError as e:
        target = os.readlink(path)
        if e.errno == errno.ELOOP:
            return f"it is a symbolic link in a loop (to {target})"
        return f"it is a symbolic link to {target}, which does not exist"


def to_rgb(image):
    """A PIL image of any mode as 8-bit RGB: 16-bit grayscale (I;16, I;16B, ..., and I, read as 16-bit; values
    outside 0-65535 are clipped) scaled by 255/65535, float (F) read as 0-1 (or as 0-255 when its largest value is
    above 1; NaN is 0), LAB through an sRGB colour transform, and the rest by Pillow's own conversion (grayscale,
    palette, CMYK, YCbCr; alpha is dropped, as torchvision's RGB reading does). Pillow's convert("RGB") clips
    16-bit and float pixels to 255 instead (a 16-bit image came out all white)."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        if image.mode == "F":
            scale = 255.0 if values.size == 0 or values.max() <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0
        gray = np.clip(np.rint(np.clip(values, 0, None) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    if image.mode == "LAB":
        from PIL import ImageCms  # needs Pillow's LittleCMS, which only LAB files do

        to_srgb = ImageCms.buildTransformFromOpenProfiles(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                                          "LAB", "RGB")
        return ImageCms.applyTransform(image, to_srgb)
    return image.convert("RGB")


def resize_images(images: torch.Tensor, image_size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N, 3, H, W) resized to (N, 3, image_size, image_size): bicubic with antialiasing, rounded and clamped.

    Done in chunks so upsampling a whole dataset needs little float memory.
    """
    n, c, h, w = images.shape
    if (h, w) == (image_size, image_size):
        return images
    out = torch.empty((n, c, image_size, image_size), dtype=torch.uint8, device=images.device)
    for s in range(0, n, chunk):
        x = images[s:s + chunk].float()
        y = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True,
                                            align_corners=False)
        out[s:s + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out
