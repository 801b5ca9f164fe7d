"""Issue 26: the settings that let the Keras, TF and simple-convnext seeds train as they did, each checked against a
reference written out here or in torchvision / scipy, and the recipes that use them."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import scipy.ndimage
import torch
import yaml
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from isoconv.augment import BatchAugment, normalize, torchvision_train_transform
from isoconv.augment.batched import affine_warp, sample_affine_params
from isoconv.augment.reference import KerasAffine
from isoconv.config import TrainConfig, build_config
from isoconv.data import normalization
from isoconv.data.dataset import ImageDataset
from isoconv.data.provenance import comparable
from isoconv.experiments.published import figure_note
from isoconv.experiments.results import RunResult, VariantResult
from isoconv.models import create_model
from isoconv.train import train
from isoconv.train.loop import on_eval_schedule, scheduled_evals

PKG = Path(__file__).resolve().parents[1] / "src" / "isoconv"
ALL_OFF = dict(scale=1.0, hflip=False, ra_n=0, jitter=0.0, reprob=0.0)
RAW = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def images(n: int, seed: int = 0, size: int = 24) -> torch.Tensor:
    """Smooth random images (so bilinear sampling differences stay within a gray level of rounding)."""
    low = torch.rand((n, 3, 5, 5), generator=gen(seed))
    smooth = nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (smooth.clamp(0, 1) * 255).round().to(torch.uint8)


def recipe(name: str) -> dict:
    return yaml.safe_load((PKG / "recipes" / f"{name}.yaml").read_text())


# ------------------------------------------------------------------------------------------ BatchNorm as Keras


def test_batchnorm_eps_and_momentum_follow_the_keras_update_rule():
    """--bn-eps 1e-3 --bn-momentum 0.01 against Keras' BatchNormalization(epsilon=1e-3, momentum=0.99), written
    out: in training y = gamma (h - mean_B) / sqrt(var_B + eps) + beta with the batch's biased variance, and
    moving = moving * 0.99 + batch * (1 - 0.99), the moving variance fed the unbiased batch variance (PyTorch's;
    Keras' unfused path feeds the biased one, n/(n-1) = 1 + 1.6e-2 apart at n = 64 here: docs/seed-fidelity.md);
    in inference y = gamma (h - moving_mean) / sqrt(moving_var + eps) + beta."""
    torch.manual_seed(0)
    model = create_model("cm-vanilla", dim=8, depth=1, kernel_size=3, patch_size=2, bn_eps=1e-3, bn_momentum=0.01)
    bn = model.stem[2]
    assert (bn.eps, bn.momentum) == (1e-3, 0.01)
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    keras_momentum, eps = 0.99, 1e-3
    moving_mean, moving_var = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    model.train()
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, generator=gen(step)) * (step + 1)
        h = model.stem[1](model.stem[0](x)).double().detach()
        y = model.stem(x).double()
        mean = h.mean(dim=(0, 2, 3))
        var_biased = h.var(dim=(0, 2, 3), unbiased=False)
        var_unbiased = h.var(dim=(0, 2, 3), unbiased=True)
        gamma, beta = bn.weight.double().view(1, -1, 1, 1), bn.bias.double().view(1, -1, 1, 1)
        want = gamma * (h - mean.view(1, -1, 1, 1)) / torch.sqrt(var_biased.view(1, -1, 1, 1) + eps) + beta
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        moving_mean = moving_mean * keras_momentum + mean * (1 - keras_momentum)
        moving_var = moving_var * keras_momentum + var_unbiased * (1 - keras_momentum)
        torch.testing.assert_close(bn.running_mean.double(), moving_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), moving_var, rtol=1e-5, atol=1e-6)
    model.eval()
    x = torch.randn(2, 3, 8, 8, generator=gen(9))
    h = model.stem[1](model.stem[0](x)).double().detach()
    want = (bn.weight.double().view(1, -1, 1, 1) * (h - moving_mean.view(1, -1, 1, 1))
            / torch.sqrt(moving_var.view(1, -1, 1, 1) + eps) + bn.bias.double().view(1, -1, 1, 1))
    torch.testing.assert_close(model.stem(x).double(), want, rtol=1e-5, atol=1e-5)
    # PyTorch's defaults (the preset's) would have moved the statistics ten times as far
    assert create_model("cm-vanilla", dim=8, depth=1).stem[2].momentum == 0.1


def test_batchnorm_settings_reach_the_model_through_the_config_and_are_checked():
    cfg = build_config("convmixer-keras-cifar100")
    assert cfg.model_overrides()["bn_eps"] == 1e-3 and cfg.model_overrides()["bn_momentum"] == 0.01
    from isoconv.models import build_model
    with torch.device("meta"):
        model = build_model(cfg, num_classes=100, image_size=32)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 1 + 2 * 8 and {(m.eps, m.momentum) for m in norms} == {(1e-3, 0.01)}
    with pytest.raises(Exception, match=r"--bn-momentum must be in \(0, 1\], got 1.5"):
        build_config(None, bn_momentum=1.5)
    with pytest.raises(Exception, match="--bn-eps does not apply to model 'convnext-cifar'"):
        build_model(build_config(None, model="convnext-cifar", bn_eps=1e-3), num_classes=10, image_size=32)


# ------------------------------------------------------------------------------------------------------- init


def glorot_bound(w: torch.Tensor) -> float:
    fan_in = w.shape[1] * w[0, 0].numel()
    fan_out = w.shape[0] * w[0, 0].numel()
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_glorot_init_draws_weights_with_the_glorot_variance_and_zero_biases():
    """Glorot-uniform: U[-a, a] with a = sqrt(6 / (fan_in + fan_out)), variance a^2 / 3 = 2 / (fan_in + fan_out);
    the fans as Keras counts them (depthwise (k, k, 1, C) / (k, k, C, 1): k^2 + C k^2 either way)."""
    torch.manual_seed(0)
    model = create_model("cm-vanilla", dim=96, depth=2, kernel_size=5, patch_size=2, init="glorot")
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 1 + 2 * 2 + 1
    for m in layers:
        w = m.weight.detach().double()
        a = glorot_bound(w)
        assert w.abs().max() <= a
        want = 2.0 / (w.shape[1] * w[0, 0].numel() + w.shape[0] * w[0, 0].numel())
        # sample variance of U[-a, a] over n >= 960 weights: relative standard error <= sqrt(0.8 / n) < 3%
        assert w.var().item() == pytest.approx(want, rel=0.12), (m, w.numel())
        assert torch.count_nonzero(m.bias) == 0
    dw = model.blocks[0][0].fn[0].weight  # depthwise (96, 1, 5, 5): fan_in 25, fan_out 2400
    assert glorot_bound(dw) == pytest.approx(math.sqrt(6.0 / (25 + 96 * 25)))
    # the same model with PyTorch's default init is visibly different (non-zero biases, smaller pointwise variance)
    torch.manual_seed(0)
    default = create_model("cm-vanilla", dim=96, depth=2, kernel_size=5, patch_size=2)
    pw = default.blocks[0][1].weight.detach().double()
    assert pw.var().item() == pytest.approx(1.0 / (3 * 96), rel=0.12)  # kaiming_uniform(a=sqrt(5)): 1/(3 fan_in)
    assert torch.count_nonzero(default.blocks[0][1].bias) > 0


def test_convnext_init_is_a_setting_and_torch_default_is_what_simple_convnext_used():
    torch.manual_seed(0)
    trunc = create_model("convnext-cifar", dims=[16, 32], depths=[1, 1])
    torch.manual_seed(0)
    torch_init = create_model("convnext-cifar", dims=[16, 32], depths=[1, 1], init="torch")
    head_t, head_d = trunc.head.weight.detach(), torch_init.head.weight.detach()
    assert head_t.std().item() == pytest.approx(0.02, rel=0.15) and torch.count_nonzero(trunc.head.bias) == 0
    # PyTorch's Linear default: U[-1/sqrt(fan_in), 1/sqrt(fan_in)] weights and biases
    assert head_d.abs().max() <= 1 / math.sqrt(32) and head_d.std().item() == pytest.approx(
        1 / math.sqrt(3 * 32), rel=0.2)
    assert torch.count_nonzero(torch_init.head.bias) > 0
    torch_init.reset_classifier(7)
    assert torch.count_nonzero(torch_init.head.bias) > 0  # a new head keeps the scheme
    glorot = create_model("convnext-cifar", dims=[16, 32], depths=[1, 1], init="glorot")
    glorot.reset_classifier(7)
    assert glorot.head.weight.abs().max() <= math.sqrt(6 / (32 + 7)) and torch.count_nonzero(glorot.head.bias) == 0
    assert build_config("convnext-cifar").init == "torch" and build_config("convnext-tin").init == "torch"


# ------------------------------------------------------------------------------------------- no normalization


def test_no_normalize_feeds_raw_unit_pixels_everywhere():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    ds = ImageDataset(x, torch.zeros(4, dtype=torch.int64), ["a"], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "t", "train")
    raw = normalization(ds, build_config(None, normalize=False))
    assert (raw.mean, raw.std) == RAW and normalization(ds, TrainConfig()) is ds
    torch.testing.assert_close(normalize(x, raw.mean, raw.std), x.float() / 255, rtol=1e-6, atol=1e-7)
    aug = BatchAugment(image_size=8, mean=raw.mean, std=raw.std, no_aug=True)
    torch.testing.assert_close(aug(x, gen(0)), x.float() / 255, rtol=1e-6, atol=1e-7)
    # pixel-mode erase noise is N(0, 1) on the [0, 1] scale, as the seed's (not a quarter of it after std ~0.25)
    cfg = build_config("convnext-cifar")
    assert cfg.normalize is False and cfg.erase_mode == "pixel" and cfg.pad_to == 64


def test_a_run_without_normalization_stores_raw_statistics(data_root, tmp_path):
    cfg = build_config(None, model="cm-cpu", dim=8, depth=1, epochs=1, normalize=False, train_subset=32,
                       test_subset=16, batch_size=16, amp="off", data_dir=str(data_root), out=str(tmp_path / "run"),
                       device="cpu")
    train(cfg)
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert (tuple(state["data"]["mean"]), tuple(state["data"]["std"])) == RAW
    assert state["config"]["normalize"] is False


# ---------------------------------------------------------------------------------------- Keras affine options


def test_region_zoom_and_fractional_shift_equal_torchvisions_bilinear_affine_per_image():
    """Keras' RandomZoom/ImageDataGenerator scale the *sampled region* by z and shift by fractions of a pixel:
    per image that is torchvision's F.affine (bilinear) with scale 1/z and translate -t/z. Max abs diff <= 1."""
    x = images(32, seed=2)
    aug = BatchAugment(image_size=24, mean=RAW[0], std=RAW[1], **ALL_OFF, rotate=10.0, zoom=0.2, shift=0.1,
                       affine_fill=50.0, affine_interpolation="bilinear", zoom_mode="region", fractional_shift=True)
    out = (aug(x, gen(4)) * 255).round()
    angle, tx, ty, z = aug.last_params["affine"]
    assert tx.dtype == torch.float32 and (tx != tx.round()).any()  # fractional shifts
    ref = torch.stack([TF.affine(x[i].float(), angle=float(angle[i]),
                                 translate=[-float(tx[i]) / float(z[i]), -float(ty[i]) / float(z[i])],
                                 scale=1.0 / float(z[i]), shear=[0.0, 0.0],
                                 interpolation=InterpolationMode.BILINEAR, fill=50.0)
                       for i in range(len(x))]).round()
    assert (out - ref).abs().max() <= 1
    assert len(set(angle.tolist())) == len(x) and len(set(z.tolist())) == len(x)


@pytest.mark.parametrize("fill_mode", ["nearest", "reflect"])
def test_independent_xy_zoom_and_keras_fill_modes_equal_scipy_per_image(fill_mode):
    """ImageDataGenerator resamples with scipy.ndimage.affine_transform(order=1, mode=fill_mode) and the matrix
    rotation @ shift @ zoom about the centre: the batched warp equals it per image (max abs diff <= 1)."""
    x = images(12, seed=3)
    params = sample_affine_params(12, 24, 24, 20.0, 0.2, 0.3, gen(5), "cpu", fractional_shift=True, zoom_xy=True)
    angle, tx, ty, zoom = params
    assert zoom.shape == (12, 2) and not torch.equal(zoom[:, 0], zoom[:, 1])
    out = affine_warp(x, *params, interpolation="bilinear", fill_mode=fill_mode, zoom_mode="region-xy")
    c = (24 - 1) / 2
    for i in range(len(x)):
        th, zx, zy = math.radians(float(angle[i])), float(zoom[i, 0]), float(zoom[i, 1])
        # input (x, y) = R (Z o + t) about the centre, R = [[cos, sin], [-sin, cos]]; scipy works in (row, col)
        a = [[math.cos(th) * zx, math.sin(th) * zy], [-math.sin(th) * zx, math.cos(th) * zy]]
        b = [math.cos(th) * float(tx[i]) + math.sin(th) * float(ty[i]),
             -math.sin(th) * float(tx[i]) + math.cos(th) * float(ty[i])]
        m_rc = [[a[1][1], a[1][0]], [a[0][1], a[0][0]]]
        offset = [c - (m_rc[0][0] * c + m_rc[0][1] * c) + b[1], c - (m_rc[1][0] * c + m_rc[1][1] * c) + b[0]]
        for ch in range(3):
            want = scipy.ndimage.affine_transform(x[i, ch].double().numpy(), m_rc, offset=offset, order=1,
                                                  mode=fill_mode)
            assert (out[i, ch].double() - torch.from_numpy(want).round()).abs().max() <= 1, (i, ch)


def test_fill_modes_differ_where_the_image_is_uncovered():
    x = images(1, seed=4)
    shift = (torch.zeros(1), torch.tensor([6.0]), torch.zeros(1), torch.ones(1))
    const = affine_warp(x, *shift, fill=0.0, interpolation="bilinear", zoom_mode="region")
    edge = affine_warp(x, *shift, interpolation="bilinear", fill_mode="nearest", zoom_mode="region")
    mirror = affine_warp(x, *shift, interpolation="bilinear", fill_mode="reflect", zoom_mode="region")
    # sampling x + 6: the last 6 columns come from beyond the right edge
    assert (const[..., -6:] == 0).all()
    assert torch.equal(edge[..., -6:], x[..., -1:].expand(-1, -1, -1, 6))
    assert torch.equal(mirror[..., -6:], x[..., -6:].flip(-1))
    assert torch.equal(const[..., :-6], x[..., 6:]) and torch.equal(edge[..., :-6], x[..., 6:])


def test_the_torchvision_loader_has_the_keras_options_too():
    tf = torchvision_train_transform(image_size=24, mean=RAW[0], std=RAW[1], **ALL_OFF, rotate=7.2, zoom=0.2,
                                     affine_interpolation="bilinear", affine_fill_mode="reflect",
                                     zoom_mode="region-xy")
    keras = [t for t in tf.transforms if isinstance(t, KerasAffine)]
    assert len(keras) == 1 and (keras[0].fill_mode, keras[0].zoom_mode) == ("reflect", "region-xy")
    torch.manual_seed(0)
    out = tf(images(1)[0])
    assert out.shape == (3, 24, 24) and 0.0 <= out.min() and out.max() <= 1.0


def test_keras_and_tf_recipes_resample_bilinearly_with_keras_layers():
    names = ["convmixer-keras-cifar100"] + sorted(p.stem for p in (PKG / "recipes").glob("tf-rep-*.yaml"))
    assert len(names) == 7
    for name in names:
        cfg = build_config(name)
        assert (cfg.affine_interpolation, cfg.init, cfg.bn_eps, cfg.bn_momentum) == ("bilinear", "glorot", 1e-3,
                                                                                     0.01), name
    keras = build_config("convmixer-keras-cifar100")
    assert (keras.affine_fill_mode, keras.zoom_mode, keras.normalize) == ("reflect", "region-xy", False)
    for name in ("tf-rep-stlr", "tf-rep-onecycle-fig4b"):
        cfg = build_config(name)
        assert (cfg.affine_fill_mode, cfg.zoom_mode, cfg.fractional_shift) == ("nearest", "region-xy", True)
    assert "divides by 255 once" in recipe("convmixer-keras-cifar100")["description"]
    assert "twice" not in yaml.safe_dump(recipe("convmixer-keras-cifar100"))


# ------------------------------------------------------------------------------------------ evaluation cadence


def test_eval_schedule_of_simple_convnext_and_the_best_and_last_figures():
    cfg = build_config("convnext-cifar")
    assert [e for e in range(1, 101) if on_eval_schedule(cfg, e)] == list(range(1, 100, 10))
    assert [e for e in range(1, 26) if on_eval_schedule(TrainConfig(eval_every=5), e)] == [5, 10, 15, 20, 25]
    history = [{"epoch": e, "test_top1": None, "test_top5": None} for e in range(1, 101)]
    for e, acc in ((1, 0.3), (11, 0.8), (21, 0.9), (31, 0.85), (91, 0.88), (100, 0.95)):
        history[e - 1].update(test_top1=acc, test_top5=1.0)
    figures = scheduled_evals(cfg, history)
    assert figures["best"] == {"epoch": 21, "test_top1": 0.9, "test_top5": 1.0}
    assert figures["last"] == {"epoch": 91, "test_top1": 0.88, "test_top5": 1.0}  # epoch 100 is off the schedule
    assert (figures["every"], figures["start"], figures["count"]) == (10, 1, 5)


def test_a_run_reports_the_scheduled_evaluations(data_root, tmp_path):
    cfg = build_config(None, model="cm-cpu", dim=8, depth=1, epochs=4, eval_every=2, eval_start=1,
                       train_subset=32, test_subset=16, batch_size=16, amp="off", data_dir=str(data_root),
                       out=str(tmp_path / "run"), device="cpu")
    summary = train(cfg)
    rows = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [i + 1 for i, line in enumerate(rows) if '"test_top1": null' not in line]
    assert evaluated == [1, 3, 4]  # 1 and 3 on the schedule, 4 the last epoch (the summary's final weights)
    evals = summary["scheduled_evals"]
    assert evals["last"]["epoch"] == 3 and evals["count"] == 2 and evals["best"]["epoch"] in (1, 3)


def test_recipes_name_the_figure_their_seed_published():
    figures = {p.stem: recipe(p.stem)["published"].get("figure") for p in sorted((PKG / "recipes").glob("*.yaml"))
               if recipe(p.stem).get("published")}
    assert set(figures.values()) <= {"final", "last-eval", "best-eval", "unstated", "curves"}
    assert None not in figures.values()
    assert figures["convnext-cifar"] == figures["convnext-tin"] == "last-eval"
    assert figures["cm-xl"] == figures["convmixer-keras-cifar100"] == "final"
    assert figure_note(recipe("convnext-cifar")["published"]) == "(last scheduled eval)"
    assert figure_note(recipe("tf-rep-final-d4")["published"]) == ""  # only the paper's figure: not an evaluation
    with pytest.raises(Exception, match="published.figure must be one of final, last-eval"):
        figure_note({"test_top1": 0.9, "figure": "best"})


def test_ours_beside_published_uses_the_evaluation_the_seed_published(tmp_path):
    evals = {"last": {"epoch": 91, "test_top1": 0.88, "test_top5": 0.99},
             "best": {"epoch": 71, "test_top1": 0.9, "test_top5": 0.99}}
    summary = {"test_top1": 0.95, "test_top5": 1.0, "scheduled_evals": evals}
    run = RunResult(0, 0, tmp_path, "done", summary)
    convnext = VariantResult("c", "c", {"published": recipe("convnext-cifar")["published"]}, {}, runs=[run])
    assert convnext.figure_values("test_top1") == [0.88] and convnext.values("test_top1") == [0.95]
    best = VariantResult("b", "b", {"published": {"test_top1": 0.9, "figure": "best-eval"}}, {}, runs=[run])
    assert best.figure_values("test_top1") == [0.9]
    xl = VariantResult("x", "x", {"published": recipe("cm-xl")["published"]}, {}, runs=[run])
    assert xl.figure_values("test_top1") == [0.95]


# -------------------------------------------------------------------------------------------- text and specs


def test_only_the_xl_studys_own_half_compares_with_its_table():
    good = {"dataset": "cifar10", "official": True}
    assert comparable(good, "xl-half", None, 10000, "xl-half") == (True, "")
    assert comparable(good, "half", None, 10000, "xl-half")[0] is False
    readme = (PKG.parents[1] / "README.md").read_text()
    assert "--test-split half            # the published table" not in readme
    spec = yaml.safe_load((PKG / "ablations" / "convmixer-xl-table.yaml").read_text())
    assert "--test-split xl-half" in spec["note"] and "script's default" in spec["description"]


def test_convnext_cifar_description_states_64x64():
    text = " ".join(recipe("convnext-cifar")["description"].split())
    assert "64x64" in text and "runs at 32x32" not in text and "without normalization" in text


def test_fig4b_recipe_and_fig5_spec():
    fig4b = build_config("tf-rep-onecycle-fig4b")
    assert (fig4b.dim, fig4b.depth, fig4b.epochs, fig4b.schedule, fig4b.wd, fig4b.clip_norm) == (
        128, 4, 200, "onecycle", 0.0, None)
    assert fig4b.rotate > 0 and fig4b.zoom > 0 and fig4b.shift > 0 and fig4b.ra_n == 0  # the generator, no RA
    spec = yaml.safe_load((PKG / "ablations" / "tf-rep-final.yaml").read_text())
    assert [v["recipe"] for v in spec["variants"]] == ["tf-rep-final-d4", "tf-rep-final-d8", "tf-rep-final-d12"]


def test_fig4b_recipe_trains_one_short_epoch(data_root, tmp_path):
    """As tests/test_seed_recipes.py does for the other seed recipes: every setting the recipe's, one block, a few
    real images."""
    cfg = build_config("tf-rep-onecycle-fig4b", epochs=1, depth=1, dim=16, train_subset=16, test_subset=16,
                       batch_size=8, data_dir=str(data_root), out=str(tmp_path / "run"), device="cpu", amp="off")
    summary = train(cfg)
    assert summary["epochs"] == 1 and summary["test_images"] == 16 and 0.0 <= summary["test_top1"] <= 1.0
