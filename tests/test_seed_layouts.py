"""Seed checkpoint layouts -> isoconv: the ConvMixer-XL study's flat/grouped ConvMixers, simple-convnext."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import isoconv
from isoconv.models.seed_layouts import (
    is_simple_convnext_layout,
    is_xl_nested_layout,
    is_xl_study_layout,
    simple_convnext_to_isoconv,
    xl_skip_period,
    xl_study_to_isoconv,
)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights (so a layer scale of 1e-6 hides nothing) and random BN statistics; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5 if t.ndim == 1 else
                        torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


class Wrapper(nn.Module):
    """Stands in for nn.DataParallel: the wrapped model is `module`, so saved keys start with `module.`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


# ----------------------------------------------------------------------------- the XL study's networks.py

class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def xl_block(dim: int, k: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(Residual(nn.Sequential(nn.Conv2d(dim, dim, k, groups=dim, padding="same"), act,
                                                nn.BatchNorm2d(dim))),
                         nn.Conv2d(dim, dim, 1), act, nn.BatchNorm2d(dim))


def study_convmixer(dim, depth, k, p, n_classes, act):
    """The study's `ConvMixer` (flat Sequential, one shared activation instance)."""
    return nn.Sequential(nn.Conv2d(3, dim, p, stride=p), act, nn.BatchNorm2d(dim),
                         *[xl_block(dim, k, act) for _ in range(depth)],
                         nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, n_classes))


def study_convmixer_xl(dim, depth, k, p, n_classes, skip_period, act):
    """The study's `ConvMixerXL`: group g = Sequential(Residual(Sequential(*depth//skip_period blocks)))."""
    groups = [nn.Sequential(Residual(nn.Sequential(*[xl_block(dim, k, act) for _ in range(depth // skip_period)])))
              for _ in range(skip_period)]
    return nn.Sequential(nn.Conv2d(3, dim, p, stride=p), act, nn.BatchNorm2d(dim), *groups,
                         nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, n_classes))


@pytest.mark.parametrize("preset, depth, skip, act", [("cm-xl", 6, 3, nn.SiLU()), ("cm-xl-skip", 66, 3, nn.GELU()),
                                                      ("cm-xl", 8, 2, nn.SiLU())])
def test_xl_grouped_checkpoint_loads_strict_with_identical_outputs(preset, depth, skip, act):
    theirs = randomise(study_convmixer_xl(8, depth, 5, 2, 10, skip, act), seed=depth)
    saved = {"model_state_dict": Wrapper(theirs).state_dict(), "optimizer_state_dict": {"state": {}}}
    assert next(iter(saved["model_state_dict"])).startswith("module.")
    assert is_xl_nested_layout(saved["model_state_dict"]) and xl_skip_period(saved["model_state_dict"]) == skip
    assert "module.3.0.fn.1.0.fn.0.weight" in saved["model_state_dict"]
    ours = isoconv.create_model(preset, dim=8, depth=depth, skip_period=skip, num_classes=10).eval()
    ours.load_state_dict(xl_study_to_isoconv(saved), strict=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    # the groups matter: without its group skips the same weights compute something else
    plain = isoconv.create_model(preset, dim=8, depth=depth, skip_period=0, num_classes=10).eval()
    plain.load_state_dict(xl_study_to_isoconv(saved), strict=True)
    with torch.no_grad():
        assert not torch.allclose(plain(x), theirs(x), atol=1e-4)


def test_xl_study_flat_checkpoint_loads():
    theirs = randomise(study_convmixer(8, 4, 5, 2, 10, nn.GELU()), seed=3)
    saved = {"model_state_dict": Wrapper(theirs).state_dict()}
    assert is_xl_study_layout(saved["model_state_dict"]) and not is_xl_nested_layout(saved["model_state_dict"])
    assert xl_skip_period(saved["model_state_dict"]) == 0
    ours = isoconv.create_model("cm-vanilla", dim=8, depth=4, num_classes=10).eval()
    ours.load_state_dict(xl_study_to_isoconv(saved), strict=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_xl_rejects_other_layouts():
    with pytest.raises(ValueError, match="not a ConvMixer-XL"):
        xl_study_to_isoconv({"stem.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no model state dict"):
        xl_study_to_isoconv({"optimizer_state_dict": {}})
    sd = study_convmixer_xl(4, 6, 3, 2, 10, 3, nn.GELU()).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("4.0.fn.1.")}
    with pytest.raises(ValueError, match="unequal or gapped"):
        xl_study_to_isoconv(sd)


# ----------------------------------------------------------------------------- simple-convnext's model.py

class SeedLayerNorm(nn.Module):
    """simple-convnext's LayerNorm: channels_last via F.layer_norm, channels_first by hand."""

    def __init__(self, dim: int, channels_first: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.channels_first, self.shape = channels_first, (dim,)

    def forward(self, x):
        if not self.channels_first:
            return F.layer_norm(x, self.shape, self.weight, self.bias, 1e-6)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + 1e-6)) + self.bias[:, None, None]


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class SeedBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]),
                                   SeedLayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                   Permute([0, 3, 1, 2]))
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) * 1e-6)

    def forward(self, x):
        return self.block(x) * self.gamma


