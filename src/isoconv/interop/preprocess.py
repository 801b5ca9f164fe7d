"""Preprocessing for inference (decode, resize, normalize exactly as training did) and finding image files."""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ..augment import normalize
from ..data.dataset import zero_pad
from ..data.images import decode_image, is_image_file, to_rgb
from ..errors import UserError

ImageLike = Union[str, Path, torch.Tensor, Any]  # Any: a PIL.Image.Image (PIL is imported lazily)


@dataclass(frozen=True)
class Preprocess:
    """Turns images into the model's input as training prepared them (weights.meta.Preprocessing): RGB, resized to
    image_size (bicubic, like the datasets' decoder), zero-padded centred to pad_to when set, scaled to [0, 1] and
    normalized with the training mean/std. `classes` names the model's outputs."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    pad_to: Optional[int] = None

    @property
    def input_size(self) -> int:
        """The side of the model's input (after padding)."""
        return self.pad_to or self.image_size

    def __call__(self, images: Union[ImageLike, Sequence[ImageLike]]) -> torch.Tensor:
        """A float32 (B, 3, S, S) batch from paths, PIL images, uint8 (3, H, W) tensors or a uint8 (B, 3, H, W)."""
        return normalize(self.to_uint8(images), self.mean, self.std)

    def to_uint8(self, images: Union[ImageLike, Sequence[ImageLike]]) -> torch.Tensor:
        """The uint8 (B, 3, S, S) batch before normalization."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise UserError("no images given to preprocess")
        return torch.stack([self.image_to_uint8(im) for im in images])

    def image_to_uint8(self, image: ImageLike) -> torch.Tensor:
        """One uint8 (3, S, S) model input (S = input_size) before normalization."""
        resized = self._resized(image)
        return zero_pad(resized, self.pad_to) if self.pad_to else resized

    def _resized(self, image: ImageLike) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            return decode_image(image, self.image_size)
        if isinstance(image, torch.Tensor):
            return self._tensor_to_uint8(image)
        if hasattr(image, "convert") and hasattr(image, "resize"):  # a PIL image
            return self._pil_to_uint8(image)
        raise UserError(f"cannot preprocess a {type(image).__name__}; pass file paths, PIL images or uint8 "
                        f"(3, H, W) tensors")

    def _tensor_to_uint8(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise UserError(f"image tensors must be uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}; "
                            f"decode files with isoconv.data.images.decode_image")
        if tuple(image.shape[1:]) == (self.image_size, self.image_size):
            return image.cpu()
        from PIL import Image  # resize through PIL so tensors and files give identical pixels

        return self._pil_to_uint8(Image.fromarray(image.permute(1, 2, 0).cpu().numpy()))

    def _pil_to_uint8(self, image) -> torch.Tensor:
        from PIL import Image

        rgb = to_rgb(image)
        if rgb.size != (self.image_size, self.image_size):
            rgb = rgb.resize((self.image_size, self.image_size), Image.BICUBIC)
        return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def collect_image_paths(inputs: Iterable[Union[str, Path]]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (searched recursively for image files) and glob patterns, in the order given.

    Returns (paths, problems): problems are (input, reason) for inputs that matched nothing. A file named
    explicitly is kept whatever its extension (decoding decides); a file found in a folder or by a glob is
    kept only with an image extension. Duplicates are dropped.
    """
    paths: list[Path] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for item in inputs:
        p = Path(item)
        if p.is_file():
            add(p)
        elif p.is_dir():
            found = images_in_folder(p)
            if not found:
                problems.append((str(item), "folder holds no image files"))
            for f in found:
                add(f)
        elif glob.has_magic(str(item)):
            found = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            files = [f for f in found if f.is_file() and is_image_file(f)]
            for d in (f for f in found if f.is_dir()):
                files.extend(images_in_folder(d))
            if not files:
                problems.append((str(item), "pattern matches no image files"))
            for f in files:
                add(f)
        else:
            problems.append((str(item), "no such file or folder"))
    return paths, problems


def images_in_folder(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
