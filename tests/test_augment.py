"""Tests for isoconv.augment: batched per-image augmentation vs torchvision, Mixup/CutMix."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from isoconv.augment import (
    BatchAugment,
    MixupCutmix,
    normalize,
    one_hot_smooth,
    torchvision_test_transform,
    torchvision_train_transform,
)
from isoconv.augment.batched import (
    RA_OPS,
    RA_SIGNED,
    apply_ra_op,
    color_jitter,
    erase,
    ra_magnitude,
    randaugment_apply,
    resized_crop,
    sample_crop_boxes,
    sample_erase_boxes,
    sample_jitter_params,
    sample_ra_ops,
)

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2471, 0.2435, 0.2616)
ALL_OFF = dict(scale=1.0, hflip=False, ra_n=0, jitter=0.0, reprob=0.0)



pytestmark = pytest.mark.usefixtures("one_cpu_thread")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gen(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def random_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen(seed))


def structured_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Natural-ish images: smooth blobs (upsampled noise) + gradients, each with its own
    brightness range (so AutoContrast/Equalize/Solarize do non-trivial things), plus one
    constant image and one low-contrast image as edge cases."""
    g = gen(seed)
    low = torch.rand((n, 3, 4, 4), generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size)
    lo = torch.rand((n, 1, 1, 1), generator=g) * 0.4
    hi = 0.6 + torch.rand((n, 1, 1, 1), generator=g) * 0.4
    x = (0.7 * smooth + 0.3 * ramp).clamp(0, 1) * (hi - lo) + lo
    x = x + 0.03 * torch.randn(x.shape, generator=g)
    img = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if n >= 4:
        img[0] = 77  # constant
        img[1] = (img[1] // 16) + 100  # low contrast
    return img


# ----------------------------------------------------------------------------------------------
# basics
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_output_dtype_shape_device(device):
    x = structured_images(8).to(device)
    for size in (32, 40):
        aug = BatchAugment(image_size=size, mean=MEAN, std=STD)
        out = aug(x, gen(0, device))
        assert out.dtype == torch.float32
        assert out.shape == (8, 3, size, size)
        assert out.device == x.device
        assert torch.isfinite(out).all()
    assert x.dtype == torch.uint8 and torch.equal(x.cpu(), structured_images(8))  # input untouched
    for b in (1, 7):  # tiny / odd batches
        out = BatchAugment(image_size=32, mean=MEAN, std=STD, ra_n=2, reprob=1.0)(x[:b], gen(1, device))
        assert out.shape == (b, 3, 32, 32)


def test_no_aug_equals_normalize_and_reference_test_transform():
    x = structured_images(16)
    aug = BatchAugment(image_size=32, mean=MEAN, std=STD, no_aug=True)
    out = aug(x, gen(0))
    assert torch.equal(out, normalize(x, MEAN, STD))
    ref = torchvision_test_transform(image_size=32, mean=MEAN, std=STD)
    assert torch.equal(out, torch.stack([ref(img) for img in x]))
    # all stages off (scale 1, native size) is also just normalize, whatever the generator
    assert torch.equal(BatchAugment(image_size=32, mean=MEAN, std=STD, **ALL_OFF)(x, gen(5)), out)
    # no_aug with a resize: bilinear antialiased resize, same as the reference test transform
    aug24 = BatchAugment(image_size=24, mean=MEAN, std=STD, no_aug=True)
    ref24 = torchvision_test_transform(image_size=24, mean=MEAN, std=STD)
    assert torch.equal(aug24(x, gen(0)), torch.stack([ref24(img) for img in x]))


def test_normalize_matches_torchvision_exactly():
    x = random_images(4)
    ref = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(list(MEAN), list(STD))])
    assert torch.equal(normalize(x, MEAN, STD), torch.stack([ref(T.ToImage()(i)) for i in x]))


