"""The fused GELU -> BatchNorm of CPU training (isoconv.models.act_norm) against nn.BatchNorm2d(gelu(x)) in float64.
Each (dtype, layout) case compiles a few small inductor kernels once (seconds, then cached on disk); channels-last
inputs run the forward's first pass in the C kernel (csrc/gelu_stats.c), built once per session."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from isoconv.models import act_norm, compiled
from isoconv.models.act_norm import fused_act_batch_norm, fused_activation, takes_fused_path
from isoconv.models.convmixer import ConvMixer

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# relative to the largest reference value: fp32 sums in fp32; bf16 rounds the activation and the output to bf16
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture
def every_size_is_fast(monkeypatch):
    monkeypatch.setattr(compiled, "FAST_MIN_ELEMENTS", 1)


def batch_norm(momentum=0.1) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(16, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        bn.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
        bn.running_var.fill_(2.0)
    return bn


def run(fn, x, bn, grad):
    x = x.clone().requires_grad_()
    y = fn(x, bn)
    y.backward(grad)
    return {"output": y, "input grad": x.grad, "weight grad": bn.weight.grad, "bias grad": bn.bias.grad,
            "running mean": bn.running_mean, "running var": bn.running_var}


@pytest.mark.parametrize("dtype, fmt", [
    (torch.float32, "channels_last"),
    (torch.bfloat16, "contiguous"),
])
def test_matches_batch_norm_of_gelu_in_float64(every_size_is_fast, dtype, fmt):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 16, 6, 5, generator=gen) * 2 + 0.5).to(dtype).contiguous(memory_format=FORMATS[fmt])
    grad = torch.randn(4, 16, 6, 5, generator=gen).to(dtype)
    bn = batch_norm()
    reference = copy.deepcopy(bn).double()
    ours = run(lambda x, bn: fused_act_batch_norm(x, nn.GELU(), bn), x, bn, grad)
    refs = run(lambda x, bn: bn(nn.GELU()(x)), x.double(), reference, grad.double())
    assert type(ours["output"].grad_fn).__name__ == "ActBatchNormFunctionBackward"  # the fused path ran
    assert ours["output"].dtype == ours["input grad"].dtype == dtype
    assert ours["weight grad"].dtype == torch.float32  # the parameters stay fp32
    for name, got in ours.items():
        err = (got.double() - refs[name]).abs().max().item() / refs[name].abs().max().item()
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"
    assert int(bn.num_batches_tracked) == int(reference.num_batches_tracked) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_gelu_and_channel_sums_against_float64(dtype):
    # 19 channels: full vector blocks (8 or 16 channels) and a partial one; 105 pixels: chunks of rows are not all full
    a = (torch.randn(3, 19, 5, 7, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    a = a.contiguous(memory_format=torch.channels_last)
    h, slope, sum_d, sum_d2, shift = act_norm.gelu_and_channel_sums(a)
    assert act_norm.native.library is not None and h.dtype == slope.dtype == dtype  # the C kernel ran
    assert h.is_contiguous(memory_format=torch.channels_last)
    x = a.double()
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    expected = {"gelu": x * cdf, "slope": cdf + x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)}
    tolerance = 2 ** -8 if dtype == torch.bfloat16 else 1e-6  # bf16: one rounding of each value; fp32: erf's
    for name, got in (("gelu", h), ("slope", slope)):
        err = ((got.double() - expected[name]).abs() / expected[name].abs().clamp_min(1.0)).max().item()
        assert err <= tolerance, f"{name}: relative error {err:.2e}"
    torch.testing.assert_close(shift, h[0, :, 0, 0].float(), rtol=0, atol=0)  # the first pixel, as stored
    d = h.double() - shift.double().view(1, -1, 1, 1)
    torch.testing.assert_close(sum_d.double(), d.sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sum_d2.double(), (d * d).sum((0, 2, 3)), rtol=1e-5, atol=1e-4)


def test_cumulative_average_without_momentum(every_size_is_fast):
    bn, reference = batch_norm(momentum=None), batch_norm(momentum=None)
    for seed in range(3):
        x = torch.randn(4, 16, 6, 5, generator=torch.Generator().manual_seed(seed)).contiguous(
            memory_format=torch.channels_last)
        fused_act_batch_norm(x.requires_grad_(), nn.GELU(), bn)
        reference(nn.GELU()(x))
    assert int(bn.num_batches_tracked) == 3
    torch.testing.assert_close(bn.running_mean, reference.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, reference.running_var, rtol=1e-5, atol=1e-6)


def test_takes_the_fused_path_only_for_cpu_training_of_plain_modules(every_size_is_fast):
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    bn = batch_norm()
    assert takes_fused_path(x, nn.GELU(), bn)
    assert not takes_fused_path(x, nn.GELU(approximate="tanh"), bn)  # another function
    assert not takes_fused_path(x, nn.ReLU(), bn)  # measured slower fused (cm-cpu): aten's
    assert not takes_fused_path(x, nn.SiLU(), bn)
    assert not takes_fused_path(x.double(), nn.GELU(), bn.double())
    with torch.no_grad():
        assert not takes_fused_path(x, nn.GELU(), bn)
    bn.eval()
    assert not takes_fused_path(x, nn.GELU(), bn)  # running statistics: plain BatchNorm
    assert not takes_fused_path(x, nn.GELU(), nn.BatchNorm2d(16, track_running_stats=False))
    assert fused_activation(nn.GELU()) == "gelu"
    assert fused_activation(nn.ReLU()) is None and fused_activation(nn.LeakyReLU()) is None


def test_convmixer_trains_the_same_with_and_without_fusion(every_size_is_fast, monkeypatch):
    """Two AdamW steps of a small ConvMixer: losses and every parameter and buffer agree with the unfused model,
    whose state-dict keys (timm's layout) are unchanged."""
    def two_steps(fused: bool):
        monkeypatch.setattr(act_norm, "takes_fused_path", takes_fused_path if fused else lambda *a: False)
        torch.manual_seed(0)
        model = ConvMixer(dim=16, depth=2, kernel_size=3, patch_size=2, num_classes=10, activation="gelu").to(
            memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(8, 3, 16, 16, generator=gen).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (8,), generator=gen)
        losses = []
        for _ in range(2):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, model

    fused_losses, fused = two_steps(True)
    plain_losses, plain = two_steps(False)
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert "blocks.0.0.fn.2.running_mean" in fused.state_dict() and "stem.2.weight" in fused.state_dict()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
