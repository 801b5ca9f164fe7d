"""End-to-end training on real (JPEG-degraded) CIFAR-10 subsets, on CPU."""
import json

import pytest
import torch
import yaml

from isoconv.config import build_config
from isoconv.errors import ConfigError, UserError
from isoconv.train import train
from isoconv.weights import load_checkpoint

TINY = dict(model="cm-vanilla", dim=32, depth=2, kernel=3, patch=4, train_subset=256, test_subset=128,
            batch_size=64, epochs=2, lr_max=0.01, schedule="onecycle-frac", amp="off", ra_n=1, ra_m=8,
            jitter=0.1, reprob=0.25)


def tiny(data_root, tmp_path, name, **kw):
    return build_config(None, **{**TINY, "data_dir": str(data_root), "out": str(tmp_path / name), **kw})


def quiet(*_):
    pass


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_second")} for r in rows]


def test_run_directory_has_every_artifact(data_root, tmp_path):
    summary = train(tiny(data_root, tmp_path, "run"))
    run = tmp_path / "run"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["dim"] == 32 and cfg["epochs"] == 2 and cfg["data_dir"] == str(data_root)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5",
                            "epoch_seconds", "images_per_second", "skipped_steps"}
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # one-cycle ends at zero
    saved = json.loads((run / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert 0.0 <= saved["test_top1"] <= saved["test_top5"] <= 1.0
    assert saved["test_top1"] == rows[-1]["test_top1"]
    assert saved["params"] == sum(p.numel() for p in torch.nn.Module.parameters(
        __import__("isoconv").create_model("cm-vanilla", dim=32, depth=2, kernel_size=3, patch_size=4)))
    cm = torch.tensor(saved["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 128
    assert cm.diag().sum().item() / 128 == pytest.approx(saved["test_top1"])
    assert [c["class"] for c in saved["per_class"]][:3] == ["airplane", "automobile", "bird"]
    assert "truck" in (run / "report.txt").read_text()
    assert set(load_checkpoint(run / "last.pt")) >= {"model", "optimizer", "scaler", "epoch", "rng", "config"}


def test_same_seed_gives_same_metrics_and_other_seed_differs(data_root, tmp_path):
    a = train(tiny(data_root, tmp_path, "a", epochs=1))
    b = train(tiny(data_root, tmp_path, "b", epochs=1))
    train(tiny(data_root, tmp_path, "c", epochs=1, seed=1))
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert metrics(tmp_path / "a") != metrics(tmp_path / "c")


def test_resume_gives_identical_metrics_and_weights(data_root, tmp_path):
    train(tiny(data_root, tmp_path, "full"))
    train(tiny(data_root, tmp_path, "part"), stop_after=1)
    assert len(metrics(tmp_path / "part")) == 1
    assert not (tmp_path / "part" / "summary.json").exists()
    train(build_config(None, **load_checkpoint(tmp_path / "part" / "last.pt")["config"]),
          resume=tmp_path / "part")
    assert metrics(tmp_path / "part") == metrics(tmp_path / "full")
    full = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    part = load_checkpoint(tmp_path / "part" / "last.pt")["model"]
    assert all(torch.equal(full[k], part[k]) for k in full)


def test_resume_with_a_changed_setting_names_the_key(data_root, tmp_path):
    train(tiny(data_root, tmp_path, "r"), stop_after=1)
    with pytest.raises(ConfigError, match=r"lr_max: 0.01 -> 0.02"):
        train(tiny(data_root, tmp_path, "r", lr_max=0.02), resume=tmp_path / "r")


def test_existing_run_directory_is_not_overwritten(data_root, tmp_path):
    train(tiny(data_root, tmp_path, "x", epochs=1))
    with pytest.raises(UserError, match="already holds a run; use --resume"):
        train(tiny(data_root, tmp_path, "x", epochs=1))


def test_mixup_cutmix_label_smoothing_and_clipping_train(data_root, tmp_path):
    s = train(tiny(data_root, tmp_path, "mix", epochs=1, mixup=0.8, cutmix=1.0, mix_prob=1.0,
                   label_smoothing=0.1, clip_norm=1.0))
    row = metrics(tmp_path / "mix")[0]
    # soft targets with smoothing keep the loss well above zero, and it must be finite
    assert 0.5 < row["train_loss"] < 10
    assert 0 <= s["test_top1"] <= 1


def test_bf16_autocast_runs_on_cpu(data_root, tmp_path):
    s = train(tiny(data_root, tmp_path, "bf16", epochs=1, train_subset=128, amp="bf16"))
    assert s["amp"] == "bf16"


def test_a_small_convmixer_learns_cifar10(data_root, tmp_path):
    """A real learning test: 4,000 JPEG-degraded CIFAR-10 images, 1,000 held-out test images."""
    cfg = tiny(data_root, tmp_path, "learn", dim=64, depth=4, kernel=5, patch=2, train_subset=4000,
               test_subset=1000, epochs=4, batch_size=128, lr_max=0.01, ra_n=0, jitter=0, reprob=0, scale=1.0)
    s = train(cfg)
    assert s["test_top1"] > 0.35, s["test_top1"]  # chance is 0.10
