"""Tests for isoconv.models: presets, timm parity, ConvMixer-XL skips, ConvNeXt, DropPath, registry."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth as TorchvisionStochasticDepth

from isoconv.errors import ConfigError
from isoconv.models.convnext import StochasticDepth
from isoconv.models.presets import PRESETS as PRESET_TABLE, preset_params
from isoconv.models import (
    ConvMixer,
    ConvNeXt,
    count_params,
    create_model,
    list_models,
    model_info,
    register_model,
)

EXPECTED_PARAMS = {
    "cm-vanilla": 594_186,
    "cm-vanilla-relu": 594_186,
    "cm-vanilla-silu": 594_186,
    "cm-xl-noskip": 4_855_562,
    "cm-xl-skip": 4_855_562,
    "cm-xl": 4_855_562,
    "convmixer-256-8-k9-p1": 706_570,
    "convnext-cifar": 6_378_378,
    "convnext-tin": 27_970_472,
}
PRESETS = [*EXPECTED_PARAMS, "cm-cpu"]

ACT_TYPES = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU}


@functools.lru_cache(maxsize=None)
def preset(name: str) -> nn.Module:
    """Each default preset built once per session (convnext-tin alone is 28M parameters)."""
    return create_model(name)


def convmixer_formula(dim: int, depth: int, kernel_size: int, patch_size: int, num_classes: int, in_chans: int = 3) -> int:
    """Parameter count of a ConvMixer, derived by hand from the architecture."""
    stem = in_chans * patch_size**2 * dim + dim + 2 * dim  # conv + bias + BN
    block = (dim * kernel_size**2 + dim + 2 * dim) + (dim * dim + dim + 2 * dim)  # dw + BN, pw + BN
    return stem + depth * block + dim * num_classes + num_classes


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial affine params and running stats, so eval-mode checks mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_preset_param_count_exact(name: str) -> None:
    model = preset(name)
    assert count_params(model) == EXPECTED_PARAMS[name]
    assert model_info(name)["params"] == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", PRESETS)
def test_closed_form_param_count_is_the_built_models(name: str) -> None:
    """`isoconv models` counts parameters without torch (models/presets.py); they are the built model's."""
    assert list(PRESET_TABLE) == list_models()[:len(PRESET_TABLE)]
    assert preset_params(name) == count_params(preset(name))


@pytest.mark.parametrize("name, overrides", [
    ("cm-cpu", dict(dim=24, depth=3, kernel_size=4, patch_size=3, num_classes=7, in_chans=1)),
    ("cm-xl", dict(depth=6, skip_period=2, activation="relu")),
    ("convnext-cifar", dict(dims=[8, 16, 24], depths=[1, 2, 3], kernel_size=5, num_classes=100, in_chans=4)),
    ("convnext-cifar", dict(depth=3, layer_scale_init=0.0, patch_size=2)),
    ("convnext-tin", dict(dims=[8, 16], depths=[2, 1], drop_path_rate=0.2)),
])
def test_closed_form_param_count_with_overrides(name: str, overrides: dict) -> None:
    with torch.device("meta"):
        model = create_model(name, **overrides)
    assert preset_params(name, **overrides) == count_params(model)


def test_cm_cpu_is_a_convmixer_with_formula_count() -> None:
    # cm-cpu's numbers may change; check it against the hand formula for whatever they are.
    info = model_info("cm-cpu")
    d = info["defaults"]
    model = create_model("cm-cpu")
    assert isinstance(model, ConvMixer) and info["family"] == "convmixer"
    expected = convmixer_formula(d["dim"], d["depth"], d["kernel_size"], d["patch_size"], d["num_classes"])
    assert count_params(model) == expected == info["params"]


def test_convmixer_formula_matches_presets() -> None:
    assert convmixer_formula(256, 8, 5, 2, 10) == 594_186
    assert convmixer_formula(256, 66, 5, 2, 10) == 4_855_562
    assert convmixer_formula(256, 8, 9, 1, 10) == 706_570


def test_count_params_trainable_only() -> None:
    model = ConvMixer(dim=8, depth=2, kernel_size=3, patch_size=2, num_classes=4)
    total = count_params(model)
    model.head.weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == total - 8 * 4