def test_determinism_and_resume():
    x = structured_images(32)
    aug = BatchAugment(image_size=32, mean=MEAN, std=STD, ra_n=2, reprob=0.5)
    a = aug(x, gen(123))
    b = aug(x, gen(123))
    c = aug(x, gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # resumable from the generator state
    g = gen(7)
    aug(x, g)
    state = g.get_state()
    nxt = aug(x, g)
    g2 = torch.Generator().manual_seed(999)
    g2.set_state(state)
    assert torch.equal(aug(x, g2), nxt)


def test_does_not_use_global_rng():
    x = structured_images(16)
    aug = BatchAugment(image_size=32, mean=MEAN, std=STD, ra_n=2, reprob=0.5)
    torch.manual_seed(0)
    a = aug(x, gen(3))
    torch.manual_seed(1)
    b = aug(x, gen(3))
    assert torch.equal(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError):
        BatchAugment(image_size=32, mean=MEAN, std=STD, scale=0.0)
    with pytest.raises(ValueError):
        BatchAugment(image_size=32, mean=MEAN, std=STD, ra_m=31)
    with pytest.raises(ValueError):
        BatchAugment(image_size=32, mean=MEAN, std=STD, reprob=1.5)
    aug = BatchAugment(image_size=32, mean=MEAN, std=STD)
    with pytest.raises(ValueError):
        aug(random_images(2).float(), gen(0))


# ----------------------------------------------------------------------------------------------
# per-image randomness
# ----------------------------------------------------------------------------------------------

def _n_distinct(out: torch.Tensor) -> int:
    return len({row.numpy().tobytes() for row in out.flatten(1)})


@pytest.mark.parametrize(
    "cfg, min_distinct",
    [
        (dict(ALL_OFF, ra_n=2), 30),
        (dict(ALL_OFF, ra_n=1), 12),  # at most 23 (op, sign) outcomes with one op
        (dict(ALL_OFF, jitter=0.2), 30),
        (dict(ALL_OFF, scale=0.35), 30),
        (dict(ALL_OFF, reprob=1.0), 30),
        (dict(ALL_OFF, hflip=True), 2),
    ],
)
def test_per_image_randomness(cfg, min_distinct):
    x = structured_images(3, seed=3)[2:].expand(64, 3, 32, 32).contiguous()  # 64 identical images
    out = BatchAugment(image_size=32, mean=MEAN, std=STD, **cfg)(x, gen(0))
    assert _n_distinct(out) >= min_distinct


def test_ra_ops_differ_between_images_and_are_applied_per_image():
    x = structured_images(64, seed=1)
    aug = BatchAugment(image_size=32, mean=MEAN, std=STD, **dict(ALL_OFF, ra_n=1))
    out = aug(x, gen(0))
    ops = aug.last_ops
    assert ops.shape == (64, 1)
    assert len(torch.unique(ops)) >= 8
    i, j = 0, int((ops[:, 0] != ops[0, 0]).nonzero()[0])
    assert ops[i, 0] != ops[j, 0]  # two images of one batch got different ops
    neg = aug.last_params["ra_negative"]
    # and each image's output is exactly its own op applied to it
    for k in (i, j, *range(10)):
        name = RA_OPS[int(ops[k, 0])]
        mag = ra_magnitude(name, 8, 32, 32, negative=bool(neg[k, 0]))
        expect = normalize(apply_ra_op(x[k:k + 1], name, mag), MEAN, STD)
        assert torch.equal(out[k:k + 1], expect), name


# ----------------------------------------------------------------------------------------------
# RandAugment
# ----------------------------------------------------------------------------------------------

def test_ra_table_matches_torchvision():
    # a private table of torchvision's; batched.py falls back to its own copy where it is missing
    space = getattr(T.RandAugment, "_AUGMENTATION_SPACE", None)
    assert space is not None, "this torchvision has no RandAugment._AUGMENTATION_SPACE: compare the fallback by hand"
    assert tuple(space.keys()) == RA_OPS
    for op, signed in zip(RA_OPS, RA_SIGNED):
        fn, tv_signed = space[op]
        assert tv_signed == signed
        mags = fn(31, 32, 32)
        for m in (0, 8, 30):
            expect = 0.0 if mags is None else float(mags[m])
            assert ra_magnitude(op, m, 32, 32) == expect
            if signed:
                assert ra_magnitude(op, m, 32, 32, negative=True) == -expect
    assert int(ra_magnitude("TranslateX", 8, 32, 32)) == 3  # 150/331*32*8/30 = 3.87 -> 3 px


def _tv_ra_apply(img: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """torchvision's own RandAugment op dispatch on one image (private API; falls back to the
    public functional calls it makes)."""
    ra = T.RandAugment()
    fn = getattr(ra, "_apply_image_or_video_transform", None)
    if fn is None:  # pragma: no cover
        return apply_ra_op(img, op, magnitude)
    return fn(img, op, magnitude, interpolation=InterpolationMode.NEAREST, fill=ra._fill)


_OP_SIGNS = [(op, neg) for op, signed in zip(RA_OPS, RA_SIGNED) for neg in ((False, True) if signed else (False,))]


@pytest.mark.parametrize("op, negative", _OP_SIGNS)
@pytest.mark.parametrize("magnitude_bin", [8, 30])
def test_ra_group_application_is_exact(op, negative, magnitude_bin):
    x = torch.cat([random_images(12, seed=2), structured_images(12, seed=2)])
    B = x.shape[0]
    ops = torch.full((B,), RA_OPS.index(op))
    neg = torch.full((B,), negative)
    out = randaugment_apply(x, ops, neg, magnitude_bin)
    mag = ra_magnitude(op, magnitude_bin, 32, 32, negative=negative)
    ref = torch.stack([_tv_ra_apply(img, op, mag) for img in x])
    assert out.dtype == torch.uint8
    assert torch.equal(out, ref)
    if op != "Identity" and not (op == "Posterize" and magnitude_bin == 0):
        assert not torch.equal(out, x)  # the op did something


def test_ra_mixed_batch_exact():
    x = torch.cat([random_images(48, seed=4), structured_images(48, seed=4)])
    ops, neg = sample_ra_ops(x.shape[0], gen(1), "cpu")
    out = randaugment_apply(x, ops, neg, 8)
    for k in range(x.shape[0]):
        name = RA_OPS[int(ops[k])]
        ref = _tv_ra_apply(x[k], name, ra_magnitude(name, 8, 32, 32, negative=bool(neg[k])))
        assert torch.equal(out[k], ref), (k, name)


def test_ra_op_and_sign_frequencies():
    n = 21000
    ops, neg = sample_ra_ops(n, gen(11), "cpu")
    counts = torch.bincount(ops, minlength=len(RA_OPS)).double()
    expected = n / len(RA_OPS)
    assert ((counts - expected).abs() / expected < 0.15).all(), counts
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 40.0  # df = 13; p ~ 1e-4
    assert abs(neg.double().mean().item() - 0.5) < 0.02


# ----------------------------------------------------------------------------------------------
# RandomResizedCrop
# ----------------------------------------------------------------------------------------------

def _known_boxes(n, H, seed):
    g = np.random.default_rng(seed)
    side = torch.tensor(g.integers(max(1, H // 3), H + 1, n))
    side[:3] = H  # full image (identity resize)
    top = torch.tensor([g.integers(0, H - s + 1) for s in side.tolist()])
    left = torch.tensor([g.integers(0, H - s + 1) for s in side.tolist()])
    return top, left, side


@pytest.mark.parametrize("size", [32, 24, 40])
def test_resized_crop_matches_torchvision(size):
    x = torch.cat([random_images(24, seed=5), structured_images(24, seed=5)])
    top, left, side = _known_boxes(x.shape[0], 32, seed=size)
    out = resized_crop(x, top, left, side, side, size)
    ref_u8 = torch.stack([
        TF.resized_crop(img, int(t), int(l), int(s), int(s), [size, size], antialias=True)
        for img, t, l, s in zip(x, top, left, side)
    ])
    ref_f = torch.stack([
        TF.resized_crop(img.float(), int(t), int(l), int(s), int(s), [size, size], antialias=True)
        for img, t, l, s in zip(x, top, left, side)
    ]).round().clamp(0, 255)
    d_u8 = (out.int() - ref_u8.int()).abs()
    assert d_u8.max() <= 1 and d_u8.float().mean() < 0.25  # torchvision's fixed-point uint8 kernel
    d_f = (out.float() - ref_f).abs()
    assert d_f.max() <= 1 and (d_f > 0).float().mean() < 1e-3  # torchvision's float kernel
    if size == 32:
        full = side == 32
        assert torch.equal(out[full], x[full])  # identity crops are exact copies


def test_crop_sampling_bounds_and_distribution():
    n, scale = 20000, 0.35
    top, left, side = sample_crop_boxes(n, 32, 32, scale, gen(2), "cpu")
    lo = round(math.sqrt(scale) * 32)
    assert side.min() >= lo - 1 and side.max() <= 32
    assert side.min() <= lo + 1  # lower end is reached
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + side <= 32).all() and (left + side <= 32).all()
    # positions cover all valid offsets for the smallest crops
    small = side == side.min()
    assert int(top[small].max()) == 32 - int(side.min())
    # same side distribution as torchvision's RandomResizedCrop
    rrc = T.RandomResizedCrop(32, scale=(scale, 1.0), ratio=(1.0, 1.0))
    make = getattr(rrc, "make_params", None) or rrc._get_params
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    tv_side = torch.tensor([make([img])["height"] for _ in range(4000)]).double()
    assert abs(tv_side.mean() - side.double().mean()) < 0.2
    assert abs(tv_side.std() - side.double().std()) < 0.2


def test_crop_stage_uses_sampled_boxes():
    x = structured_images(32, seed=6)
    aug = BatchAugment(image_size=32, mean=MEAN, std=STD, **dict(ALL_OFF, scale=0.5))
    out = aug(x, gen(0))
    top, left, side = aug.last_params["crop"]
    assert torch.equal(out, normalize(resized_crop(x, top, left, side, side, 32), MEAN, STD))
    assert (side < 32).any()


def test_flip_stage():
    x = structured_images(32, seed=6)
    aug = BatchAugment(image_size=32, mean=MEAN, std=STD, **dict(ALL_OFF, hflip=True))
    out = aug(x, gen(0))
    flip = aug.last_params["flip"]
    assert 0 < int(flip.sum()) < 32
    expect = torch.stack([TF.horizontal_flip(img) if f else img for img, f in zip(x, flip)])
    assert torch.equal(out, normalize(expect, MEAN, STD))


# ----------------------------------------------------------------------------------------------
# ColorJitter
# ----------------------------------------------------------------------------------------------

_ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)


def test_color_jitter_matches_torchvision():
    x = torch.cat([random_images(30, seed=7), structured_images(30, seed=7)])
    B = x.shape[0]
    factors, _ = sample_jitter_params(B, 0.4, gen(3), "cpu")
    perms = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
    order = perms[torch.arange(B) % 6]  # every order is exercised
    out = color_jitter(x.float(), factors, order)
    ref = []
    for img, f, o in zip(x, factors, order):
        for k in o.tolist():
            img = _ADJUST[k](img, float(f[k]))
        ref.append(img)
    ref = torch.stack(ref)
    d = (out - ref.float()).abs()
    assert d.max() <= 1 and (d > 0).float().mean() < 1e-3
    assert torch.equal(out, out.floor()) and out.min() >= 0 and out.max() <= 255


def test_color_jitter_single_op_factors():
    # one op at a time with edge factors (0 = gray/black, large) still matches torchvision
    x = structured_images(12, seed=8)
    for k in range(3):
        for f in (0.0, 0.5, 1.0, 1.7):
            factors = torch.full((12, 3), f)
            out = color_jitter(x.float(), factors, torch.full((12, 1), k))
            ref = torch.stack([_ADJUST[k](img, f) for img in x])
            assert (out - ref.float()).abs().max() <= 1


def test_jitter_factor_and_order_sampling():
    factors, order = sample_jitter_params(30000, 0.4, gen(4), "cpu")
    assert factors.min() >= 0.6 and factors.max() <= 1.4
    assert factors.min() < 0.601 and factors.max() > 1.399
    assert abs(factors.mean().item() - 1.0) < 0.01
    assert torch.equal(order.sort(dim=1).values, torch.arange(3).expand(30000, 3))
    code = order[:, 0] * 9 + order[:, 1] * 3 + order[:, 2]
    counts = torch.bincount(code)[code.unique()]
    assert len(counts) == 6 and (counts - 5000).abs().max() < 400
    f2, _ = sample_jitter_params(1000, 1.5, gen(4), "cpu")
    assert f2.min() >= 0.0 and f2.max() <= 2.5  # lower bound clipped at 0


def test_jitter_stage_uses_sampled_params():
    x = structured_images(24, seed=9)
    aug = BatchAugment(image_size=32, mean=MEAN, std=STD, **dict(ALL_OFF, jitter=0.3))
    out = aug(x, gen(0))
    factors, order = aug.last_params["jitter"]
    assert factors.min() >= 0.7 and factors.max() <= 1.3
    ref = torch.stack([
        _apply_seq(img, f, o) for img, f, o in zip(x, factors, order)
    ])
    assert (out - normalize(ref, MEAN, STD)).abs().max() <= 1.01 / 255 / min(STD)


def _apply_seq(img, f, o):
    for k in o.tolist():
        img = _ADJUST[k](img, float(f[k]))
    return img


# ----------------------------------------------------------------------------------------------
# RandomErasing
# ----------------------------------------------------------------------------------------------

def test_random_erasing_stats_and_region():
    n, p = 2000, 0.25
    x = structured_images(n, seed=10)
    aug = BatchAugment(image_size=32, mean=MEAN, std=STD, **dict(ALL_OFF, reprob=p))
    out = aug(x, gen(0))
    top, left, h, w, apply = aug.last_params["erase"]
    assert abs(apply.float().mean().item() - p) < 0.05
    base = normalize(x, MEAN, STD)
    frac = (h * w).double() / (32 * 32)
    assert frac[apply].min() >= 0.01 and frac[apply].max() <= 0.40  # ~[0.02, 0.33] up to rounding
    assert ((frac[apply] >= 0.02 - 1e-9) & (frac[apply] <= 0.33 + 1e-9)).float().mean() > 0.9
    rows = torch.arange(32).view(1, 32, 1)
    cols = torch.arange(32).view(1, 1, 32)
    box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
           & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))
    box &= apply.view(-1, 1, 1)
    box = box[:, None].expand_as(out)
    assert (out[box] == 0).all()  # erased region exactly zero
    assert torch.equal(out[~box], base[~box])  # everything else untouched
    erased_img = (out == 0).flatten(1).any(1)
    assert torch.equal(erased_img, apply)
    assert (top + h <= 32).all() and (left + w <= 32).all()


def test_erase_box_distribution_matches_torchvision():
    top, left, h, w, apply = sample_erase_boxes(20000, 32, 32, 1.0, gen(12), "cpu")
    assert apply.float().mean() > 0.99
    ours = (h * w).double()[apply] / 1024
    re = T.RandomErasing(p=1.0, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)
    make = getattr(re, "make_params", None) or re._get_params
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    tv = []
    for _ in range(3000):
        prm = make([img])
        if prm["v"] is not None:
            tv.append(prm["h"] * prm["w"] / 1024)
    tv = torch.tensor(tv, dtype=torch.float64)
    assert abs(tv.mean() - ours.mean()) < 0.01
    assert abs(tv.std() - ours.std()) < 0.01
    assert (h[apply] < 32).all() and (w[apply] < 32).all()  # the box must fit strictly (torchvision)
    assert h[apply].max() == 31 and w[apply].max() == 31
    aspect = (h.double() / w.double())[apply]
    assert 0.2 < aspect.min() and aspect.max() < 4.5


def test_erase_function():
    x = torch.randn(2, 3, 8, 8)
    out = erase(x, torch.tensor([1, 0]), torch.tensor([2, 0]), torch.tensor([3, 8]), torch.tensor([2, 8]),
                torch.tensor([True, False]))
    assert (out[0, :, 1:4, 2:4] == 0).all()
    assert (out[0, :, 1:4, 2:4].numel() == 18) and int((out[0] == 0).sum()) == 18
    assert torch.equal(out[1], x[1])


# ----------------------------------------------------------------------------------------------
# whole pipeline vs the reference torchvision pipeline
# ----------------------------------------------------------------------------------------------

def test_reference_transform_runs_on_tensor_and_pil():
    tf = torchvision_train_transform(image_size=32, mean=MEAN, std=STD)
    img = structured_images(1)[0]
    out = tf(img)
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
    out_pil = tf(TF.to_pil_image(img))
    assert out_pil.dtype == torch.float32 and out_pil.shape == (3, 32, 32)
    off = torchvision_train_transform(image_size=32, mean=MEAN, std=STD, **ALL_OFF)
    assert torch.equal(off(img), normalize(img[None], MEAN, STD)[0])
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:4] == ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugment", "ColorJitter"]
    assert names[-2:] == ["RandomErasing", "ToPureTensor"]
    assert type(out) is torch.Tensor


