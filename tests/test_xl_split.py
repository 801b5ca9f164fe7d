"""The ConvMixer-XL study's exact CIFAR-10 test half (`--test-split xl-half`)."""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import pytest
import torch

from isoconv.data import ImageDataset
from isoconv.data import splits
from isoconv.data.splits import select_test_split, xl_half_from_torch, xl_half_indices
from isoconv.errors import ConfigError


def test_stored_half_is_the_studys_random_split():
    idx = xl_half_indices()
    assert idx.dtype == torch.int64 and idx.shape == (5000,)
    assert len(set(idx.tolist())) == 5000 and 0 <= int(idx.min()) and int(idx.max()) < 10000
    assert idx[:8].tolist() == [1935, 93, 7018, 494, 1756, 8885, 4406, 2851]  # the audit's torch 2.14.1 check
    # regenerate with the installed torch exactly as the study did: seed 1204, random_split, second half
    assert torch.equal(xl_half_from_torch(), idx)
    torch.manual_seed(1204)
    _, test = torch.utils.data.random_split(list(range(10000)), [5000, 5000])
    assert list(test.indices) == idx.tolist()


def test_regeneration_leaves_global_rng_alone():
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    xl_half_from_torch()
    assert torch.equal(torch.rand(3), want)


def test_checksum_is_checked(monkeypatch):
    data = resources.files("isoconv.data").joinpath(splits.XL_HALF_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == splits.XL_HALF_SHA256
    monkeypatch.setattr(splits, "XL_HALF_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="corrupt"):
        xl_half_indices()


def _fake_test_set(n: int) -> ImageDataset:
    images = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    return ImageDataset(images=images.contiguous(), labels=torch.arange(n, dtype=torch.int64), classes=["a"],
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), name="fake", split="test")


def test_select_test_split():
    ds = _fake_test_set(10000)
    assert select_test_split(ds, "full") is ds
    half = select_test_split(ds, "half")
    assert len(half) == 5000 and not torch.equal(half.labels, xl_half_indices())
    xl = select_test_split(ds, "xl-half")
    assert torch.equal(xl.labels, xl_half_indices())  # labels are the original positions here
    with pytest.raises(ConfigError, match="10,000"):
        select_test_split(_fake_test_set(100), "xl-half")
    with pytest.raises(ConfigError, match="unknown test split"):
        select_test_split(ds, "quarter")


def test_index_file_is_package_data():
    text = open(Path(__file__).resolve().parents[1] / "pyproject.toml", encoding="utf-8").read()
    assert "data/xl_test_half.txt" in text