# ----------------------------------------------------------------------------- timm parity


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(
    "kwargs, activation, act_layer, size",
    [
        (dict(dim=256, depth=8, kernel_size=5, patch_size=2), "gelu", nn.GELU, 16),
        (dict(dim=32, depth=3, kernel_size=4, patch_size=2), "relu", nn.ReLU, 16),  # even kernel, "same" padding
        (dict(dim=256, depth=8, kernel_size=9, patch_size=1), "gelu", nn.GELU, 16),
    ],
    ids=["256-8-k5-p2", "32-3-k4-p2-relu", "256-8-k9-p1"],
)
def test_timm_parity(kwargs: dict, activation: str, act_layer: type, size: int) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.models.convmixer.ConvMixer(**kwargs, num_classes=10, act_layer=act_layer)
    randomize_bn(ref)
    ours = ConvMixer(**kwargs, num_classes=10, activation=activation)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval()
    ours.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = ref(x)
        got = ours(x)
        feats = ours.forward_features(x)
    assert got.shape == (2, 10)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(feats, ref.forward_features(x))
    stride = kwargs["patch_size"]
    assert feats.shape == (2, kwargs["dim"], size // stride, size // stride)


# ----------------------------------------------------------------------------- ConvMixer structure


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "leaky_relu", "GELU", "swish"])
def test_activations_are_fresh_instances_of_the_right_type(activation: str) -> None:
    depth = 4
    model = ConvMixer(dim=8, depth=depth, kernel_size=3, patch_size=2, activation=activation)
    canonical = {"GELU": "gelu", "swish": "silu"}.get(activation, activation)
    expected_type = ACT_TYPES[canonical]
    acts = [m for m in model.modules() if type(m) in ACT_TYPES.values()]
    assert len(acts) == 1 + 2 * depth  # stem + (depthwise, pointwise) per block
    assert all(type(a) is expected_type for a in acts)
    assert len({id(a) for a in acts}) == len(acts)
    assert model.config["activation"] == canonical
    # activation sits before BatchNorm everywhere
    assert type(model.stem[1]) is expected_type and isinstance(model.stem[2], nn.BatchNorm2d)
    block = model.blocks[0]
    assert type(block[0].fn[1]) is expected_type and isinstance(block[0].fn[2], nn.BatchNorm2d)
    assert type(block[2]) is expected_type and isinstance(block[3], nn.BatchNorm2d)


def test_skip_period_matches_manual_group_residuals() -> None:
    torch.manual_seed(0)
    model = ConvMixer(dim=16, depth=6, kernel_size=3, patch_size=2, num_classes=5, skip_period=3)
    randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = model.stem(x)
        for start in range(0, 6, 2):  # 3 groups of 2 blocks
            h = h + model.blocks[start : start + 2](h)
        expected = model.head(model.pooling(h))
        got = model(x)
        # the same weights without group skips give a different output
        plain = ConvMixer(dim=16, depth=6, kernel_size=3, patch_size=2, num_classes=5, skip_period=0)
        plain.load_state_dict(model.state_dict(), strict=True)
        plain.eval()
        no_skip = plain(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, no_skip)
    torch.testing.assert_close(no_skip, plain.head(plain.pooling(plain.blocks(plain.stem(x)))))


def test_cm_xl_groups_and_same_parameter_names() -> None:
    skip, noskip = preset("cm-xl-skip"), preset("cm-xl-noskip")
    assert skip.skip_period == 3 and skip.group_size == 22 and len(skip.blocks) == 66
    assert noskip.skip_period == 0
    assert list(skip.state_dict()) == list(noskip.state_dict())
    xl = preset("cm-xl")
    assert xl.config["activation"] == "silu" and xl.group_size == 22