def test_pipeline_statistics_match_reference():
    x = structured_images(768, seed=13)
    kw = dict(image_size=32, mean=MEAN, std=STD, scale=0.75, ra_n=1, ra_m=8, jitter=0.1, reprob=0.25)
    ours = BatchAugment(**kw)(x, gen(0))
    torch.manual_seed(0)
    tf = torchvision_train_transform(**kw)
    ref = torch.stack([tf(img) for img in x])
    for stat in (lambda t: t.mean(dim=(0, 2, 3)), lambda t: t.std(dim=(0, 2, 3)),
                 lambda t: (t == 0).float().mean(dim=(0, 2, 3))):
        assert (stat(ours) - stat(ref)).abs().max() < 0.05


# ----------------------------------------------------------------------------------------------
# Mixup / CutMix
# ----------------------------------------------------------------------------------------------

def test_one_hot_smooth_and_loss():
    y = torch.tensor([0, 3, 9])
    t = one_hot_smooth(y, 10, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert torch.allclose(t[0, 0], torch.tensor(0.91)) and torch.allclose(t[0, 1], torch.tensor(0.01))
    assert torch.equal(one_hot_smooth(y, 10, 0.0), torch.nn.functional.one_hot(y, 10).float())
    logits = torch.randn(3, 10, generator=gen(0))
    # the training loss of soft targets is torch's cross_entropy with probabilities; smoothed one-hot targets give
    # exactly torch's label smoothing
    assert torch.allclose(torch.nn.functional.cross_entropy(logits, one_hot_smooth(y, 10, 0.0)),
                          torch.nn.functional.cross_entropy(logits, y))
    assert torch.allclose(torch.nn.functional.cross_entropy(logits, t),
                          torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1))


