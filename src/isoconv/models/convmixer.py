"""ConvMixer ("Patches Are All You Need?", Trockman & Kolter) and its deep ConvMixer-XL variant.

Layout and parameter names follow timm's ``ConvMixer`` exactly, so a timm state dict loads
with ``strict=True`` (for ``skip_period=0`` the outputs are then identical):

    stem    = Sequential(Conv2d(in_chans, dim, p, stride=p), act, BatchNorm2d(dim))
    blocks  = Sequential of `depth` blocks, each
              Sequential(Residual(Sequential(dwconv k x k "same", act, BN)), Conv2d 1x1, act, BN)
    pooling = Sequential(AdaptiveAvgPool2d(1), Flatten())
    head    = Linear(dim, num_classes)

The activation comes *before* BatchNorm everywhere, as in the paper.

ConvMixer-XL adds an identity skip around every group of ``depth // skip_period`` consecutive
blocks (``x = x + group(x)``). It is done in ``forward_features`` only, so the parameter names
are the same with and without it.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import ConfigError
from .act_norm import fused_act_batch_norm
from .depthwise import DepthwiseConv2d
from .init import check_init, init_weights

__all__ = ["ConvMixer", "Residual", "ConvActNorm", "MixerBlock", "ACTIVATIONS", "make_activation"]

# Canonical activation names; each value builds a *new* module per call.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}
_ACTIVATION_ALIASES = {"swish": "silu", "leakyrelu": "leaky_relu"}


def canonical_activation(name: str) -> str:
    """Normalise an activation name ("GELU", "leaky-relu", "swish") to a key of ``ACTIVATIONS``."""
    if not isinstance(name, str):
        raise ConfigError(f"activation must be a string, got {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    key = name.strip().lower().replace("-", "_")
    key = _ACTIVATION_ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        raise ConfigError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)} (or 'swish' for silu)"
        )
    return key


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` (never a shared instance)."""
    return ACTIVATIONS[canonical_activation(name)]()


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise ConfigError naming it if it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return int(value)


def check_image_size(image_size: Any, stride: int, what: str, hint: str = "use a smaller patch_size") -> Optional[int]:
    """Validate an optional square ``image_size`` against the network's total input stride."""
    if image_size is None:
        return None
    image_size = check_positive_int("image_size", image_size)
    if stride > image_size:
        raise ConfigError(f"{what} {stride} is larger than image_size {image_size}; {hint}")
    return image_size


class Residual(nn.Module):
    """``x + fn(x)``; the attribute is called ``fn`` to match timm's parameter names."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


class ConvActNorm(nn.Sequential):
    """``Sequential(conv, act, BatchNorm2d)`` whose act -> BN pair runs fused when training on a CPU
    (`fused_act_batch_norm`); the same modules and parameter names as the plain Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, act, norm = self
        return fused_act_batch_norm(conv(x), act, norm)