def test_skip_period_must_divide_depth() -> None:
    with pytest.raises(ConfigError, match=r"depth 10 .*skip_period 3"):
        ConvMixer(dim=8, depth=10, kernel_size=3, patch_size=2, skip_period=3)
    with pytest.raises(ConfigError, match=r"depth 8 .*skip_period 3"):
        create_model("cm-vanilla", skip_period=3)
    with pytest.raises(ConfigError, match="-1"):
        ConvMixer(dim=8, depth=4, skip_period=-1)


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(patch_size=40, image_size=32), ["40", "32", "patch_size", "image_size"]),
        (dict(dim=0), ["dim", "0"]),
        (dict(patch_size=0), ["patch_size must be positive, got 0"]),
        (dict(depth=-2), ["depth", "-2"]),
        (dict(kernel_size=2.5), ["kernel_size", "2.5"]),
        (dict(num_classes=0), ["num_classes", "0"]),
        (dict(activation="tanhh"), ["tanhh", "gelu", "relu", "silu", "leaky_relu"]),
    ],
)
def test_convmixer_invalid_args(kwargs: dict, fragments: list) -> None:
    args = dict(dim=8, depth=2, kernel_size=3, patch_size=2)
    args.update(kwargs)
    with pytest.raises(ConfigError) as exc:
        ConvMixer(**args)
    assert isinstance(exc.value, ValueError)
    for fragment in fragments:
        assert fragment in str(exc.value)


def test_convmixer_image_size_equal_to_patch_is_allowed() -> None:
    model = ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=4, image_size=4)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 1000)


def test_convmixer_head_api_and_reset_classifier() -> None:
    model = ConvMixer(dim=8, depth=2, kernel_size=3, patch_size=2, num_classes=10)
    assert model.num_features == 8
    x = torch.randn(2, 3, 8, 8)
    feats = model.forward_features(x)
    assert feats.shape == (2, 8, 4, 4)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 8)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.config["num_classes"] == 3 and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 8)


# ----------------------------------------------------------------------------- ConvNeXt


def test_convnext_cifar_shapes() -> None:
    torch.manual_seed(0)
    model = preset("convnext-cifar").eval()
    assert isinstance(model, ConvNeXt) and model.num_features == 512
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model.forward_head(feats)
    assert feats.shape == (2, 512, 4, 4)
    assert out.shape == (2, 10)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 512)


def test_convnext_tin_shape_and_drop_path_rates() -> None:
    torch.manual_seed(0)
    model = preset("convnext-tin").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 200)
    rates = [block.drop_path.p for stage in model.stages for block in stage.blocks]
    assert len(rates) == 18
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates == sorted(rates)
    assert rates == pytest.approx(torch.linspace(0, 0.1, 18).tolist())


def test_convnext_layout_and_init() -> None:
    model = ConvNeXt(patch_size=1, depths=(1, 1, 1), dims=(8, 16, 32), num_classes=4)
    assert isinstance(model.stages[0].downsample, nn.Identity)
    downsamples = [s.downsample for s in model.stages[1:]]
    assert len(downsamples) == 2
    for ds in downsamples:
        assert isinstance(ds[1], nn.Conv2d) and ds[1].kernel_size == (2, 2) and ds[1].stride == (2, 2)
    block = model.stages[1].blocks[0]
    assert block.gamma is not None and torch.all(block.gamma == 1e-6) and block.gamma.shape == (16,)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.all(m.bias == 0)
    # no layer scale: one gamma of size dims[i] fewer per block
    no_ls = ConvNeXt(patch_size=1, depths=(1, 1, 1), dims=(8, 16, 32), num_classes=4, layer_scale_init=0)
    assert no_ls.stages[0].blocks[0].gamma is None
    assert count_params(model) - count_params(no_ls) == 8 + 16 + 32
    # big layer gives trunc-normal std ~ 0.02
    big = ConvNeXt(patch_size=1, depths=(1,), dims=(256,), num_classes=10)
    std = big.stages[0].blocks[0].fc1.weight.std().item()
    assert 0.018 < std < 0.022


