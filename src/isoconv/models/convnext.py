"""A small ConvNeXt (Liu et al., "A ConvNet for the 2020s") for small images.

This is the hierarchical baseline of the "simple-convnext" seed:

    stem     = Sequential(Conv2d(in_chans, dims[0], p, stride=p), LayerNorm2d(dims[0]))
    stages   = ModuleList of ConvNeXtStage; stage i > 0 first downsamples with
               Sequential(LayerNorm2d(dims[i-1]), Conv2d(dims[i-1], dims[i], 2, stride=2))
    block    = dwconv k x k -> LayerNorm -> Linear(d, 4d) -> GELU -> Linear(4d, d)
               -> layer scale gamma -> drop path -> + residual
    head     = mean over H, W -> LayerNorm(dims[-1]) (``head_norm``) -> Linear (``head``)

All LayerNorms use eps 1e-6. Conv and linear weights are trunc-normal(std 0.02), biases zero, unless ``init`` says
PyTorch's default ("torch", what the simple-convnext seed trained from) or Glorot-uniform ("glorot").
"""
from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .convmixer import canonical_activation, check_image_size, check_positive_int, make_activation
from .depthwise import DepthwiseConv2d
from .init import check_init, init_weights

__all__ = ["ConvNeXt", "ConvNeXtBlock", "ConvNeXtStage", "LayerNorm2d", "StochasticDepth"]

LN_EPS = 1e-6


