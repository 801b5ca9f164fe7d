"""The depthwise convolution with the fast CPU backward (isoconv.models.depthwise) against aten in float64.

The fp32/bf16 cases run the weight gradient's C kernel (csrc/depthwise_grad.c, built once per session into the
session's $ISOCONV_CACHE), so they cover channel counts that are not a multiple of its 8- or 16-channel blocks (the
vector width), kernel widths past its 8-column passes, even kernels with asymmetric padding and batches that are not
a multiple of its 4-image chunks."""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from isoconv.models import act_norm, compiled, depthwise
from isoconv.models.depthwise import DepthwiseConv2d, depthwise_conv2d, resolve_padding, use_fast_depthwise

SRC = Path(__file__).resolve().parents[1] / "src"
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def make_inputs(n: int, c: int, h: int, w: int, k: int, dtype: torch.dtype, memory_format: torch.memory_format,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64).to(dtype).contiguous(memory_format=memory_format)
    weight = torch.randn(c, 1, k, k, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    return x, weight, bias


def grads(fn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grad_out_seed: int = 1,
          grad_out_dtype: torch.dtype = torch.float64):
    """(output, dx, dw, db) of fn(x, weight, bias) for a fixed random output gradient, rounded to grad_out_dtype."""
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    y = fn(x, weight, bias)
    gen = torch.Generator().manual_seed(grad_out_seed)
    y.backward(torch.randn(y.shape, generator=gen, dtype=torch.float64).to(grad_out_dtype).to(y.dtype))
    return y.detach(), x.grad, weight.grad, bias.grad


def aten(padding):
    return lambda x, w, b: F.conv2d(x, w, b, padding=padding, groups=x.shape[1])


def fast(padding):
    return lambda x, w, b: depthwise_conv2d(x, w, b, padding)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_same_padding_matches_nn_conv2d(k):
    conv = nn.Conv2d(2, 2, (k, k + 1), padding="same", groups=2)
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    assert resolve_padding("same", (k, k + 1)) == (top, bottom, left, right)
    assert resolve_padding(2, (k, k)) == (2, 2, 2, 2)
    assert resolve_padding((1, 0), (k, k)) == (1, 1, 0, 0)


@pytest.mark.parametrize("k, padding, n, fmt", [
    (3, "same", 1, "contiguous"),
    (4, "same", 2, "channels_last"),
    (2, "same", 2, "contiguous"),
    (3, 0, 2, "channels_last"),
    (4, 2, 1, "contiguous"),
])
def test_gradcheck_float64(k, padding, n, fmt):
    x, weight, bias = make_inputs(n, 3, 5, 6, k, torch.float64, FORMATS[fmt])
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(fast(padding), inputs)
    # and the same values as aten, forward and all three gradients
    for ours, ref in zip(grads(fast(padding), x, weight, bias), grads(aten(padding), x, weight, bias)):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


# Tolerances relative to the largest reference value: fp32 sums in fp32 (1e-5); bf16 rounds the inputs to
# bf16 before the float64 reference sees them, so what is left is the bf16 rounding of each result (2^-8)
# and fp32 accumulation error.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype, k, padding, n, c, fmt", [
    (torch.float32, 3, "same", 1, 16, "contiguous"),
    (torch.float32, 3, 1, 1, 16, "channels_last"),
    (torch.float32, 4, "same", 3, 16, "channels_last"),
    (torch.float32, 9, "same", 5, 19, "channels_last"),
    (torch.float32, 2, 0, 2, 35, "contiguous"),
    (torch.bfloat16, 3, "same", 3, 16, "channels_last"),
    (torch.bfloat16, 6, "same", 6, 33, "contiguous"),
    (torch.bfloat16, 5, 2, 2, 7, "channels_last"),
    (torch.float32, 7, "same", 2, 24, "channels_last"),  # ConvNeXt's kernel
    (torch.float32, 8, 3, 2, 17, "contiguous"),
    (torch.bfloat16, 1, 0, 3, 16, "channels_last"),
])
def test_low_precision_against_float64(dtype, k, padding, n, c, fmt):
    x, weight, bias = make_inputs(n, c, 12, 10, k, dtype, FORMATS[fmt])
    ours = grads(fast(padding), x, weight, bias)
    refs = grads(aten(padding), x.double(), weight.double(), bias.double(), grad_out_dtype=dtype)
    names = ("output", "input grad", "weight grad", "bias grad")
    for name, got, ref in zip(names, ours, refs):
        assert got.dtype == dtype, name
        err = (got.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"
    assert ours[0].is_contiguous(memory_format=FORMATS[fmt])
    assert ours[1].shape == x.shape


def test_bf16_weight_grad_accumulates_in_fp32():
    # exact bf16 inputs and fp32 sums leave only the final rounding to bf16 (at most 2^-8 relative) per weight;
    # summed in bf16, the 360 terms per weight here end up as much as 80% off
    x, weight, bias = make_inputs(3, 16, 12, 10, 3, torch.bfloat16, torch.channels_last, seed=3)
    _, _, dw, _ = grads(fast("same"), x, weight, bias, grad_out_seed=4)
    _, _, ref, _ = grads(aten("same"), x.double(), weight.double(), bias.double(), grad_out_seed=4,
                         grad_out_dtype=torch.bfloat16)
    assert ((dw.double() - ref).abs() / ref.abs()).max().item() <= 2 ** -8


def test_autocast_bf16_matches_aten_autocast(monkeypatch):
    monkeypatch.setattr(compiled, "FAST_MIN_ELEMENTS", 1)  # this small input takes the fast path too
    module = DepthwiseConv2d(16, 3).to(memory_format=torch.channels_last)
    reference = nn.Conv2d(16, 16, 3, padding="same", groups=16)
    reference.load_state_dict(module.state_dict())
    x = torch.randn(3, 16, 12, 10).contiguous(memory_format=torch.channels_last)  # the shape compiled above
    results = []
    for conv in (module, reference):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(xi)
        y.float().square().sum().backward()
        results.append((y, xi.grad, conv.weight.grad, conv.bias.grad))
    (y, dx, dw, db), (ref_y, ref_dx, ref_dw, ref_db) = results
    assert y.dtype == ref_y.dtype == torch.bfloat16
    assert y.grad_fn is not None and "isoconv" in type(y.grad_fn).__name__ + y.grad_fn.name()
    torch.testing.assert_close(y, ref_y)
    assert dw.dtype == torch.float32 and db.dtype == torch.float32  # the parameters stay fp32
    for got, ref in ((dx, ref_dx), (dw, ref_dw), (db, ref_db)):
        assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_module_is_a_conv2d_with_the_same_state_dict():
    module = DepthwiseConv2d(6, 4, padding="same")
    plain = nn.Conv2d(6, 6, 4, padding="same", groups=6)
    assert isinstance(module, nn.Conv2d)
    assert list(module.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    assert module.weight.shape == plain.weight.shape
    module.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(module.state_dict(), strict=True)
    assert list(DepthwiseConv2d(6, 3, bias=False).state_dict()) == ["weight"]


def test_module_takes_the_fast_path_only_when_training_on_cpu(monkeypatch):
    module = DepthwiseConv2d(4, 3)
    small = module(torch.randn(1, 4, 6, 6, requires_grad=True))
    assert "isoconv" not in type(small.grad_fn).__name__  # too small to pay for a compile: aten
    monkeypatch.setattr(compiled, "FAST_MIN_ELEMENTS", 1)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        inference = module.double()(x)
    training = module(x.requires_grad_())
    assert "isoconv" not in type(training.grad_fn).__name__  # float64: aten
    module.float()
    fast_out = module(x.float())
    assert "isoconv" in type(fast_out.grad_fn).__name__
    torch.testing.assert_close(training, inference)
    assert use_fast_depthwise(torch.device("cpu"), torch.float32)
    assert use_fast_depthwise(torch.device("cpu"), torch.bfloat16)
    monkeypatch.undo()
    assert use_fast_depthwise(torch.device("cpu"), torch.float32, 128 * 256 * 16 * 16)  # cm-vanilla, batch 128
    assert use_fast_depthwise(torch.device("cpu"), torch.float32, 128 * 128 * 8 * 8)  # cm-cpu (the CPU default)
    assert not use_fast_depthwise(torch.device("cpu"), torch.float32, 32 * 64 * 8 * 8)
    assert not use_fast_depthwise(torch.device("cpu"), torch.float64)
    assert not use_fast_depthwise(torch.device("cuda"), torch.float32)
    assert not use_fast_depthwise(torch.device("cuda"), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_does_not_depend_on_the_thread_count(dtype):
    # each chunk of images keeps its own partial sums, added in a fixed order: what makes resume bit-identical
    # on a machine whose thread count changed, and runs comparable across machines
    x, weight, bias = make_inputs(9, 40, 11, 13, 5, dtype, torch.channels_last, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads(fast("same"), x, weight, bias, grad_out_dtype=dtype)
        torch.set_num_threads(3)
        three = grads(fast("same"), x, weight, bias, grad_out_dtype=dtype)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three):
        assert torch.equal(a, b)


def test_native_kernel_is_built_once_and_then_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ISOCONV_CACHE", str(tmp_path))
    first = compiled.NativeLibrary("depthwise_grad.c", depthwise.declare_param_grads)
    assert first.load() is not None
    built = sorted((tmp_path / compiled.NATIVE_FOLDER).iterdir())
    assert [p.suffix for p in built] == [".so", ".sha256"] and built[0].name.startswith("depthwise_grad-")
    assert built[1].read_text().strip() == hashlib.sha256(built[0].read_bytes()).hexdigest()  # its build digest

    def no_compiler(*args):
        raise AssertionError("compiled again")
    monkeypatch.setattr(compiled, "compile_c", no_compiler)
    second = compiled.NativeLibrary("depthwise_grad.c", depthwise.declare_param_grads)
    assert second.load() is not None and not second.failed
    assert sorted((tmp_path / compiled.NATIVE_FOLDER).iterdir()) == built


def test_without_a_c_compiler_the_weight_grad_falls_back_to_aten(tmp_path):
    script = """
import torch, torch.nn.functional as F
from isoconv.models import depthwise
x = torch.randn(2, 4, 7, 6, requires_grad=True)
w = torch.randn(4, 1, 4, 4, requires_grad=True)
depthwise.depthwise_conv2d(x, w, None, "same").square().sum().backward()
xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
F.conv2d(xr, wr, None, padding="same", groups=4).square().sum().backward()
assert depthwise.native.failed
assert (w.grad.double() - wr.grad).abs().max() < 1e-4 * wr.grad.abs().max()
print("fell back")
"""
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), PATH=str(tmp_path), ISOCONV_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(SRC))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fell back" in proc.stdout
    assert "cannot build the CPU kernels in depthwise_grad.c (no C compiler found" in proc.stderr
    assert "continuing without them (slower)" in proc.stderr


# other architectures have no AVX-512 to leave out (and compilers there reject the flag)
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx512f is an x86 flag")
def test_the_build_for_cpus_without_avx512_gives_the_same_results(tmp_path, monkeypatch):
    # AVX2-only CPUs get 8-channel vectors instead of 16 and round to bf16 in integer arithmetic instead of with
    # AVX512-BF16's instruction; each channel is summed in the same order either way, and what is left is where the
    # compiler fused a multiply and an add (last-bit differences)
    monkeypatch.setenv("ISOCONV_CACHE", str(tmp_path))
    x, weight, bias = make_inputs(5, 37, 9, 11, 5, torch.bfloat16, torch.channels_last, seed=6)

    def results_built_with(flags):
        monkeypatch.setattr(depthwise, "native", compiled.NativeLibrary(
            "depthwise_grad.c", depthwise.declare_param_grads, extra_flags=flags))
        monkeypatch.setattr(act_norm, "native", compiled.NativeLibrary(
            "gelu_stats.c", act_norm.declare_gelu_stats, extra_flags=flags))
        return (grads(fast("same"), x, weight, bias, grad_out_dtype=torch.bfloat16),
                act_norm.gelu_and_channel_sums(x),
                act_norm.gelu_and_channel_sums(x.float().contiguous(memory_format=torch.channels_last)))

    wide = results_built_with(())
    narrow = results_built_with(("-mno-avx512f",))
    assert depthwise.native.library is not None and act_norm.native.library is not None
    assert len(list((tmp_path / compiled.NATIVE_FOLDER).glob("*.so"))) == 4  # both sources, both targets
    for a, b in zip(sum(wide, ()), sum(narrow, ())):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_an_unwritable_cache_builds_the_kernel_for_the_process(tmp_path, monkeypatch):
    read_only = tmp_path / "cache"
    read_only.mkdir()
    monkeypatch.setenv("ISOCONV_CACHE", str(read_only))

    def read_only_file_system(*args):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(compiled, "atomic_write_with", read_only_file_system)
    library = compiled.NativeLibrary("depthwise_grad.c", depthwise.declare_param_grads)
    assert library.load() is not None and not library.failed
    assert list(read_only.rglob("*.so")) == []
