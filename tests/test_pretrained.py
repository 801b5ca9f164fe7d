"""--pretrained: timm, original and isoconv layouts load (same outputs), heads are replaced, mismatches are clear."""
import re
from pathlib import Path

import pytest
from conftest import captured_logs
import torch
import torch.nn.functional as F
from timm.models.convmixer import ConvMixer as TimmConvMixer
from timm.models.convnext import ConvNeXt as TimmConvNeXt
from torch import nn

import isoconv
from isoconv.config import build_config
from isoconv.errors import UserError
from isoconv.interop.export import export_target
from isoconv.weights.pretrained import load_pretrained_into
from isoconv.weights.checkpoint import save_checkpoint
from isoconv.train.setup import build_training


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every tensor random (BN statistics, norms, layer scales too), so a misplaced tensor changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3 + (1.0 if name.endswith(("norm.weight",)) else 0))
    return model.eval()


def save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def same_outputs(ours: nn.Module, theirs: nn.Module, image_size: int = 16) -> float:
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = ours.eval()(x), theirs.eval()(x)
    assert b.abs().max() > 1e-2
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- foreign layouts, built here

class PaperResidual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def paper_convmixer(dim, depth, kernel_size, patch_size, n_classes) -> nn.Sequential:
    """The ConvMixer paper's flat nn.Sequential."""
    return nn.Sequential(
        nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size), nn.GELU(), nn.BatchNorm2d(dim),
        *[nn.Sequential(PaperResidual(nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                                                    nn.GELU(), nn.BatchNorm2d(dim))),
                        nn.Conv2d(dim, dim, kernel_size=1), nn.GELU(), nn.BatchNorm2d(dim)) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, n_classes))


class ChannelsFirstLayerNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, 1e-6).permute(0, 3, 1, 2)


def original_downsampling(dims, patch) -> nn.ModuleList:
    """downsample_layers of the facebookresearch code (and of the simple-convnext seed): stem, then LN + 2x2 conv."""
    layers = [nn.Sequential(nn.Conv2d(3, dims[0], patch, stride=patch), ChannelsFirstLayerNorm(dims[0]))]
    layers += [nn.Sequential(ChannelsFirstLayerNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
               for i in range(len(dims) - 1)]
    return nn.ModuleList(layers)


class FacebookBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class FacebookConvNeXt(nn.Module):
    """The original ConvNeXt's module names: downsample_layers, stages.N.M.*, norm, head."""

    def __init__(self, depths, dims, patch, num_classes):
        super().__init__()
        self.downsample_layers = original_downsampling(dims, patch)
        self.stages = nn.ModuleList(nn.Sequential(*[FacebookBlock(d) for _ in range(n)]) for n, d in zip(depths, dims))
        self.norm, self.head = nn.LayerNorm(dims[-1], eps=1e-6), nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean([-2, -1])))


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(self.dims)


class SeedBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), 1e-6))

    def forward(self, x):
        return self.block(x) * self.gamma


class SeedLayer(nn.Module):
    def __init__(self, dim, depth):
        super().__init__()
        self.blocks = nn.ModuleList(SeedBlock(dim) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


class SeedConvNeXt(nn.Module):
    """The simple-convnext seed's names: downsample_layers, stage_layers.N.blocks.M.block.K, gamma (C,1,1), cls."""

    def __init__(self, depths, dims, patch, num_classes):
        super().__init__()
        self.downsample_layers = original_downsampling(dims, patch)
        self.stage_layers = nn.ModuleList(SeedLayer(d, n) for n, d in zip(depths, dims))
        self.cls = nn.Sequential(nn.LayerNorm(dims[-1], eps=1e-6), nn.Linear(dims[-1], num_classes))

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stage_layers):
            x = stage(down(x))
        return self.cls(x.mean(dim=(-2, -1)))


# ----------------------------------------------------------------------------- layouts load with equal outputs

def test_timm_convmixer_loads_unchanged(tmp_path):
    theirs = randomise(TimmConvMixer(dim=16, depth=3, kernel_size=5, patch_size=4, num_classes=10,
                                     act_layer=nn.ReLU), seed=1)
    ours = isoconv.create_model("cm-cpu", dim=16, depth=3)
    report = load_pretrained_into(ours, save(theirs.state_dict(), tmp_path / "timm.pth"))
    assert same_outputs(ours, theirs) == 0.0
    assert report.loaded == list(ours.state_dict()) and report.converted == []
    assert report.reinitialised == [] and report.ignored == []


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_timm_convnext_loads_with_renamed_keys(tmp_path, conv_mlp):
    theirs = randomise(TimmConvNeXt(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), patch_size=1, num_classes=10,
                                    conv_mlp=conv_mlp), seed=2)
    ours = isoconv.create_model("convnext-cifar", depths=[1, 1, 2, 1], dims=[8, 16, 24, 32])
    report = load_pretrained_into(ours, save({"state_dict": theirs.state_dict()}, tmp_path / "timm.pth"))
    assert same_outputs(ours, theirs) < 1e-5
    assert ("stages.2.blocks.1.mlp.fc1.weight", "stages.2.blocks.1.fc1.weight") in report.converted
    assert ("head.norm.weight", "head_norm.weight") in report.converted
    assert ("head.fc.bias", "head.bias") in report.converted
    assert "stages.1.downsample.1.weight" in report.loaded
    assert len(report.loaded) + len(report.converted) == len(ours.state_dict())