class SeedLayer(nn.Module):
    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SeedBlock(dim) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)  # stochastic depth is the identity in eval mode
        return x


class SeedConvNext(nn.Module):
    def __init__(self, num_classes: int, patch_size: int, layer_dims, depths) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(3, layer_dims[0], patch_size, stride=patch_size), SeedLayerNorm(layer_dims[0], True))])
        for i in range(len(layer_dims) - 1):
            self.downsample_layers.append(nn.Sequential(SeedLayerNorm(layer_dims[i], True),
                                                        nn.Conv2d(layer_dims[i], layer_dims[i + 1], 2, stride=2)))
        self.stage_layers = nn.ModuleList(SeedLayer(d, n) for d, n in zip(layer_dims, depths))
        self.cls = nn.Sequential(SeedLayerNorm(layer_dims[-1]), nn.Linear(layer_dims[-1], num_classes))

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stage_layers):
            x = stage(down(x))
        return self.cls(x.mean(dim=(-2, -1)))


@pytest.mark.parametrize("preset, patch, depths, dims, classes", [
    ("convnext-cifar", 1, [2, 2, 2, 2], [8, 16, 24, 32], 10),
    ("convnext-tin", 2, [1, 1, 3, 1], [8, 16, 24, 32], 200),
])
def test_simple_convnext_checkpoint_loads_strict_with_same_outputs(preset, patch, depths, dims, classes):
    theirs = randomise(SeedConvNext(classes, patch, dims, depths), seed=len(depths) + patch)
    saved = {"model_state": theirs.state_dict(), "optimizer_state": {"state": {}, "param_groups": []}}
    assert is_simple_convnext_layout(saved["model_state"])
    converted = simple_convnext_to_isoconv(saved)
    ours = isoconv.create_model(preset, patch_size=patch, depths=depths, dims=dims, num_classes=classes,
                                drop_path_rate=0.0).eval()
    ours.load_state_dict(converted, strict=True)
    assert converted["stages.0.blocks.0.gamma"].shape == (dims[0],)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    assert a.abs().max() > 1e-3  # the outputs are not trivially zero
    # a DataParallel-wrapped save converts the same
    wrapped = simple_convnext_to_isoconv({"model_state": Wrapper(theirs).state_dict()})
    assert wrapped.keys() == converted.keys()


def test_simple_convnext_rejects_other_layouts():
    with pytest.raises(ValueError, match="not a simple-convnext"):
        simple_convnext_to_isoconv({"model_state": {"stem.0.weight": torch.zeros(1)}})


# ----------------------------------------------------------------------------- the seeds' saved files: --pretrained, isoconv.load

def save_xl_study_file(theirs: nn.Module, path) -> None:
    """As the study's train.py saves `{name}.pkl`: the DataParallel state dict plus the optimizer's."""
    torch.save({"model_state_dict": Wrapper(theirs).state_dict(),
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.005, "params": [0]}]}}, path)


@pytest.mark.parametrize("name, preset, depth, act", [("CM-XL", "cm-xl", 6, nn.SiLU()),
                                                      ("CM-XL-Skip", "cm-xl-skip", 66, nn.GELU())])
def test_pretrained_reads_the_xl_study_grouped_files_with_identical_outputs(tmp_path, name, preset, depth, act):
    from isoconv.weights.pretrained import XL_GROUPED, load_pretrained_into

    theirs = randomise(study_convmixer_xl(8, depth, 5, 2, 10, 3, act), seed=depth + 1)
    path = tmp_path / f"{name}.pkl"
    save_xl_study_file(theirs, path)
    ours = isoconv.create_model(preset, dim=8, depth=depth, num_classes=10)  # the preset's skip_period 3
    report = load_pretrained_into(ours, path)
    assert report.layout == XL_GROUPED and report.notes == [] and report.reinitialised == []
    assert len(report.converted) == len(ours.state_dict())
    assert dict(report.converted)["3.0.fn.1.0.fn.0.weight"] == "blocks.1.0.fn.0.weight"
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs(x))
    # the same file into a model without group skips loads (the tensors fit) but says it is another network
    plain = isoconv.create_model(preset, dim=8, depth=depth, skip_period=0, num_classes=10)
    assert load_pretrained_into(plain, path).notes == [
        "the weights come from a ConvMixer with 3 inter-block skip groups (skip_period 3), this model uses "
        "skip_period 0: pass --skip-period 3 for the network the weights were trained as"]