class StochasticDepth(nn.Module):
    """``torchvision.ops.StochasticDepth`` without importing torchvision (same attributes, same random draws, same
    result; tests/test_models.py compares them): while training, the residual branch of each image ("row") or of
    the whole batch ("batch") is zeroed with probability ``p`` and the kept ones are scaled by ``1 / (1 - p)``."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        size = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
        noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(keep)
        if keep > 0.0:
            noise.div_(keep)
        return x * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """One ConvNeXt block; the MLP runs channels-last (NHWC) so LayerNorm/Linear act on channels."""

    def __init__(self, dim: int, kernel_size: int = 7, drop_path: float = 0.0, layer_scale_init: float = 1e-6,
                 activation: str = "gelu", drop_path_mode: str = "row") -> None:
        super().__init__()
        self.conv_dw = DepthwiseConv2d(dim, kernel_size, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma: Optional[nn.Parameter]
        if layer_scale_init > 0:
            self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.gamma = None
        # stochastic depth: per image ("row") or, as the simple-convnext seed did, for the whole batch ("batch")
        self.drop_path = StochasticDepth(drop_path, drop_path_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        x = x.permute(0, 2, 3, 1)  # NCHW -> NHWC
        x = self.fc2(self.act(self.fc1(self.norm(x))))
        if self.gamma is not None:
            x = x * self.gamma
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
        return shortcut + self.drop_path(x)


class ConvNeXtStage(nn.Module):
    """``downsample`` (Identity for the first stage) followed by ``blocks``."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        depth: int,
        downsample: bool,
        kernel_size: int,
        drop_path_rates: Sequence[float],
        layer_scale_init: float,
        activation: str = "gelu",
        drop_path_mode: str = "row",
    ) -> None:
        super().__init__()
        self.downsample: nn.Module
        if downsample:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_dim, eps=LN_EPS),
                nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2),
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *[ConvNeXtBlock(out_dim, kernel_size, drop_path_rates[j], layer_scale_init, activation, drop_path_mode)
              for j in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    """Hierarchical ConvNeXt with a patchify stem of size ``patch_size`` and 2x downsampling between stages.

    Args:
        patch_size: stem kernel size and stride (1 for CIFAR, 2 for Tiny-ImageNet).
        depths: blocks per stage.
        dims: channels per stage (same length as ``depths``).
        num_classes: classifier outputs.
        in_chans: input channels.
        drop_path_rate: stochastic depth rate of the last block; rates rise linearly from 0.
        layer_scale_init: initial layer-scale value; <= 0 disables layer scale.
        kernel_size: depthwise kernel size (odd).
        image_size: optional input side length, used to reject a total stride larger than the image.
        activation: the MLP's activation (gelu as in the paper; relu, silu, leaky_relu for ablations).
        depth: if given, the number of blocks in every stage (overrides ``depths``; 2 = [2, 2, 2, 2]).
    """

    def __init__(
        self,
        patch_size: int = 1,
        depths: Sequence[int] = (2, 2, 2, 2),
        dims: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-6,
        kernel_size: int = 7,
        image_size: Optional[int] = None,
        activation: str = "gelu",
        depth: Optional[int] = None,
        drop_path_mode: str = "row",
        init: str = "trunc-normal",
    ) -> None:
        super().__init__()
        init = check_init(init)
        activation = canonical_activation(activation)
        if depth is not None and not isinstance(depths, (str, bytes)) and isinstance(depths, Sequence):
            depths = [check_positive_int("depth", depth)] * len(depths)
        patch_size = check_positive_int("patch_size", patch_size)
        num_classes = check_positive_int("num_classes", num_classes)
        in_chans = check_positive_int("in_chans", in_chans)
        kernel_size = check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd for ConvNeXt (padding k // 2 keeps the size), got {kernel_size}")
        if isinstance(depths, (str, bytes)) or not isinstance(depths, Sequence) or len(depths) == 0:
            raise ConfigError(f"depths must be a non-empty list of positive integers, got {depths!r}")
        if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or len(dims) == 0:
            raise ConfigError(f"dims must be a non-empty list of positive integers, got {dims!r}")
        depths = [check_positive_int(f"depths[{i}]", d) for i, d in enumerate(depths)]
        dims = [check_positive_int(f"dims[{i}]", d) for i, d in enumerate(dims)]
        if len(depths) != len(dims):
            raise ConfigError(
                f"depths {depths} and dims {dims} must have the same length (one entry per stage), "
                f"got {len(depths)} and {len(dims)}"
            )
        if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, numbers.Real) or not 0.0 <= drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        if drop_path_mode not in ("row", "batch"):
            raise ConfigError(f"drop_path_mode must be row or batch, got {drop_path_mode!r}")
        if isinstance(layer_scale_init, bool) or not isinstance(layer_scale_init, numbers.Real):
            raise ConfigError(f"layer_scale_init must be a number, got {layer_scale_init!r}")
        num_stages = len(depths)
        total_stride = patch_size * 2 ** (num_stages - 1)
        image_size = check_image_size(
            image_size,
            total_stride,
            f"total stride (patch_size {patch_size} x 2^{num_stages - 1})",
            hint="use a smaller patch_size or fewer stages",
        )

        self.config: dict[str, Any] = dict(
            patch_size=patch_size,
            depths=list(depths),
            dims=list(dims),
            num_classes=num_classes,
            in_chans=in_chans,
            drop_path_rate=float(drop_path_rate),
            layer_scale_init=float(layer_scale_init),
            kernel_size=kernel_size,
            image_size=image_size,
            activation=activation,
            drop_path_mode=drop_path_mode,
            **({} if init == "trunc-normal" else {"init": init}),  # recorded where it is not the default
        )
        self.num_classes = num_classes
        self.num_features = dims[-1]

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=patch_size, stride=patch_size),
            LayerNorm2d(dims[0], eps=LN_EPS),
        )
        rates = torch.linspace(0, float(drop_path_rate), sum(depths), device="cpu").tolist()
        stages = []
        start = 0
        for i in range(num_stages):
            stages.append(
                ConvNeXtStage(
                    in_dim=dims[i - 1] if i > 0 else dims[0],
                    out_dim=dims[i],
                    depth=depths[i],
                    downsample=i > 0,
                    kernel_size=kernel_size,
                    drop_path_rates=rates[start : start + depths[i]],
                    layer_scale_init=float(layer_scale_init),
                    activation=activation,
                    drop_path_mode=drop_path_mode,
                )
            )
            start += depths[i]
        self.stages = nn.Sequential(*stages)
        self.head_norm = nn.LayerNorm(dims[-1], eps=LN_EPS)
        self.head: nn.Module = nn.Linear(dims[-1], num_classes)
        if init == "trunc-normal":
            self.apply(self._init_weights)
        elif init == "glorot":
            init_weights(self, init)
        # "torch": the layers were built with PyTorch's default init (the simple-convnext seed's)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head; ``num_classes=0`` gives an identity head (normed pooled features out)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 0:
            raise ConfigError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        device = self.head_norm.weight.device
        self.num_classes = int(num_classes)
        self.config["num_classes"] = self.num_classes
        if num_classes > 0:
            head = nn.Linear(self.num_features, self.num_classes, device=device)
            init = self.config.get("init", "trunc-normal")
            if init == "trunc-normal":
                self._init_weights(head)
            elif init == "glorot":
                init_weights(head, "glorot")
            self.head = head
        else:
            self.head = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and stages; returns the last stage's (B, dims[-1], h, w) feature map."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_norm(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
