"""Decoding image files into uint8 tensors (shared by the folder datasets and `isoconv predict`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class BadImageError(UserError):
    """An image file that cannot be decoded (unreadable, truncated, not an image)."""


def is_image_file(path: Union[str, Path]) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def decode_image(path: Union[str, Path], image_size: Optional[int] = None) -> torch.Tensor:
    """The image at `path` as uint8 RGB (3, H, W); resized to image_size x image_size when given.

    Grayscale, palette and alpha images become RGB. Truncated files are errors (PIL would otherwise
    pad them silently), raised as BadImageError naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        reason = str(e) or type(e).__name__
        raise BadImageError(f"cannot read image {path}: {reason}; fix or remove the file "
                            f"(or pass --skip-bad-images)") from None
    if image_size is not None and rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
