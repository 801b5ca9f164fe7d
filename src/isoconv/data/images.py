"""Decoding image files into uint8 tensors (shared by the folder datasets and `isoconv predict`)."""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
import torch

from ..errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class BadImageError(UserError):
    """An image file that cannot be decoded (unreadable, truncated, not an image)."""


def is_image_file(path: Union[str, Path]) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def decode_image(path: Union[str, Path, BinaryIO], image_size: Optional[int] = None) -> torch.Tensor:
    """The image at `path` (or in a binary file object, e.g. an upload in a BytesIO) as uint8 RGB (3, H, W);
    resized to image_size x image_size when given.

    Grayscale, palette and alpha images become RGB. Truncated files are errors (PIL would otherwise
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
            rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e) or type(e).__name__
        raise BadImageError(f"cannot read image {path}: {reason}; fix or remove the file "
                            f"(or pass --skip-bad-images)") from None
    if image_size is not None and rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.BICUBIC)
    return np.array(rgb, dtype=np.uint8)


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
