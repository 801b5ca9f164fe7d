"""Weight initialisation schemes a model can start from (`--init`).

* ``trunc-normal``: convolution and linear weights ~ trunc-normal(std 0.02), biases 0 (ConvNeXt's paper init).
* ``torch``: PyTorch's default, the layers' own ``reset_parameters`` (Kaiming-uniform with a = sqrt(5), biases
  uniform in +-1/sqrt(fan_in)); what the PyTorch seeds (ConvMixer-XL, simple-convnext) trained from.
* ``glorot``: Glorot/Xavier-uniform weights (U[-a, a], a = sqrt(6 / (fan_in + fan_out))) and zero biases, Keras'
  default for Conv2D and Dense. The fans are the same in both libraries, grouped convolutions included: Keras'
  kernel (k, k, in/groups, out) and PyTorch's (out, in/groups, k, k) both give fan_in = k*k*in/groups and
  fan_out = k*k*out.

Norm layers keep weight 1 and bias 0 under every scheme (the same in PyTorch and Keras).
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError

__all__ = ["INIT_SCHEMES", "init_weights", "check_init"]

INIT_SCHEMES = ("trunc-normal", "torch", "glorot")


def check_init(scheme: str) -> str:
    if scheme not in INIT_SCHEMES:
        raise ConfigError(f"init must be one of {', '.join(INIT_SCHEMES)}, got {scheme!r}")
    return scheme


def init_weights(module: nn.Module, scheme: str) -> None:
    """Re-initialise every convolution and linear layer in `module` (itself included) by `scheme`."""
    check_init(scheme)
    for m in module.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if scheme == "torch":
            m.reset_parameters()
            continue
        if scheme == "glorot":
            nn.init.xavier_uniform_(m.weight)
        else:
            nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