def test_convnext_block_residual_and_layer_scale() -> None:
    # With gamma = 0 every block is the identity, so the features are the stem's output (downsampled).
    model = ConvNeXt(patch_size=2, depths=(2,), dims=(8,), num_classes=3).eval()
    with torch.no_grad():
        model.stages[0].blocks[0].gamma.zero_()
        model.stages[0].blocks[1].gamma.zero_()
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(model.forward_features(x), model.stem(x))


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(depths=(2, 2), dims=(8, 16, 32)), ["depths", "dims", "2", "3"]),
        (dict(patch_size=2, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), image_size=8), ["16", "image_size 8"]),
        (dict(dims=(8, 0)), ["dims[1]", "0"]),
        (dict(drop_path_rate=1.5), ["drop_path_rate", "1.5"]),
        (dict(kernel_size=4), ["kernel_size", "4"]),
    ],
)
def test_convnext_invalid_args(kwargs: dict, fragments: list) -> None:
    args = dict(depths=(1, 1), dims=(8, 16))
    args.update(kwargs)
    with pytest.raises(ConfigError) as exc:
        ConvNeXt(**args)
    for fragment in fragments:
        assert fragment in str(exc.value)


def test_convnext_tin_rejects_too_small_image() -> None:
    with pytest.raises(ConfigError, match=r"total stride.*16.*image_size 8"):
        create_model("convnext-tin", image_size=8)


# ----------------------------------------------------------------------------- stochastic depth


def dropped_and_kept(mode: str):
    torch.manual_seed(0)
    model = create_model("convnext-cifar", dims=[8, 8, 8, 8], depths=[1, 1, 1, 1], drop_path_rate=0.5,
                         drop_path_mode=mode)
    block = model.stages[-1].blocks[-1]
    assert block.drop_path.p == pytest.approx(0.5) and block.drop_path.mode == mode
    x = torch.ones(64, 3, 4, 4)
    flat = block.drop_path.train()(x).reshape(64, -1)
    return (flat == 0).all(dim=1), (flat == 2).all(dim=1), block.drop_path


def test_drop_path_is_per_sample_by_default() -> None:
    dropped, kept, dp = dropped_and_kept("row")
    assert torch.all(dropped | kept)  # every sample is either fully dropped or fully kept (scaled by 1/keep)
    assert dropped.any() and kept.any()
    x = torch.ones(4, 3, 4, 4)
    assert torch.equal(dp.eval()(x), x)


def test_batch_mode_drops_the_whole_batch_as_the_seed_did() -> None:
    for seed in range(4):
        dropped, kept, _ = dropped_and_kept("batch")
        assert bool(dropped.all()) or bool(kept.all())  # all samples share one draw


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.875, 1.0])
def test_stochastic_depth_matches_torchvision(p: float, mode: str) -> None:
    """isoconv's StochasticDepth (no torchvision import at start-up) is torchvision's: same repr, no state, and from
    the same seed the same draws and the same result, in training and in eval."""
    ours, theirs = StochasticDepth(p, mode), TorchvisionStochasticDepth(p, mode)
    assert repr(ours) == repr(theirs) and ours.state_dict() == theirs.state_dict() == {}
    x = torch.randn(64, 3, 4, 4)
    outputs = {}
    for training in (True, False):
        for module in (ours, theirs):
            torch.manual_seed(7)
            outputs[training, module is ours] = module.train(training)(x)
        assert torch.equal(outputs[training, True], outputs[training, False])
    assert torch.equal(outputs[False, True], x)
    dropped = (outputs[True, True] == 0).flatten(1).all(dim=1)
    expected = {0.0: "none", 1.0: "all"}.get(p, "some" if mode == "row" else None)
    if expected is not None:
        assert {"none": not dropped.any(), "all": dropped.all(), "some": dropped.any() and not dropped.all()}[expected]


def test_invalid_drop_path_settings_raise() -> None:
    with pytest.raises(ConfigError, match="1.0"):
        create_model("convnext-cifar", drop_path_rate=1.0)
    with pytest.raises(ConfigError, match="drop_path_mode must be row or batch"):
        create_model("convnext-cifar", drop_path_mode="column")


# ----------------------------------------------------------------------------- registry


def test_list_models_contains_all_presets() -> None:
    names = list_models()
    assert set(PRESETS) <= set(names)
    assert len(names) == len(set(names))


def test_unknown_model_suggests_close_name() -> None:
    with pytest.raises(ConfigError) as exc:
        create_model("cm-vanila")
    assert str(exc.value) == "unknown model 'cm-vanila' (did you mean cm-vanilla?); `isoconv models` lists them"
    with pytest.raises(ConfigError, match="unknown model 'resnet50'"):
        model_info("resnet50")


