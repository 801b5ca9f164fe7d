"""Seed-recipe augmentation options: per-sample (elem) Mixup/CutMix, pixel-mode erasing, vflip/rotate/zoom/shift."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from isoconv.augment import MixupCutmix, one_hot_smooth
from isoconv.augment.mix import mix_elem_apply


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- elem mixing

def test_elem_mode_each_sample_has_its_own_lam_and_choice():
    B, C = 64, 10
    x = torch.randn(B, 3, 16, 16, generator=gen(0))
    x_before = x.clone()
    y = torch.arange(B) % C
    mix = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, num_classes=C, mix_mode="elem")
    xm, t = mix(x, y, gen(1))
    assert torch.equal(x, x_before)
    lam, cut, boxes = mix.last_lams, mix.last_use_cutmix, mix.last_boxes
    assert mix.last_mode == "elem" and lam.shape == (B,) and len(torch.unique(lam)) > B // 2
    assert 0 < int(cut.sum()) < B  # both kinds in one batch
    xf = x.flip(0)
    for i in range(B):
        if lam[i] == 1.0:
            assert torch.equal(xm[i], x[i])
        elif cut[i]:
            y0, y1, x0, x1 = boxes[i].tolist()
            inside = torch.zeros(16, 16, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            assert torch.equal(xm[i][:, inside], xf[i][:, inside]) and torch.equal(xm[i][:, ~inside], x[i][:, ~inside])
            assert float(lam[i]) == pytest.approx(1 - inside.float().mean().item(), abs=1e-6)
        else:
            assert torch.allclose(xm[i], x[i] * lam[i] + xf[i] * (1 - lam[i]), atol=1e-6)
    # soft targets: rows sum to 1, own class gets lam_i, partner's class 1 - lam_i
    assert torch.allclose(t.sum(1), torch.ones(B), atol=1e-6)
    want = lam[:, None] * one_hot_smooth(y, C) + (1 - lam[:, None]) * one_hot_smooth(y.flip(0), C)
    assert torch.allclose(t, want, atol=1e-6)
    i = int((lam < 1).nonzero()[0])
    assert float(t[i, y[i]]) == pytest.approx(float(lam[i]), abs=1e-6)


def test_elem_mode_frequencies_and_smoothing():
    B = 4000
    x = torch.zeros(B, 3, 8, 8)
    y = torch.zeros(B, dtype=torch.long)
    mix = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.4, switch_prob=0.5, label_smoothing=0.1,
                      num_classes=10, mix_mode="elem")
    _, t = mix(x, y, gen(2))
    mixed = mix.last_lams < 1.0
    assert 0.36 < mixed.float().mean().item() < 0.44  # about 40% of *each* batch is mixed
    share = mix.last_use_cutmix[mixed].float().mean().item()
    assert 0.44 < share < 0.56
    assert torch.allclose(t[~mixed], one_hot_smooth(y[~mixed], 10, 0.1))  # unmixed samples still smoothed
    assert torch.allclose(t.sum(1), torch.ones(B), atol=1e-5)
    # reproducible from the generator; batch mode still draws one lam per batch
    _, t2 = mix(x, y, gen(2))
    assert torch.equal(t, t2)
    with pytest.raises(ValueError):
        MixupCutmix(mixup_alpha=1.0, mix_mode="pair")


def test_mix_elem_apply_matches_a_per_sample_loop():
    B = 7  # odd: the middle sample pairs with itself
    x = torch.randn(B, 3, 10, 10, generator=gen(3))
    lam = torch.tensor([1.0, 0.3, 0.7, 0.5, 0.64, 1.0, 0.2])
    cut = torch.tensor([False, False, True, True, True, True, False])
    boxes = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [2, 5, 1, 8], [0, 10, 0, 5], [3, 9, 3, 9], [1, 2, 1, 2],
                          [0, 0, 0, 0]])
    out = mix_elem_apply(x, lam, cut, boxes)
    ref = x.clone()
    for i in range(B):  # timm's _mix_elem
        j = B - 1 - i
        if lam[i] != 1.0:
            if cut[i]:
                y0, y1, x0, x1 = boxes[i].tolist()
                ref[i][:, y0:y1, x0:x1] = x[j][:, y0:y1, x0:x1]
            else:
                ref[i] = x[i] * lam[i] + x[j] * (1 - lam[i])
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------------- vflip / affine

from torchvision.transforms import v2 as T  # noqa: E402

from isoconv.augment import BatchAugment, normalize, torchvision_train_transform  # noqa: E402
from isoconv.augment.batched import affine_warp, erase_pixels, sample_affine_params, sample_erase_boxes  # noqa: E402

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2471, 0.2435, 0.2616)
ALL_OFF = dict(scale=1.0, hflip=False, ra_n=0, jitter=0.0, reprob=0.0)


def images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    low = torch.rand((n, 3, 6, 6), generator=gen(seed))
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (smooth.clamp(0, 1) * 255).round().to(torch.uint8)


def test_vflip_stage_is_per_image_and_exact():
    x = images(64)
    aug = BatchAugment(image_size=32, mean=MEAN, std=STD, **ALL_OFF, vflip=True)
    out = aug(x, gen(0))
    flip = aug.last_params["vflip"]
    assert 16 < int(flip.sum()) < 48
    want = torch.stack([TF.vertical_flip(img) if f else img for img, f in zip(x, flip)])
    assert torch.equal(out, normalize(want, MEAN, STD))


@pytest.mark.parametrize("interp, mode", [("nearest", InterpolationMode.NEAREST),
                                          ("bilinear", InterpolationMode.BILINEAR)])
@pytest.mark.parametrize("fill", [0.0, 127.0])
def test_affine_stage_matches_torchvision_per_image(interp, mode, fill):
    """Each image equals torchvision's F.affine with that image's sampled parameters.
    Tolerance (module docstring): nearest >= 99.9% of pixels identical, bilinear max abs diff <= 1."""
    x = images(48, seed=1)
    aug = BatchAugment(image_size=32, mean=MEAN, std=STD, **ALL_OFF, rotate=15.0, zoom=0.2, shift=0.1,
                       affine_fill=fill, affine_interpolation=interp)
    out = aug(x, gen(3))
    angle, tx, ty, scale = aug.last_params["affine"]
    ref = torch.stack([TF.affine(x[i], angle=float(angle[i]), translate=[int(tx[i]), int(ty[i])],
                                 scale=float(scale[i]), shear=[0.0, 0.0], interpolation=mode, fill=fill)
                       for i in range(len(x))])
    ref = normalize(ref, MEAN, STD)
    diff = ((out - ref) * torch.tensor(STD).view(1, 3, 1, 1) * 255).abs().round()
    if interp == "nearest":
        assert (diff == 0).float().mean() >= 0.999
    else:
        assert diff.max() <= 1
    assert len(set(angle.tolist())) == len(x)  # per image, not one warp for the batch
    # fill shows up where zoom-out / shift uncovers the border
    warped = affine_warp(x, angle, tx, ty, scale, fill=fill, interpolation="nearest")
    assert (warped == int(fill)).all(dim=1).any()


def test_affine_param_ranges_and_frequencies():
    n, d, shift, zoom = 40000, 10.0, 0.1, 0.2
    angle, tx, ty, scale = sample_affine_params(n, 32, 32, d, shift, zoom, gen(5), "cpu")
    assert angle.abs().max() <= d and scale.min() >= 1 - zoom and scale.max() <= 1 + zoom
    assert float(angle.mean()) == pytest.approx(0.0, abs=0.15)
    assert float(angle.std()) == pytest.approx(d / math.sqrt(3), rel=0.02)  # uniform on [-d, d]
    assert float(scale.std()) == pytest.approx(zoom / math.sqrt(3), rel=0.02)
    # tx = round(U[-3.2, 3.2]): P(0) = 1/6.4, P(+-3) = 0.7/6.4 each, nothing beyond 3
    assert set(tx.unique().tolist()) == {-3, -2, -1, 0, 1, 2, 3}
    assert float((tx == 0).float().mean()) == pytest.approx(1 / 6.4, abs=0.01)
    assert float((tx == 3).float().mean()) == pytest.approx(0.7 / 6.4, abs=0.01)
    assert float((ty == -2).float().mean()) == pytest.approx(1 / 6.4, abs=0.01)
    assert not torch.equal(tx, ty)


def test_affine_options_validated_and_off_by_default():
    with pytest.raises(ValueError):
        BatchAugment(image_size=32, mean=MEAN, std=STD, zoom=1.0)
    with pytest.raises(ValueError):
        BatchAugment(image_size=32, mean=MEAN, std=STD, affine_interpolation="bicubic")
    with pytest.raises(ValueError):
        BatchAugment(image_size=32, mean=MEAN, std=STD, erase_mode="noise")
    aug = BatchAugment(image_size=32, mean=MEAN, std=STD)
    aug(images(4), gen(0))
    assert "affine" not in aug.last_params and "vflip" not in aug.last_params


def test_reference_pipeline_has_the_new_stages():
    tf = torchvision_train_transform(image_size=32, mean=MEAN, std=STD, **dict(ALL_OFF, reprob=0.5), vflip=True,
                                     rotate=10.0, zoom=0.1, shift=0.1, affine_fill=0.0, erase_mode="pixel",
                                     erase_max_area=0.25)
    kinds = [type(t) for t in tf.transforms]
    assert T.RandomVerticalFlip in kinds and T.RandomAffine in kinds
    affine = next(t for t in tf.transforms if isinstance(t, T.RandomAffine))
    assert list(affine.degrees) == [-10.0, 10.0] and tuple(affine.translate) == (0.1, 0.1)
    assert tuple(affine.scale) == pytest.approx((0.9, 1.1))
    erasing = next(t for t in tf.transforms if isinstance(t, T.RandomErasing))  # value "random" is stored as None
    assert erasing.value is None and tuple(erasing.scale) == (0.02, 0.25)
    out = tf(images(1)[0])
    assert out.shape == (3, 32, 32) and torch.isfinite(out).all()
    after = torchvision_train_transform(image_size=32, mean=MEAN, std=STD, reprob=0.5, erase_after_mix=True)
    assert not any(isinstance(t, T.RandomErasing) for t in after.transforms)
    # vertical flips on the reference path happen about half the time
    flips = T.Compose([T.RandomVerticalFlip(0.5)])
    torch.manual_seed(0)
    x = images(1)[0]
    assert 0.4 < sum(torch.equal(flips(x), TF.vertical_flip(x)) for _ in range(400)) / 400 < 0.6


# ---------------------------------------------------------------------------------------------- pixel erasing

def test_pixel_erasing_fills_normal_noise_inside_the_box_only():
    x = normalize(images(256, seed=2), MEAN, STD)
    box = sample_erase_boxes(256, 32, 32, 1.0, gen(0), "cpu", scale=(0.02, 0.25))
    top, left, h, w, apply = box
    assert (h * w <= 0.25 * 32 * 32 + 32).all()  # rounding of the sides can add at most about a row
    out = erase_pixels(x, *box, generator=gen(1))
    changed = (out != x).any(dim=1)
    inside = torch.zeros_like(changed)
    for i in range(256):
        if apply[i]:
            inside[i, top[i]:top[i] + h[i], left[i]:left[i] + w[i]] = True
    assert torch.equal(changed, inside)
    noise = out.permute(1, 0, 2, 3)[:, inside]
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(noise.std()) == pytest.approx(1.0, abs=0.02)
    assert not torch.equal(noise[0], noise[1])  # per channel


def test_erase_options_in_batch_augment():
    x = images(128, seed=3)
    aug = BatchAugment(image_size=32, mean=MEAN, std=STD, **dict(ALL_OFF, reprob=1.0), erase_mode="pixel",
                       erase_max_area=0.25)
    out = aug(x, gen(0))
    top, left, h, w, apply = aug.last_params["erase"]
    assert (h * w <= 0.25 * 1024 + 32).all() and apply.float().mean() > 0.95
    assert not (out == 0).all(dim=1).any()  # pixel mode: no constant-zero boxes
    # erase_after_mix: __call__ leaves erasing to erase_stage on the (mixed) batch
    later = BatchAugment(image_size=32, mean=MEAN, std=STD, **dict(ALL_OFF, reprob=1.0), erase_mode="pixel",
                         erase_after_mix=True)
    clean = later(x, gen(0))
    assert torch.equal(clean, normalize(x, MEAN, STD)) and "erase" not in later.last_params
    mixed, _ = MixupCutmix(mixup_alpha=1.0, num_classes=10, mix_mode="elem")(clean, torch.zeros(128).long(), gen(1))
    erased = later.erase_stage(mixed, gen(2))
    assert "erase" in later.last_params and (erased != mixed).any(dim=1).float().mean() > 0.02
    # const mode still erases to 0
    const = BatchAugment(image_size=32, mean=MEAN, std=STD, **dict(ALL_OFF, reprob=1.0))
    assert (const(x, gen(0)) == 0).all(dim=1).any()


# ---------------------------------------------------------------------------------------------- RRC aspect ratio

def test_aspect_crop_boxes_follow_torchvision_random_resized_crop():
    """crop_ratio R samples boxes as RandomResizedCrop(scale, ratio=(1/R, R)): valid boxes, and the same
    distribution of box area and aspect as torchvision's own get_params (frequencies, 4,000 draws each)."""
    from torchvision.transforms import RandomResizedCrop

    from isoconv.augment.batched import sample_aspect_crop_boxes

    n, size, scale, ratio = 4000, 32, 0.35, 4 / 3
    top, left, h, w = sample_aspect_crop_boxes(n, size, size, scale, ratio, gen(0), torch.device("cpu"))
    assert bool(((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0) & (top + h <= size) & (left + w <= size)).all())
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.zeros(3, size, size), [scale, 1.0], [1 / ratio, ratio])
                        for _ in range(n)])
    ours_area, ref_area = (h * w).double() / size ** 2, (ref[:, 2] * ref[:, 3]).double() / size ** 2
    ours_aspect, ref_aspect = (w / h).double().log(), (ref[:, 3] / ref[:, 2]).double().log()
    assert abs(ours_area.mean() - ref_area.mean()) < 0.015
    assert abs(ours_aspect.mean() - ref_aspect.mean()) < 0.02 and abs(ours_aspect.std() - ref_aspect.std()) < 0.02
    assert (w != h).float().mean() > 0.5  # really non-square, unlike the default ratio 1


def test_crop_ratio_one_keeps_square_crops_and_the_same_random_stream():
    from isoconv.augment import BatchAugment

    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen(1))
    kw = dict(image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, ra_n=0, jitter=0.0, reprob=0.0)
    a = BatchAugment(**kw)(images, gen(2))
    b = BatchAugment(**kw, crop_ratio=1.0)(images, gen(2))
    assert torch.equal(a, b)
    c = BatchAugment(**kw, crop_ratio=4 / 3)(images, gen(2))
    assert c.shape == a.shape and not torch.equal(a, c)