def test_mixup():
    x = torch.randn(8, 3, 16, 16, generator=gen(0))
    x0 = x.clone()
    y = torch.arange(8)
    mix = MixupCutmix(mixup_alpha=0.8, num_classes=10)
    assert mix.enabled
    xm, t = mix(x, y, gen(1))
    lam = mix.last_lam
    assert mix.last_mode == "mixup" and 0.0 < lam < 1.0
    assert torch.equal(x, x0)  # caller's tensor untouched
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert torch.allclose(t.sum(1), torch.ones(8))
    assert torch.allclose(t[0, 0], torch.tensor(lam)) and torch.allclose(t[0, 7], torch.tensor(1 - lam))


def test_cutmix_box_and_targets():
    x = torch.randn(6, 3, 32, 32, generator=gen(0))
    x0 = x.clone()
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    mix = MixupCutmix(cutmix_alpha=1.0, num_classes=6)
    seen = 0
    for seed in range(10):
        xm, t = mix(x, y, gen(seed))
        assert mix.last_mode == "cutmix"
        y0, y1, x0_, x1 = mix.last_box
        area = (y1 - y0) * (x1 - x0_) / (32 * 32)
        assert abs(mix.last_lam - (1 - area)) < 1e-12
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[y0:y1, x0_:x1] = True
        assert torch.equal(xm[:, :, inside], x.flip(0)[:, :, inside])  # pasted from the partner
        assert torch.equal(xm[:, :, ~inside], x[:, :, ~inside])
        assert torch.allclose(t[0, 5], torch.tensor(area, dtype=torch.float32), atol=1e-6)
        assert torch.allclose(t[0, 0], torch.tensor(1 - area, dtype=torch.float32), atol=1e-6)
        assert torch.allclose(t.sum(1), torch.ones(6))
        seen += area > 0
    assert seen >= 5
    assert torch.equal(x, x0)


