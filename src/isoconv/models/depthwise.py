"""Depthwise 2-d convolution whose backward is fast on CPUs.

On CPUs, aten (oneDNN) computes the *weight* gradient of a depthwise convolution slowly: for ConvMixer-256
(k5, 16x16 maps, batch 128, channels-last) it takes longer than the forward and input gradient together,
in bf16 several times longer, and it accumulates bf16 weight gradients in bf16. Here the weight gradient
is the per-channel correlation it is,

    dW[c, i, j] = sum over n, h, w of  grad_out[n, c, h, w] * x_padded[n, c, h + i, w + j],

summed in fp32 by a C kernel (`csrc/depthwise_grad.c`, with the bias gradient, the sum of grad_out, in the same
pass) that keeps one image's channels in cache while all kernel offsets are summed. Inductor's fused loop for the
same sums ran 3-5x slower (cm-vanilla's shape: 17-27 ms against 5 ms in bf16 on a 2-core EPYC). The C source
is built once per machine (`compiled.NativeLibrary`); without a C compiler the gradients are aten's. The input
gradient is a depthwise convolution of grad_out with the flipped kernel, and the forward is F.conv2d.

`DepthwiseConv2d` is an nn.Conv2d (same parameters and state-dict keys) that takes this path only where
`use_fast_depthwise` says it is faster: CPU training in fp32 or bf16. Everywhere else, inference
included, it is nn.Conv2d.
"""
from __future__ import annotations

import ctypes
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from .compiled import FAST_DTYPES, FAST_MIN_ELEMENTS, NativeLibrary, fast_cpu_training

__all__ = ["DepthwiseConv2d", "depthwise_conv2d", "resolve_padding", "use_fast_depthwise"]

Padding = Union[str, int, Sequence[int]]


def use_fast_depthwise(device: torch.device, dtype: torch.dtype, numel: int = FAST_MIN_ELEMENTS) -> bool:
    """Whether training a depthwise convolution on `device` in `dtype`, on `numel` input elements, is faster with
    this module's backward (`compiled.fast_cpu_training`)."""
    return fast_cpu_training(device, dtype, numel)


def resolve_padding(padding: Padding, kernel_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding; "same" pads as nn.Conv2d(padding="same") does at dilation 1:
    k - 1 in all, the smaller half (k - 1) // 2 before and the rest after (so even kernels pad one more
    pixel after); "valid" pads nothing."""
    kh, kw = kernel_size
    if isinstance(padding, str):
        if padding == "same":
            return (kh - 1) // 2, kh // 2, (kw - 1) // 2, kw // 2
        if padding == "valid":
            return 0, 0, 0, 0
        raise ValueError(f"padding must be 'same', 'valid' or integers, got {padding!r}")
    ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return int(ph), int(ph), int(pw), int(pw)


def conv_padded(x: Tensor, weight: Tensor, bias: Optional[Tensor], pad: Sequence[int]) -> Tensor:
    """Depthwise F.conv2d with (top, bottom, left, right) padding; entries may be negative (a crop)."""
    top, bottom, left, right = pad
    if top == bottom >= 0 and left == right >= 0:
        return F.conv2d(x, weight, bias, padding=(top, left), groups=x.shape[1])
    return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, groups=x.shape[1])


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def param_grad_sums(grad_out: Tensor, x: Tensor, kh: int, kw: int, pad: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(dW of shape (C, 1, kh, kw), db of shape (C,)) in the accumulation dtype, summed by torch ops (one pass per
    kernel offset): the float64 path, where exactness matters and speed does not."""
    top, bottom, left, right = pad
    acc = accumulation_dtype(x.dtype)
    ho, wo = grad_out.shape[-2:]
    xp = F.pad(x, (left, right, top, bottom)).to(acc)
    g = grad_out.to(acc)
    sums = torch.stack([(g * xp[:, :, i:i + ho, j:j + wo]).sum((0, 2, 3)) for i in range(kh) for j in range(kw)]
                       + [g.sum((0, 2, 3))], dim=1)
    return sums[:, :-1].reshape(-1, 1, kh, kw), sums[:, -1].contiguous()