class MixerBlock(nn.Sequential):
    """``Sequential(Residual(ConvActNorm(depthwise conv, act, BN)), 1x1 conv, act, BN)``, one ConvMixer block, with
    the second act -> BN pair fused like `ConvActNorm`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix_space, mix_channels, act, norm = self
        return fused_act_batch_norm(mix_channels(mix_space(x)), act, norm)


class ConvMixer(nn.Module):
    """Isotropic ConvMixer-``dim``/``depth`` with optional ConvMixer-XL group skips.

    Args:
        dim: channel width (constant through the network).
        depth: number of ConvMixer blocks.
        kernel_size: depthwise kernel size (even sizes are fine: padding is "same").
        patch_size: stem kernel size and stride.
        num_classes: classifier outputs.
        in_chans: input channels.
        activation: "gelu", "relu", "silu" (alias "swish") or "leaky_relu"; case-insensitive.
        skip_period: 0 for the plain ConvMixer; g > 0 splits the blocks into g equal consecutive
            groups and adds an identity skip around each (ConvMixer-XL uses 66 blocks, g=3).
        image_size: optional input side length, only used to reject a patch larger than the image.
        drop_rate: dropout on the pooled features before the classifier.
        init: weight init (`isoconv.models.init`): "torch" (PyTorch's default, as timm), "glorot" (Keras) or
            "trunc-normal".
        bn_eps, bn_momentum: every BatchNorm's epsilon and running-statistics momentum in PyTorch's convention
            (defaults 1e-5 and 0.1; Keras' BatchNormalization is eps 1e-3 and momentum 0.99, i.e. 0.01 here).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        kernel_size: int = 9,
        patch_size: int = 7,
        num_classes: int = 1000,
        in_chans: int = 3,
        activation: str = "gelu",
        skip_period: int = 0,
        image_size: Optional[int] = None,
        drop_rate: float = 0.0,
        init: str = "torch",
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        init = check_init(init)
        if not (isinstance(bn_eps, numbers.Real) and 0 < bn_eps <= 1):
            raise ConfigError(f"bn_eps must be in (0, 1], got {bn_eps!r}")
        if not (isinstance(bn_momentum, numbers.Real) and 0 < bn_momentum <= 1):
            raise ConfigError(f"bn_momentum must be in (0, 1], got {bn_momentum!r}")
        dim = check_positive_int("dim", dim)
        depth = check_positive_int("depth", depth)
        kernel_size = check_positive_int("kernel_size", kernel_size)
        patch_size = check_positive_int("patch_size", patch_size)
        num_classes = check_positive_int("num_classes", num_classes)
        in_chans = check_positive_int("in_chans", in_chans)
        activation = canonical_activation(activation)
        if isinstance(skip_period, bool) or not isinstance(skip_period, numbers.Integral):
            raise ConfigError(f"skip_period must be an integer, got {skip_period!r}")
        skip_period = int(skip_period)
        if skip_period < 0:
            raise ConfigError(f"skip_period must be 0 (no group skips) or positive, got {skip_period}")
        if skip_period > 0 and depth % skip_period != 0:
            raise ConfigError(
                f"depth {depth} is not divisible by skip_period {skip_period}; "
                f"the blocks must split into {skip_period} equal groups"
            )
        image_size = check_image_size(image_size, patch_size, "patch_size")

        self.config: dict[str, Any] = dict(
            dim=dim,
            depth=depth,
            kernel_size=kernel_size,
            patch_size=patch_size,
            num_classes=num_classes,
            in_chans=in_chans,
            activation=activation,
            skip_period=skip_period,
            image_size=image_size,
        )
        # the init and BatchNorm settings only where they are not the defaults (timm's and PyTorch's)
        self.config.update({k: v for k, v, default in (("init", init, "torch"), ("bn_eps", float(bn_eps), 1e-5),
                                                       ("bn_momentum", float(bn_momentum), 0.1)) if v != default})
        self.num_classes = num_classes
        self.num_features = dim
        self.skip_period = skip_period
        self.group_size = depth // skip_period if skip_period else depth

        def act() -> nn.Module:
            return make_activation(activation)

        def norm() -> nn.Module:
            return nn.BatchNorm2d(dim, eps=float(bn_eps), momentum=float(bn_momentum))

        self.stem = ConvActNorm(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size),
            act(),
            norm(),
        )
        self.blocks = nn.Sequential(
            *[
                MixerBlock(
                    Residual(
                        ConvActNorm(
                            DepthwiseConv2d(dim, kernel_size, padding="same"),
                            act(),
                            norm(),
                        )
                    ),
                    nn.Conv2d(dim, dim, kernel_size=1),
                    act(),
                    norm(),
                )
                for _ in range(depth)
            ]
        )
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())
        self.head_drop = nn.Dropout(drop_rate)  # timm's drop_rate: dropout on the pooled features
        self.head: nn.Module = nn.Linear(dim, num_classes)
        if init != "torch":  # the layers were built with PyTorch's default init
            init_weights(self, init)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head; ``num_classes=0`` gives an identity head (pooled features out)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 0:
            raise ConfigError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        device = self.stem[0].weight.device
        self.num_classes = int(num_classes)
        self.config["num_classes"] = self.num_classes
        self.head = nn.Linear(self.num_features, self.num_classes, device=device) if num_classes > 0 else nn.Identity()
        if num_classes > 0 and self.config.get("init", "torch") != "torch":
            init_weights(self.head, self.config["init"])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and blocks; returns the (B, dim, H/p, W/p) feature map."""
        x = self.stem(x)
        if self.skip_period == 0:
            return self.blocks(x)
        shortcut = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if (i + 1) % self.group_size == 0:  # end of a group: identity skip around it
                x = shortcut + x
                shortcut = x
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pooling(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