def test_mix_switch_prob_and_smoothing():
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    mix = MixupCutmix(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=4)
    modes = []
    g = gen(0)
    for _ in range(200):
        _, t = mix(x, y, g)
        modes.append(mix.last_mode)
        assert torch.allclose(t.sum(1), torch.ones(4))
        assert t.min() >= 0.1 / 4 - 1e-6  # smoothing floor
    n_cut = modes.count("cutmix")
    assert 60 < n_cut < 140 and modes.count("mixup") == 200 - n_cut


def test_mix_prob_zero_is_identity_with_smoothed_targets():
    x = torch.randn(5, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4])
    mix = MixupCutmix(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0, label_smoothing=0.1, num_classes=5)
    xm, t = mix(x, y, gen(0))
    assert torch.equal(xm, x)
    assert torch.equal(t, one_hot_smooth(y, 5, 0.1))
    assert mix.last_lam == 1.0 and mix.last_mode is None
    off = MixupCutmix(num_classes=5)
    assert not off.enabled
    xm, t = off(x, y, gen(0))
    assert torch.equal(xm, x) and torch.equal(t, one_hot_smooth(y, 5, 0.0))


def test_mix_odd_batch_and_determinism():
    x = torch.randn(7, 3, 8, 8, generator=gen(0))
    y = torch.arange(7) % 3
    mix = MixupCutmix(mixup_alpha=0.5, cutmix_alpha=1.0, num_classes=3)
    a, ta = mix(x, y, gen(4))
    b, tb = mix(x, y, gen(4))
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert a.shape == x.shape and ta.shape == (7, 3)
    assert torch.allclose(a[3], x[3])  # the middle sample pairs with itself
    assert torch.allclose(ta.sum(1), torch.ones(7))
    lams = set()
    for s in range(5):
        mix(x, y, gen(s))
        lams.add(mix.last_lam)
    assert len(lams) > 1