def param_grads_aten(grad_out: Tensor, x: Tensor, kh: int, kw: int, pad: Sequence[int]) -> tuple[Tensor, Tensor]:
    """aten's weight and bias gradients (symmetric padding only; the asymmetric "same" of even kernels pads x
    first)."""
    top, bottom, left, right = pad
    if not (top == bottom >= 0 and left == right >= 0):
        x, top, left = F.pad(x, (left, right, top, bottom)), 0, 0
    weight = x.new_empty((x.shape[1], 1, kh, kw))
    _, grad_w, grad_b = torch.ops.aten.convolution_backward(grad_out, x, weight, [x.shape[1]], [1, 1], [top, left],
                                                            [1, 1], False, [0, 0], x.shape[1], [False, True, True])
    return grad_w, grad_b


def declare_param_grads(lib: ctypes.CDLL) -> None:
    fn = lib.depthwise_param_grads
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 10
                   + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int])


native = NativeLibrary("depthwise_grad.c", declare_param_grads)


def check_param_grad_inputs(grad_out: Tensor, x: Tensor, kh: int, kw: int, pad: Sequence[int]) -> None:
    """What the weight gradient needs of its inputs (the C kernel reads memory by them): x (N, C, H, W) and grad_out
    of x's dtype and device and of the shape a stride-1 convolution with a (kh, kw) kernel and (top, bottom, left,
    right) zero padding `pad` gives."""
    if x.ndim != 4 or grad_out.ndim != 4:
        raise ValueError(f"depthwise_param_grads needs 4-d grad_out and x (N, C, H, W), got {tuple(grad_out.shape)} "
                         f"and {tuple(x.shape)}")
    if len(pad) != 4 or min(pad) < 0 or kh < 1 or kw < 1:
        raise ValueError(f"depthwise_param_grads needs a kernel of at least 1x1 and 4 non-negative paddings, got "
                         f"{kh}x{kw} and {list(pad)}")
    if grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise TypeError(f"depthwise_param_grads needs grad_out of x's dtype and device, got {grad_out.dtype} on "
                        f"{grad_out.device} and {x.dtype} on {x.device}")
    n, c, h, w = x.shape
    expected = (n, c, h + pad[0] + pad[1] - kh + 1, w + pad[2] + pad[3] - kw + 1)
    if tuple(grad_out.shape) != expected:
        raise ValueError(f"depthwise_param_grads needs grad_out of shape {expected} for x {tuple(x.shape)}, a "
                         f"{kh}x{kw} kernel and padding {list(pad)}; got {tuple(grad_out.shape)}")


def check_native_layout(**tensors: Tensor) -> None:
    """The C kernels read CPU tensors as dense channels-last fp32 or bf16, and nothing else."""
    for name, t in tensors.items():
        if t.device.type != "cpu" or t.dtype not in FAST_DTYPES or not t.is_contiguous(
                memory_format=torch.channels_last):
            raise ValueError(f"the C kernel needs {name} as a channels-last contiguous fp32 or bf16 CPU tensor, got "
                             f"{t.dtype} on {t.device} with strides {t.stride()} for shape {tuple(t.shape)}")


