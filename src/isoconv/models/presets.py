"""The shipped model presets as data, and parameter counts in closed form: what `isoconv models` prints, without
importing torch. `registry.py` registers a constructor for each preset; tests/test_models.py checks every closed
form against the built models (presets and overrides)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # a key of registry.FAMILIES and of PARAM_COUNTS
    description: str
    defaults: Mapping[str, Any]  # constructor keyword arguments of the family's class


def _cm(dim: int, depth: int, kernel_size: int, patch_size: int, activation: str = "gelu", skip_period: int = 0) -> dict[str, Any]:
    return dict(
        dim=dim,
        depth=depth,
        kernel_size=kernel_size,
        patch_size=patch_size,
        activation=activation,
        skip_period=skip_period,
        num_classes=10,
    )


# Registration order: ConvMixers first, then ConvNeXts (num_classes=10 unless said).
PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("cm-vanilla", "convmixer", "ConvMixer-256/8, kernel 5, patch 2, GELU: the reference CIFAR-10 ConvMixer.",
           _cm(256, 8, 5, 2, "gelu")),
    Preset("cm-vanilla-relu", "convmixer", "cm-vanilla with ReLU instead of GELU.", _cm(256, 8, 5, 2, "relu")),
    Preset("cm-vanilla-silu", "convmixer", "cm-vanilla with SiLU instead of GELU.", _cm(256, 8, 5, 2, "silu")),
    Preset("cm-xl-noskip", "convmixer", "ConvMixer-256/66, kernel 5, patch 2, GELU, no group skips (the deep "
           "baseline).", _cm(256, 66, 5, 2, "gelu", skip_period=0)),
    Preset("cm-xl-skip", "convmixer", "ConvMixer-256/66, kernel 5, patch 2, GELU, identity skip around each of 3 "
           "groups of 22 blocks.", _cm(256, 66, 5, 2, "gelu", skip_period=3)),
    Preset("cm-xl", "convmixer", "ConvMixer-XL: 256/66, kernel 5, patch 2, SiLU, skip around each of 3 groups of 22 "
           "blocks.", _cm(256, 66, 5, 2, "silu", skip_period=3)),
    Preset("convmixer-256-8-k9-p1", "convmixer", "ConvMixer-256/8, kernel 9, patch 1, GELU (full-resolution "
           "variant).", _cm(256, 8, 9, 1, "gelu")),
    Preset("cm-cpu", "convmixer", "Small, fast ConvMixer for the default CPU recipe: 128/8, kernel 5, patch 4, ReLU "
           "(faster than GELU on CPU).", _cm(128, 8, 5, 4, "relu")),
    Preset("convnext-cifar", "convnext", "ConvNeXt for 32x32 images: patch 1, depths 2-2-2-2, dims 64-128-256-512.",
           dict(patch_size=1, depths=[2, 2, 2, 2], dims=[64, 128, 256, 512], num_classes=10)),
    # simple-convnext's README gives "22M" parameters for this config; [3,3,9,3] x [96,192,384,768] with patch 2
    # and 200 classes has 27,970,472, which the seed's own model.py also builds.
    Preset("convnext-tin", "convnext", "ConvNeXt-T-sized net for Tiny-ImageNet (64x64, 200 classes): patch 2, drop "
           "path 0.1; the seed says 22M params, its stated config has the count shown",
           dict(patch_size=2, depths=[3, 3, 9, 3], dims=[96, 192, 384, 768], num_classes=200, drop_path_rate=0.1)),
]}


def convmixer_params(dim: int, depth: int, kernel_size: int = 9, patch_size: int = 7, num_classes: int = 1000,
                     in_chans: int = 3, **_: Any) -> int:
    """ConvMixer's parameters: stem conv + bias + BN, per block depthwise conv + bias + BN and 1x1 conv + bias + BN,
    linear head (the defaults are ConvMixer's)."""
    stem = in_chans * patch_size ** 2 * dim + dim + 2 * dim
    block = (dim * kernel_size ** 2 + dim + 2 * dim) + (dim * dim + dim + 2 * dim)
    return stem + depth * block + dim * num_classes + num_classes


def convnext_params(patch_size: int = 1, depths: Sequence[int] = (2, 2, 2, 2), dims: Sequence[int] = (64, 128, 256, 512),
                    num_classes: int = 10, in_chans: int = 3, layer_scale_init: float = 1e-6, kernel_size: int = 7,
                    depth: Optional[int] = None, **_: Any) -> int:
    """ConvNeXt's parameters: stem conv + bias + LayerNorm; per stage after the first a LayerNorm and a 2x2 conv
    + bias; per block depthwise conv + bias, LayerNorm, two linears (d -> 4d -> d) + biases and the layer scale;
    head LayerNorm and linear (the defaults are ConvNeXt's)."""
    depths = [depth] * len(depths) if depth is not None else list(depths)
    total = in_chans * patch_size ** 2 * dims[0] + dims[0] + 2 * dims[0]
    for i, (n, d) in enumerate(zip(depths, dims)):
        if i > 0:
            total += 2 * dims[i - 1] + dims[i - 1] * d * 4 + d
        block = d * kernel_size ** 2 + d + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
        total += n * (block + (d if layer_scale_init > 0 else 0))
    return total + 2 * dims[-1] + dims[-1] * num_classes + num_classes


PARAM_COUNTS: dict[str, Callable[..., int]] = {"convmixer": convmixer_params, "convnext": convnext_params}


def preset_params(name: str, **overrides: Any) -> int:
    """Parameter count of preset `name` with constructor overrides (None: the preset's value), without building it."""
    preset = PRESETS[name]
    kwargs = {**preset.defaults, **{k: v for k, v in overrides.items() if v is not None}}
    return PARAM_COUNTS[preset.family](**kwargs)
