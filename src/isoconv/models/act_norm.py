"""GELU followed by training-mode BatchNorm (ConvMixer's `act -> BN` pairs), fused for CPU training.

Eagerly, GELU -> BatchNorm2d makes about twelve passes over the activations per training step (GELU, the batch
statistics, the normalisation, BatchNorm's two-pass backward, GELU's backward) and evaluates erf twice; aten's
channels-last bf16 BatchNorm backward alone takes longer than GELU. Here the same computation is four passes
(see `ActBatchNormFunction`): the forward writes the activation and its slope (one exp for both) and sums the
statistics in the same pass (a C kernel, csrc/gelu_stats.c, for channels-last inputs; two inductor kernels
otherwise), then normalises; the backward needs no erf and no exp. The statistics are fp32 sums shifted by one
pixel's value per channel so that E[h^2] - E[h]^2 does not cancel. The normalisation and the backward are
inductor kernels.

`fused_act_batch_norm(x, act, bn)` returns what `bn(act(x))` returns, running statistics and `num_batches_tracked`
updated the same way, and takes the fused path only for CPU training in fp32 or bf16 of inputs large enough to pay
for the compile (`fast_cpu_training`); otherwise it is `bn(act(x))`. Compiled kernels are cached on disk by
inductor; when compiling fails the same kernels run eagerly (correct, slower) after one warning.
"""
from __future__ import annotations

import ctypes
import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from .compiled import FAST_DTYPES, CompiledKernel, NativeLibrary, fast_cpu_training

__all__ = ["fused_act_batch_norm", "fused_activation", "ActBatchNormFunction"]

INV_SQRT2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def fused_activation(act: nn.Module) -> Optional[str]:
    """"gelu" when `act` is one this module fuses (exact GELU), else None.

    ReLU -> BatchNorm is not fused: aten's ReLU is cheap, and fused it was 10-13% slower per cm-cpu step
    (8x8 maps, fp32 and bf16), where GELU -> BatchNorm gained 6% per cm-vanilla step."""
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    return None


# erf(z) = 1 - t (A1 + t (A2 + t (A3 + t (A4 + t A5)))) exp(-z^2), t = 1 / (1 + P z) for z >= 0 (Abramowitz &
# Stegun 7.1.26, absolute error <= 1.5e-7): the approximation aten's vectorised erf uses. Written out, its
# exp(-z^2) is also the normal density GELU's slope needs, so the slope costs no second exp.
P, A1, A2, A3, A4, A5 = 0.3275911, 0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429


def activate_gelu(a: Tensor) -> tuple[Tensor, Tensor]:
    """(gelu(a), gelu'(a)) in a's dtype, computed in fp32: gelu(a) = a cdf(a), gelu'(a) = cdf(a) + a pdf(a)."""
    af = a.float()
    z = af * INV_SQRT2
    t = 1.0 / (1.0 + P * z.abs())
    gauss = torch.exp(-z * z)
    erf_abs = 1.0 - t * (A1 + t * (A2 + t * (A3 + t * (A4 + t * A5)))) * gauss
    cdf = 0.5 + 0.5 * torch.copysign(erf_abs, z)
    slope = cdf + af * gauss * INV_SQRT_2PI
    return (af * cdf).to(a.dtype), slope.to(a.dtype)