def test_original_flat_convmixer_loads(tmp_path):
    theirs = randomise(paper_convmixer(dim=16, depth=3, kernel_size=5, patch_size=2, n_classes=10), seed=3)
    ours = isoconv.create_model("cm-vanilla", dim=16, depth=3)
    report = load_pretrained_into(ours, save(theirs.state_dict(), tmp_path / "paper.pth"))
    assert same_outputs(ours, theirs) < 1e-6
    converted = dict(report.converted)
    assert converted["0.weight"] == "stem.0.weight" and converted["2.running_var"] == "stem.2.running_var"
    assert converted["3.0.fn.0.weight"] == "blocks.0.0.fn.0.weight" and converted["5.3.bias"] == "blocks.2.3.bias"
    assert converted["8.weight"] == "head.weight"  # 3 + depth 3 + pool + flatten
    assert len(report.converted) == len(ours.state_dict()) and report.loaded == []


def test_original_facebook_convnext_loads(tmp_path):
    theirs = randomise(FacebookConvNeXt(depths=[1, 2, 1], dims=[8, 12, 16], patch=2, num_classes=10), seed=4)
    ours = isoconv.create_model("convnext-cifar", depths=[1, 2, 1], dims=[8, 12, 16], patch_size=2)
    report = load_pretrained_into(ours, save({"model": theirs.state_dict()}, tmp_path / "fb.pth"))
    assert same_outputs(ours, theirs) < 1e-5
    converted = dict(report.converted)
    assert converted["downsample_layers.0.0.weight"] == "stem.0.weight"
    assert converted["downsample_layers.2.1.weight"] == "stages.2.downsample.1.weight"
    assert converted["stages.1.1.pwconv2.weight"] == "stages.1.blocks.1.fc2.weight"
    assert converted["stages.1.1.gamma"] == "stages.1.blocks.1.gamma"
    assert converted["norm.weight"] == "head_norm.weight"
    assert "head.weight" in report.loaded


def test_simple_convnext_seed_layout_loads(tmp_path):
    theirs = randomise(SeedConvNeXt(depths=[2, 1], dims=[8, 16], patch=1, num_classes=10), seed=5)
    ours = isoconv.create_model("convnext-cifar", depths=[2, 1], dims=[8, 16])
    report = load_pretrained_into(ours, save(theirs.state_dict(), tmp_path / "seed.pth"))
    assert same_outputs(ours, theirs) < 1e-5
    converted = dict(report.converted)
    assert converted["stage_layers.0.blocks.1.block.3.weight"] == "stages.0.blocks.1.fc1.weight"
    assert converted["stage_layers.1.blocks.0.gamma"] == "stages.1.blocks.0.gamma"  # (C, 1, 1) -> (C,)
    assert converted["cls.0.weight"] == "head_norm.weight" and converted["cls.1.bias"] == "head.bias"


def make_isoconv_run(run_dir: Path, **overrides) -> nn.Module:
    cfg = build_config(model="cm-cpu", dim=16, depth=2, **overrides)
    model = randomise(isoconv.create_model("cm-cpu", num_classes=10, **cfg.model_overrides()), seed=6)
    run_dir.mkdir(parents=True)
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 1, "params": 0,
                     "data": {"classes": [str(i) for i in range(10)], "mean": [0.5] * 3, "std": [0.25] * 3,
                              "image_size": 32, "dataset": "cifar10"}}, run_dir / "last.pt")
    return model


def test_isoconv_run_dir_and_its_safetensors_export_load(tmp_path):
    source = make_isoconv_run(tmp_path / "run")
    for path in (tmp_path / "run", export_target(tmp_path / "run" / "last.pt", "safetensors").path):
        ours = isoconv.create_model("cm-cpu", dim=16, depth=2)
        report = load_pretrained_into(ours, path)
        assert same_outputs(ours, source, image_size=32) == 0.0
        assert report.loaded == list(ours.state_dict()) and "isoconv" in report.layout


def test_parameter_free_differences_are_noted(tmp_path):
    make_isoconv_run(tmp_path / "run", activation="gelu")
    ours = isoconv.create_model("cm-cpu", dim=16, depth=2)  # ReLU
    report = load_pretrained_into(ours, tmp_path / "run")
    assert "the weights were trained with activation 'gelu', this model uses 'relu'" in report.notes