@pytest.mark.parametrize(
    "name, key",
    [("convnext-cifar", "skip_period"), ("convnext-tin", "kernel_size_list"), ("cm-vanilla", "drop_path_rate"), ("cm-xl", "depths")],
)
def test_override_not_accepted_by_family_raises(name: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        create_model(name, **{key: 1})
    assert repr(key) in str(exc.value) and repr(name) in str(exc.value)


def test_overrides_apply() -> None:
    model = create_model(
        "cm-vanilla",
        dim=128,
        depth=4,
        kernel_size=3,
        patch_size=2,
        activation="relu",
        skip_period=2,
        num_classes=100,
        image_size=32,
    )
    assert model.config == dict(
        dim=128, depth=4, kernel_size=3, patch_size=2, num_classes=100, in_chans=3,
        activation="relu", skip_period=2, image_size=32,
    )
    assert model.group_size == 2 and model.head.out_features == 100
    assert count_params(model) == convmixer_formula(128, 4, 3, 2, 100)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    cn = create_model("convnext-cifar", dims=[8, 16, 32, 64], drop_path_rate=0.2, num_classes=100, image_size=32)
    assert cn.config["dims"] == [8, 16, 32, 64] and cn.config["depths"] == [2, 2, 2, 2]
    assert cn.config["drop_path_rate"] == 0.2 and cn.head.out_features == 100
    assert cn.stages[-1].blocks[-1].drop_path.p == pytest.approx(0.2)


def test_none_overrides_mean_preset_default() -> None:
    model = create_model("cm-vanilla", drop_path_rate=None, num_classes=None, depth=None, dim=32)
    assert model.config["num_classes"] == 10 and model.config["depth"] == 8 and model.config["dim"] == 32
    # the preset defaults are not mutated by a build or by model_info callers
    info = model_info("convnext-cifar")
    info["defaults"]["dims"].append(1)
    assert model_info("convnext-cifar")["defaults"]["dims"] == [64, 128, 256, 512]


def test_model_info_fields() -> None:
    info = model_info("cm-xl")
    assert info["name"] == "cm-xl" and info["family"] == "convmixer"
    assert info["description"]
    assert info["defaults"] == dict(
        dim=256, depth=66, kernel_size=5, patch_size=2, activation="silu", skip_period=3, num_classes=10
    )
    assert "skip_period" in info["accepts"] and "drop_path_rate" not in info["accepts"]
    assert model_info("convnext-tin")["family"] == "convnext"
    assert model_info("convnext-tin")["defaults"]["drop_path_rate"] == 0.1


def test_register_model_custom_preset(monkeypatch) -> None:
    from isoconv.models import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the preset is gone after this test
    name = "test-tiny-convmixer"
    if name not in list_models():

        @register_model(name, family="convmixer", defaults=dict(dim=8, depth=2, kernel_size=3, patch_size=2))
        def tiny(**kwargs) -> nn.Module:
            """Tiny test net."""
            return ConvMixer(**kwargs)

        assert isinstance(tiny(num_classes=3), ConvMixer)  # the decorated function applies the defaults
    model = create_model(name, num_classes=3)
    assert model.config["dim"] == 8 and model.num_classes == 3
    assert model_info(name)["description"] == "Tiny test net."
    with pytest.raises(ConfigError, match="already registered"):
        register_model(name)(lambda **kw: ConvMixer(**kw))


def test_convnext_activation_and_uniform_depth_for_ablations():
    from isoconv.models import create_model

    base = create_model("convnext-cifar")
    relu = create_model("convnext-cifar", activation="relu", depth=1)
    assert isinstance(base.stages[0].blocks[0].act, torch.nn.GELU)
    assert isinstance(relu.stages[3].blocks[0].act, torch.nn.ReLU)
    assert [len(s.blocks) for s in relu.stages] == [1, 1, 1, 1] and relu.config["depths"] == [1, 1, 1, 1]
    assert sum(p.numel() for p in create_model("convnext-cifar", depth=2).parameters()) == 6_378_378
    with pytest.raises(Exception, match="depth must be positive"):
        create_model("convnext-cifar", depth=0)