def param_grads_native(grad_out: Tensor, x: Tensor, kh: int, kw: int, pad: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(weight, bias) gradients from the C kernel in fp32, for channels-last fp32 or bf16 inputs; aten's (in x's
    dtype) when the kernel cannot be built."""
    check_param_grad_inputs(grad_out, x, kh, kw, pad)
    lib = native.load()
    if lib is None:
        return param_grads_aten(grad_out, x, kh, kw, pad)
    check_native_layout(grad_out=grad_out, x=x)
    n, c, h, w = x.shape
    ho, wo = grad_out.shape[-2:]
    grad_w = torch.zeros((c, kh * kw), dtype=torch.float32)
    grad_b = torch.zeros((c,), dtype=torch.float32)
    if n > 0 and ho > 0 and wo > 0:
        with record_function("depthwise weight gradient (C)"):  # names the kernel in `isoconv bench --profile`
            status = lib.depthwise_param_grads(grad_out.data_ptr(), x.data_ptr(), int(x.dtype == torch.bfloat16),
                                               n, c, h, w, ho, wo, kh, kw, pad[0], pad[2], grad_w.data_ptr(),
                                               grad_b.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"the depthwise weight gradient of {tuple(x.shape)} found no memory for its buffers")
    return grad_w.view(c, 1, kh, kw), grad_b


@torch.library.custom_op("isoconv::depthwise_param_grads", mutates_args=())
def depthwise_param_grads(grad_out: Tensor, x: Tensor, kh: int, kw: int, pad: list[int]) -> tuple[Tensor, Tensor]:
    """Weight (C, 1, kh, kw) and bias (C,) gradients of a stride-1 depthwise convolution, in x's dtype; summed
    in fp32 (float64 for float64, which runs the sums eagerly: it is for checking, not for speed). Inputs of any
    memory layout; mismatched dtypes or shapes raise (`check_param_grad_inputs`)."""
    check_param_grad_inputs(grad_out, x, kh, kw, pad)
    if x.dtype == torch.float64:
        return param_grad_sums(grad_out, x, kh, kw, pad)
    if x.device.type != "cpu" or x.dtype not in FAST_DTYPES:
        grad_w, grad_b = param_grads_aten(grad_out, x, kh, kw, pad)
        return grad_w.to(x.dtype), grad_b.to(x.dtype)
    # the C kernel reads channels innermost (channels-last), where its sums vectorise
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    grad_w, grad_b = param_grads_native(grad_out, x, kh, kw, pad)
    return grad_w.to(x.dtype), grad_b.to(x.dtype)


@depthwise_param_grads.register_fake
def _(grad_out: Tensor, x: Tensor, kh: int, kw: int, pad: list[int]) -> tuple[Tensor, Tensor]:
    return x.new_empty((x.shape[1], 1, kh, kw)), x.new_empty((x.shape[1],))


@torch.library.custom_op("isoconv::depthwise_conv2d", mutates_args=())
def depthwise_conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], pad: list[int]) -> Tensor:
    return conv_padded(x, weight, bias, pad)


@depthwise_conv2d_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], pad: list[int]) -> Tensor:
    return conv_padded(x, weight, bias, pad)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    x, weight, bias, pad = inputs
    ctx.save_for_backward(x, weight)
    ctx.pad = list(pad)
    ctx.has_bias = bias is not None


def _backward(ctx: torch.autograd.function.FunctionCtx,
              grad_out: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], None]:
    x, weight = ctx.saved_tensors
    top, bottom, left, right = ctx.pad
    kh, kw = weight.shape[-2:]
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        # stride 1: the input gradient is the convolution of grad_out with the flipped kernel, padded by
        # k - 1 - p on each side (the sides swap, which matters for the asymmetric "same" of even kernels)
        grad_x = conv_padded(grad_out, weight.flip(2, 3), None, [kh - 1 - top, kh - 1 - bottom, kw - 1 - left,
                                                                 kw - 1 - right])
    if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
        grad_w, grad_b = depthwise_param_grads(grad_out, x, kh, kw, ctx.pad)
        grad_w = grad_w if ctx.needs_input_grad[1] else None
        grad_b = grad_b if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b, None


depthwise_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, padding: Padding = "same") -> Tensor:
    """Stride-1, dilation-1 depthwise convolution (weight (C, 1, kh, kw) on x (N, C, H, W)) with the fast
    backward. Under CPU autocast the inputs are cast to the autocast dtype, as aten's conv2d is."""
    if x.ndim != 4 or weight.ndim != 4 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"depthwise_conv2d needs x (N, C, H, W) and weight (C, 1, kh, kw), got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    pad = list(resolve_padding(padding, (weight.shape[2], weight.shape[3])))
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return depthwise_conv2d_op(x, weight, bias, pad)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel_size, padding=padding, groups=channels)`` (same parameters,
    same state-dict keys) whose training forward on a CPU uses `depthwise_conv2d` where
    `use_fast_depthwise` says it is faster."""

    def __init__(self, channels: int, kernel_size: Union[int, tuple[int, int]], padding: Padding = "same",
                 bias: bool = True, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(channels, channels, kernel_size, padding=padding, groups=channels, bias=bias,
                         device=device, dtype=dtype)

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            return torch.get_autocast_dtype("cpu")
        return x.dtype

    def forward(self, x: Tensor) -> Tensor:
        if (torch.is_grad_enabled() and not torch.jit.is_tracing() and not torch.jit.is_scripting()
                and use_fast_depthwise(x.device, self.compute_dtype(x), x.numel())):
            return depthwise_conv2d(x, self.weight, self.bias, self.padding)
        return super().forward(x)