# ----------------------------------------------------------------------------- class counts, mismatches, bad files

def test_class_count_change_reinitialises_the_head_and_reports_it(tmp_path, capsys):
    theirs = randomise(TimmConvMixer(dim=16, depth=2, kernel_size=5, patch_size=4, num_classes=1000,
                                     act_layer=nn.ReLU), seed=7)
    ours = isoconv.create_model("cm-cpu", dim=16, depth=2)
    fresh_head = ours.head.weight.detach().clone()
    with captured_logs() as logged:
        report = load_pretrained_into(ours, save(theirs.state_dict(), tmp_path / "in1k.pth"))
    assert report.reinitialised == ["head.weight", "head.bias"] and report.ignored == ["head.weight", "head.bias"]
    assert torch.equal(ours.head.weight, fresh_head)
    assert torch.equal(ours.blocks[1][1].weight, theirs.blocks[1][1].weight)
    assert len(report.loaded) == len(ours.state_dict()) - 2
    out = "\n".join(logged)
    assert "2 re-initialised, 2 ignored" in out and "re-initialised: head.weight, head.bias" in out
    assert "the file has 1000 classes, the model 10" in out


@pytest.mark.parametrize("overrides,expected", [
    (dict(dim=16, depth=3), r"blocks\.2\.0\.fn\.0\.weight is missing from the file.*the file holds ConvMixer dim 16, "
                            r"depth 2, kernel 5, patch 4, the model is ConvMixer dim 16, depth 3"),
    (dict(dim=16, depth=1), r"blocks\.1\.0\.fn\.0\.weight has no place in the model"),
    (dict(dim=24, depth=2), r"stem\.0\.weight is \(16, 3, 4, 4\) in the file but \(24, 3, 4, 4\) in the model"),
    (dict(dim=16, depth=2, kernel_size=7), r"kernel 5, patch 4, the model is ConvMixer dim 16, depth 2, kernel 7"),
])
def test_mismatched_architecture_is_a_clear_error(tmp_path, overrides, expected):
    theirs = TimmConvMixer(dim=16, depth=2, kernel_size=5, patch_size=4, num_classes=10)
    path = save(theirs.state_dict(), tmp_path / "w.pth")
    with pytest.raises(UserError, match=expected):
        load_pretrained_into(isoconv.create_model("cm-cpu", **overrides), path)


def test_wrong_family_unknown_layout_and_bad_files_are_clear_errors(tmp_path):
    convnext = TimmConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_classes=10)
    path = save(convnext.state_dict(), tmp_path / "convnext.pth")
    with pytest.raises(UserError, match="holds convnext weights .timm ConvNeXt layout. but the model is a convmixer"):
        load_pretrained_into(isoconv.create_model("cm-cpu", dim=8, depth=1), path)
    resnet = save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, tmp_path / "r.pth")
    with pytest.raises(UserError, match=re.escape("unrecognised weight names (first: conv1.weight, fc.weight)")):
        load_pretrained_into(isoconv.create_model("cm-cpu"), resnet)
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a whole module, not a state dict
    with pytest.raises(UserError, match="refusing to load .*pickled.pth"):
        load_pretrained_into(isoconv.create_model("cm-cpu"), tmp_path / "pickled.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="cannot read .*garbage.pth as a PyTorch weights file"):
        load_pretrained_into(isoconv.create_model("cm-cpu"), tmp_path / "garbage.pth")
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(UserError, match="an exported onnx model cannot seed training"):
        load_pretrained_into(isoconv.create_model("cm-cpu"), tmp_path / "model.onnx")
    with pytest.raises(UserError, match="missing.pth does not exist"):
        load_pretrained_into(isoconv.create_model("cm-cpu"), tmp_path / "missing.pth")


def test_training_starts_from_pretrained_weights(data_root, tmp_path, capsys):
    theirs = randomise(TimmConvMixer(dim=16, depth=1, kernel_size=5, patch_size=4, num_classes=100,
                                     act_layer=nn.ReLU), seed=8)
    path = save(theirs.state_dict(), tmp_path / "cifar100.pth")
    cfg = build_config(model="cm-cpu", dim=16, depth=1, train_subset=64, test_subset=32, data_dir=str(data_root),
                       pretrained=str(path), device="cpu")
    with captured_logs() as logged:
        setup = build_training(cfg)
    assert torch.equal(setup.model.stem[0].weight.cpu(), theirs.stem[0].weight)
    assert setup.model.head.weight.shape == (10, 16)
    out = "\n".join(logged)
    assert f"pretrained weights from {path}" in out and "the file has 100 classes, the model 10" in out
