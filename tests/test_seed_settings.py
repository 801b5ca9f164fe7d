"""Settings the seed pipelines added: zero padding, erasing after mixing, no decay on norms and biases, kept
checkpoints, the published precision on GPUs, and one-line errors for options that do not fit."""
import torch

from isoconv.augment import MixThenErase, MixupCutmix, one_hot_smooth
from isoconv.cli import main
from isoconv.config import build_config
from isoconv.data import ImageDataset
from isoconv.runtime import resolve_precision
from isoconv.train import train
from isoconv.train.setup import build_optimizer
from isoconv.weights import load_checkpoint


def dataset(n=4, size=32) -> ImageDataset:
    images = torch.full((n, 3, size, size), 200, dtype=torch.uint8)
    return ImageDataset(images, torch.zeros(n, dtype=torch.int64), ["a", "b"], (0.5,) * 3, (0.25,) * 3, "x", "test")


def test_pad_to_zero_pads_centred_as_center_crop_does():
    from torchvision.transforms.v2 import functional as TF

    ds = dataset().zero_padded(64)
    assert ds.images.shape == (4, 3, 64, 64)
    assert torch.equal(ds.images, TF.center_crop(dataset().images, [64, 64]))  # torchvision pads the same way
    assert int(ds.images[:, :, 16:48, 16:48].min()) == 200 and int(ds.images[:, :, :16].max()) == 0


def test_erase_after_mix_erases_the_mixed_batch_and_keeps_soft_targets():
    x, y = torch.ones(6, 3, 8, 8), torch.arange(6) % 3
    erased = []

    def erase(batch, generator):
        erased.append(batch.clone())
        return batch * 0

    off = MixupCutmix(num_classes=3, label_smoothing=0.1)
    out, targets = MixThenErase(off, erase)(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(out, torch.zeros_like(x)) and torch.equal(erased[0], x)  # erased after (no) mixing
    assert torch.allclose(targets, one_hot_smooth(y, 3, 0.1))
    mixing = MixupCutmix(mixup_alpha=1.0, num_classes=3)
    out, targets = MixThenErase(mixing, erase)(x * torch.arange(6).view(6, 1, 1, 1), y,
                                                 torch.Generator().manual_seed(0))
    assert not torch.equal(erased[1], x * torch.arange(6).view(6, 1, 1, 1))  # it saw the mixed batch
    assert torch.allclose(targets.sum(1), torch.ones(6))


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    cfg = build_config(None, model="cm-cpu", wd=0.05, wd_norm_bias=False)
    optimizer, _ = build_optimizer(cfg, model, torch.device("cpu"), "fp32")
    decayed, plain = optimizer.param_groups
    assert [p.ndim for p in decayed["params"]] == [4] and decayed["weight_decay"] == 0.05
    assert sorted(p.ndim for p in plain["params"]) == [1, 1, 1] and plain["weight_decay"] == 0.0
    (single,) = build_optimizer(build_config(None, model="cm-cpu"), model, torch.device("cpu"), "fp32")[0].param_groups
    assert len(single["params"]) == 4


def test_cuda_amp_pins_the_precision_only_where_amp_is_auto():
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda, "fp16") == "fp16"
    assert resolve_precision("auto", cuda, "off") == "fp32"
    assert resolve_precision("bf16", cuda, "fp16") == "bf16"  # an explicit --amp wins
    assert resolve_precision("auto", torch.device("cpu"), "fp16") == resolve_precision("auto", torch.device("cpu"))


def test_keep_every_keeps_the_checkpoint_of_every_nth_epoch(data_root, tmp_path):
    cfg = build_config(None, model="cm-cpu", dim=8, depth=1, epochs=3, keep_every=2, train_subset=32,
                       test_subset=16, batch_size=16, amp="off", data_dir=str(data_root), out=str(tmp_path / "run"))
    train(cfg)
    kept = sorted(p.name for p in (tmp_path / "run").glob("epoch-*.pt"))
    assert kept == ["epoch-002.pt"]
    assert load_checkpoint(tmp_path / "run" / "epoch-002.pt")["epoch"] == 2


def test_options_that_do_not_fit_are_one_line_errors(tmp_path, capsys, data_root):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: cm-cpu\nschedule: warp\n")
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--schedule must be one of onecycle, onecycle-frac, cosine, constant, stlr, " \
        "onecycle-torch, got 'warp'" in err
    assert main(["train", "--model", "convnext-cifar", "--head-dropout", "0.2", "--data-dir", str(data_root),
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--head-dropout does not apply to model 'convnext-cifar' (convnext)" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