# ----------------------------------------------------------------------------- translation (RandomCrop padding)

def test_translate_equals_torchvision_crop_of_zero_padded_image_per_image():
    from isoconv.augment.batched import random_translate

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    out, dy, dx = random_translate(x, 4, g)
    for i in range(64):
        ref = TF.crop(TF.pad(x[i], [4, 4, 4, 4]), int(dy[i]), int(dx[i]), 32, 32)
        assert torch.equal(out[i], ref)
    assert int(dy.min()) == 0 and int(dy.max()) == 8  # offsets span [0, 2*pad]
    assert len(set(zip(dy.tolist(), dx.tolist()))) > 20  # per image, not one shift for the batch


def test_batch_augment_translate_stage_and_reference_pipeline():
    from isoconv.augment import torchvision_train_transform

    aug = BatchAugment(image_size=32, mean=MEAN, std=STD, scale=1.0, translate=2, hflip=False, ra_n=0,
                       jitter=0, reprob=0)
    x = torch.full((8, 3, 32, 32), 200, dtype=torch.uint8)
    out = aug(x, torch.Generator().manual_seed(0))
    dy, dx = aug.last_params["translate"]
    zero = (0 - MEAN[0]) / STD[0]
    for i in range(8):  # shifted-in border rows/cols are zero pixels, the rest the image
        shift_rows = abs(int(dy[i]) - 2)
        assert torch.allclose(out[i, 0, 16, 16], torch.tensor((200 / 255 - MEAN[0]) / STD[0]))
        if shift_rows:
            edge = 0 if int(dy[i]) < 2 else 31
            assert torch.allclose(out[i, 0, edge], torch.full((32,), zero))
    names = [type(t).__name__ for t in torchvision_train_transform(image_size=32, mean=MEAN, std=STD,
                                                                   translate=2).transforms]
    assert names.index("RandomCrop") == names.index("RandomResizedCrop") + 1
    with pytest.raises(ValueError, match="translate must be a non-negative integer, got -1"):
        BatchAugment(image_size=32, mean=MEAN, std=STD, translate=-1)