def channel_sums(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel (sum of d, sum of d^2, shift) in fp32 for d = h - shift, shift = the first pixel's value."""
    hf = h.float()
    shift = hf[0, :, 0, 0]
    d = hf - shift.view(1, -1, 1, 1)
    return d.sum((2, 3)).sum(0), (d * d).sum((2, 3)).sum(0), shift


def normalize(h: Tensor, mean: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """(h - mean) * scale + bias per channel, in h's dtype."""
    y = (h.float() - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    return y.to(h.dtype)


def backward_sums(grad_y: Tensor, h: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel fp32 (sum of grad_y, sum of grad_y * normalised h): the bias and weight gradients."""
    g = grad_y.float()
    xhat = (h.float() - mean.view(1, -1, 1, 1)) * rstd.view(1, -1, 1, 1)
    return g.sum((2, 3)).sum(0), (g * xhat).sum((2, 3)).sum(0)


def input_grad(grad_y: Tensor, h: Tensor, slope: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor,
               sum_g: Tensor, sum_gx: Tensor) -> Tensor:
    """The gradient at the activation's input: BatchNorm's input gradient times the activation's saved slope, in
    grad_y's dtype."""
    n = h.numel() // h.shape[1]
    r = rstd.view(1, -1, 1, 1)
    xhat = (h.float() - mean.view(1, -1, 1, 1)) * r
    grad_h = (grad_y.float() - (sum_g / n).view(1, -1, 1, 1) - xhat * (sum_gx / n).view(1, -1, 1, 1)) * \
        (r * weight.view(1, -1, 1, 1))
    return (grad_h * slope.float()).to(grad_y.dtype)


def declare_gelu_stats(lib: ctypes.CDLL) -> None:
    fn = lib.gelu_stats
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [
        ctypes.c_int]


native = NativeLibrary("gelu_stats.c", declare_gelu_stats)


def gelu_and_channel_sums(a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(h = gelu(a), gelu'(a), then `channel_sums(h)`). Channels-last inputs take one pass of the C kernel
    (csrc/gelu_stats.c: the same arithmetic; inductor's two kernels took 9.7 ms where it takes 4.6 at cm-vanilla's
    shape in bf16); other layouts, or no C compiler, the inductor kernels."""
    lib = native.load() if (a.ndim == 4 and a.numel() > 0 and a.dtype in FAST_DTYPES and a.device.type == "cpu"
                            and a.is_contiguous(memory_format=torch.channels_last)) else None
    if lib is None:
        h, slope = _activate_gelu(a)
        return (h, slope) + _channel_sums(h)
    h, slope = (torch.empty_like(a, memory_format=torch.channels_last) for _ in range(2))
    c = a.shape[1]
    sum_d, sum_d2, shift = (torch.empty(c, dtype=torch.float32) for _ in range(3))
    with record_function("GELU + BatchNorm statistics (C)"):  # names the kernel in `isoconv bench --profile`
        status = lib.gelu_stats(a.data_ptr(), h.data_ptr(), slope.data_ptr(), int(a.dtype == torch.bfloat16),
                                a.numel() // c, c, sum_d.data_ptr(), sum_d2.data_ptr(), shift.data_ptr(),
                                torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"GELU -> BatchNorm of {tuple(a.shape)} found no memory for its partial sums")
    return h, slope, sum_d, sum_d2, shift


# the names label the kernels in warnings and in `isoconv bench --profile`
_activate_gelu = CompiledKernel(activate_gelu, "GELU (inductor)")
_channel_sums = CompiledKernel(channel_sums, "BatchNorm statistics (inductor)")
_normalize = CompiledKernel(normalize, "BatchNorm normalisation (inductor)")
_backward_sums = CompiledKernel(backward_sums, "BatchNorm backward sums (inductor)")
_input_grad = CompiledKernel(input_grad, "GELU + BatchNorm input gradient (inductor)")


class ActBatchNormFunction(torch.autograd.Function):
    """y, batch mean, biased batch variance = BatchNorm(gelu(a)) with batch statistics; only y is differentiable."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # the kernels choose their precision: in the input's dtype, sums in fp32
    def forward(ctx, a: Tensor, weight: Tensor, bias: Tensor, eps: float):
        h, slope, s1, s2, shift = gelu_and_channel_sums(a)
        n = h.numel() // h.shape[1]
        shifted_mean = s1 / n
        var = (s2 / n - shifted_mean * shifted_mean).clamp_min(0.0)
        mean = shifted_mean + shift
        rstd = torch.rsqrt(var + eps)
        y = _normalize(h, mean, rstd * weight.float(), bias.float())
        ctx.save_for_backward(h, slope, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad_y: Tensor, _grad_mean: Tensor, _grad_var: Tensor):
        h, slope, weight, mean, rstd = ctx.saved_tensors
        grad_y = grad_y.contiguous(memory_format=memory_format(h))  # the layout the kernels were compiled for
        sum_g, sum_gx = _backward_sums(grad_y, h, mean, rstd)
        grad_a = _input_grad(grad_y, h, slope, mean, rstd, weight.float(), sum_g, sum_gx) \
            if ctx.needs_input_grad[0] else None
        return grad_a, sum_gx.to(weight.dtype), sum_g.to(weight.dtype), None


def memory_format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def takes_fused_path(x: Tensor, act: nn.Module, bn: nn.Module) -> bool:
    return (type(bn) is nn.BatchNorm2d and bn.training and bn.track_running_stats and bn.affine
            and bn.running_mean is not None and x.ndim == 4 and fused_activation(act) is not None
            and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and fast_cpu_training(x.device, x.dtype, x.numel()))


def fused_act_batch_norm(x: Tensor, act: nn.Module, bn: nn.Module) -> Tensor:
    """`bn(act(x))`, fused where `takes_fused_path` says so (BatchNorm2d in training mode on a CPU)."""
    if not takes_fused_path(x, act, bn):
        return bn(act(x))
    y, mean, var = ActBatchNormFunction.apply(x, bn.weight, bn.bias, bn.eps)
    update_running_stats(bn, mean, var, x.numel() // x.shape[1])
    return y


@torch.no_grad()
def update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, n: int) -> None:
    """What nn.BatchNorm2d does in training: count the batch, then move the running mean and the running
    (unbiased) variance towards the batch's by `momentum` (or by 1/batches for a cumulative average)."""
    bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.mul_(1.0 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
    unbiased = var * (n / max(n - 1, 1))
    bn.running_var.mul_(1.0 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