def test_pretrained_reads_the_xl_study_flat_file(tmp_path):
    from isoconv.weights.pretrained import load_pretrained_into

    theirs = randomise(study_convmixer(8, 4, 5, 2, 10, nn.GELU()), seed=11)
    save_xl_study_file(theirs, tmp_path / "CM-Vanilla.pkl")
    ours = isoconv.create_model("cm-vanilla", dim=8, depth=4, num_classes=10)
    assert load_pretrained_into(ours, tmp_path / "CM-Vanilla.pkl").notes == []
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs(x))


@pytest.mark.parametrize("preset, patch, depths, classes", [("convnext-cifar", 1, [2, 2, 2, 2], 10),
                                                             ("convnext-tin", 2, [1, 1, 3, 1], 200)])
def test_pretrained_reads_simple_convnexts_saved_file(tmp_path, preset, patch, depths, classes):
    from isoconv.weights.pretrained import load_pretrained_into

    theirs = randomise(SeedConvNext(classes, patch, [8, 16, 24, 32], depths), seed=patch + 20)
    path = tmp_path / "model.pt"
    torch.save({"model_state": theirs.state_dict(), "optimizer_state": {"state": {}, "param_groups": []}}, path)
    ours = isoconv.create_model(preset, patch_size=patch, depths=depths, dims=[8, 16, 24, 32], num_classes=classes,
                                drop_path_rate=0.0)
    report = load_pretrained_into(ours, path)
    assert report.layout == "simple-convnext layout" and report.reinitialised == []
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = ours.eval()(x), theirs(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5) and a.abs().max() > 1e-3


def test_isoconv_load_refuses_bare_seed_weights_and_points_at_pretrained(tmp_path):
    from isoconv.errors import UserError

    save_xl_study_file(randomise(study_convmixer_xl(8, 6, 5, 2, 10, 3, nn.SiLU()), seed=1), tmp_path / "CM-XL.pkl")
    torch.save({"model_state": SeedConvNext(10, 1, [8, 16], [1, 1]).state_dict()}, tmp_path / "convnext.pt")
    for path, layout in [(tmp_path / "CM-XL.pkl", "ConvMixer-XL study's grouped (CM-XL) layout"),
                         (tmp_path / "convnext.pt", "simple-convnext layout")]:
        with pytest.raises(UserError) as e:
            isoconv.load(path)
        message = str(e.value)
        assert f"holds bare weights ({layout}) without isoconv metadata" in message
        assert "isoconv.load(path, model=NAME" in message and f"--pretrained {path}" in message


def test_isoconv_load_reads_seed_weights_when_told_the_preset(tmp_path):
    """With the preset named, isoconv.load makes a ready model of a seed's own file: the seed's outputs, and the
    seed's preprocessing (CIFAR-10 statistics for the XL study, none for simple-convnext)."""
    theirs = randomise(study_convmixer_xl(8, 6, 5, 2, 10, 3, nn.SiLU()), seed=3)
    save_xl_study_file(theirs, tmp_path / "CM-XL.pkl")
    model, preprocess = isoconv.load(tmp_path / "CM-XL.pkl", model="cm-xl", dim=8, depth=6)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(x), theirs(x))
    assert not model.training and preprocess.classes[0] == "airplane" and preprocess.mean[0] == pytest.approx(0.4914)
    seed = randomise(SeedConvNext(10, 1, [8, 16, 24, 32], [1, 1, 1, 1]), seed=5)
    torch.save({"model_state": seed.state_dict()}, tmp_path / "convnext.pt")
    model, preprocess = isoconv.load(tmp_path / "convnext.pt", model="convnext-cifar", dims=[8, 16, 24, 32],
                                     depths=[1, 1, 1, 1])
    with torch.no_grad():
        assert torch.allclose(model(x), seed(x), atol=1e-5, rtol=1e-5)
    assert preprocess.mean == (0.0, 0.0, 0.0) and preprocess.std == (1.0, 1.0, 1.0)  # the seed did not normalize
