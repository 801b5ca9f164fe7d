"""Data provenance: per-file checksums against the official CIFAR release, and the sentences reports print."""
import hashlib
import json
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from isoconv.config import build_config
from isoconv.data import provenance
from isoconv.data.provenance import NOT_RECORDED, comparable, data_statement, verify_data
from isoconv.data.provenance import test_set_description as describe  # a test_* name would be collected
from isoconv.experiments.published import published_figures
from isoconv.experiments.report import write_run_report
from isoconv.experiments.results import RunResult, VariantResult, comparable_cell, setup_lines, table_markdown

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
MATCH = "official CIFAR-10 (every file matches the official release's checksum)"
DIFFERS = ("this CIFAR-10 copy differs from the official release (data_batch_1 checksum mismatch): "
           "accuracies may not compare with published figures")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test caches in its own folder; nothing is ever written next to the shared data."""
    monkeypatch.setenv("ISOCONV_CACHE", str(tmp_path / "cache"))


def write_official_layout(root: Path, seed: int = 0) -> Path:
    """Small pickles named and shaped as the official cifar-10-batches-py (10 images per batch)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in CIFAR10_FILES[:-1]:
        batch = {b"batch_label": name.encode(), b"labels": [int(x) for x in rng.integers(0, 10, 10)],
                 b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(10)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"num_cases_per_batch": 10, b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def official(tmp_path, monkeypatch) -> Path:
    """An 'official' release: the fixture's own md5s become the official table, so the real code path runs."""
    folder = write_official_layout(tmp_path / "official")
    monkeypatch.setitem(provenance.OFFICIAL_MD5, "cifar10", {n: md5(folder / n) for n in CIFAR10_FILES})
    return folder


def test_official_table_is_torchvisions():
    from torchvision.datasets import CIFAR10, CIFAR100

    for dataset, tv in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        expected = dict(tv.train_list + tv.test_list)
        expected[tv.meta["filename"]] = tv.meta["md5"]
        assert provenance.OFFICIAL_MD5[dataset] == expected


def test_matching_copy_is_official(official):
    verdict = verify_data("cifar10", official.parent)
    assert verdict == {"dataset": "cifar10", "official": True, "mismatch": [], "missing": [],
                       "checked": sorted(CIFAR10_FILES)}
    assert data_statement(verdict) == MATCH
    assert verify_data("cifar10", official) == verdict  # pointing at the batches folder itself


def test_changed_file_is_named(official, tmp_path):
    copy = tmp_path / "copy" / "cifar-10-batches-py"
    copy.mkdir(parents=True)
    for n in CIFAR10_FILES:
        (copy / n).write_bytes((official / n).read_bytes())
    blob = bytearray((copy / "data_batch_1").read_bytes())
    blob[-20] ^= 1  # one pixel bit
    (copy / "data_batch_1").write_bytes(bytes(blob))
    verdict = verify_data("cifar10", copy.parent)
    assert verdict["official"] is False and verdict["mismatch"] == ["data_batch_1"] and verdict["missing"] == []
    assert "known_copy" not in verdict
    assert data_statement(verdict) == DIFFERS
    assert str(tmp_path) not in data_statement(verdict)

    (copy / "test_batch").unlink()
    verdict = verify_data("cifar10", copy.parent)
    assert verdict["official"] is False and verdict["missing"] == ["test_batch"]
    assert "(data_batch_1 checksum mismatch; test_batch missing)" in data_statement(verdict)


def test_checksums_are_cached_and_recomputed_when_a_file_changes(official, tmp_path, monkeypatch):
    assert verify_data("cifar10", official.parent)["official"] is True
    cached = list((tmp_path / "cache").glob("cifar10*md5s.json"))
    entry = json.loads(cached[0].read_text())["files"]["test_batch"]
    assert len(cached) == 1 and entry["md5"] == md5(official / "test_batch")

    def no_hashing(path):
        raise AssertionError(f"recomputed the md5 of {path}")
    real = provenance.file_md5
    monkeypatch.setattr(provenance, "file_md5", no_hashing)
    assert verify_data("cifar10", official.parent)["official"] is True  # from the cache

    blob = bytearray((official / "test_batch").read_bytes())
    blob[-20] ^= 1
    (official / "test_batch").write_bytes(bytes(blob))
    os.utime(official / "test_batch", ns=(1, 1))  # a different mtime even on coarse-clock file systems
    with pytest.raises(AssertionError, match="recomputed the md5 of .*/test_batch$"):
        verify_data("cifar10", official.parent)  # only the changed file is read again
    monkeypatch.setattr(provenance, "file_md5", real)
    verdict = verify_data("cifar10", official.parent)
    assert verdict["official"] is False and verdict["mismatch"] == ["test_batch"]


@pytest.mark.skipif(os.name != "posix", reason="permission bits")
def test_read_only_folder_caches_in_the_home_cache(official, tmp_path, monkeypatch):
    monkeypatch.delenv("ISOCONV_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    official.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        assert verify_data("cifar10", official.parent)["official"] is True
        assert sorted(p.name for p in official.iterdir()) == sorted(CIFAR10_FILES)  # nothing written there
        assert len(list((tmp_path / "home" / ".cache" / "isoconv" / "cache").glob("cifar10*md5s.json"))) == 1
    finally:
        official.chmod(0o755)
    for p in (tmp_path / "home" / ".cache" / "isoconv" / "cache").iterdir():
        p.unlink()
    assert verify_data("cifar10", official.parent)["official"] is True
    assert len(list((official / ".isoconv-cache").glob("cifar10*md5s.json"))) == 1  # writable: beside the data


def test_shared_jpeg_copy_is_not_official(data_root):
    verdict = verify_data("cifar10", data_root)
    assert verdict["official"] is False
    assert set(verdict["mismatch"]) == set(CIFAR10_FILES) == set(verdict["checked"])
    assert verdict["known_copy"].startswith("the JPEG-degraded CIFAR-10 copy")  # recognised by its md5s
    assert data_statement(verdict).startswith("this CIFAR-10 copy differs from the official release")
    assert str(data_root) not in data_statement(verdict)


def test_datasets_without_official_checksums():
    tin = verify_data("tiny-imagenet", "/nonexistent")
    assert tin["official"] is None and "zip" in tin["reason"] and "extracted files" in tin["reason"]
    folder = verify_data("folder", "/nonexistent")
    assert folder == {"dataset": "folder", "official": None, "reason": "no official checksums for folder datasets"}
    assert data_statement(folder) == ("the image folder: provenance not checked (no official checksums for folder "
                                      "datasets)")
    assert data_statement(None) == NOT_RECORDED == "data provenance not recorded (run made by an older isoconv)"


@pytest.mark.parametrize("split,subset,total,text", [
    ("full", None, 10000, "full test split (10,000 images)"),
    ("half", None, 10000, "the fixed half of the test split (5,000 of 10,000)"),
    ("xl-half", None, 10000, "the XL study's half (5,000 of 10,000)"),
    ("full", 1000, 10000, "the first 1,000 images of the full test split"),
    ("half", 1000, 10000, "the first 1,000 images of the fixed half"),
    ("half", 5000, 10000, "the fixed half of the test split (5,000 of 10,000)"),  # a subset as large as the split
    (None, None, None, "full test split"),
])
def test_test_set_description(split, subset, total, text):
    assert describe(split, subset, total) == text


def test_comparable_needs_official_data_and_the_published_split():
    good = {"dataset": "cifar10", "official": True, "mismatch": [], "missing": [], "checked": CIFAR10_FILES}
    bad = {**good, "official": False, "mismatch": ["data_batch_1"]}
    assert comparable(good, "full", None, 10000, "full") == (True, "")
    assert comparable(good, "xl-half", None, 10000, "xl-half") == (True, "")
    ok, why = comparable(good, "half", None, 10000, "xl-half")  # isoconv's own half is not the study's
    assert not ok and why == "evaluated on the fixed half of the test split, published on the XL study's half"
    ok, why = comparable(good, "full", None, 10000, "xl-half")
    assert not ok and why == "evaluated on full test split, published on the XL study's half"
    ok, why = comparable(good, "full", 1000, 10000, "full")
    assert not ok and why == "evaluated on only the first 1,000 images of the full test split"
    assert comparable(bad, "full", None, 10000, "full") == (False, "data differs from the official release")
    assert comparable(None, "full", None, 10000, "full") == (False, "data provenance not recorded")


# ----------------------------------------------------------------------------- reports


def make_run(run_dir: Path, verdict, split="full", subset=None, recipe="cpu-quick") -> Path:
    cfg = build_config(recipe, test_split=split, test_subset=subset).to_dict()
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    row = {"epoch": 1, "lr": 0.01, "train_loss": 2.0, "train_acc": 0.3, "test_loss": 1.9, "test_top1": 0.35,
           "test_top5": 0.8, "epoch_seconds": 1.5}
    (run_dir / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    summary = {"test_top1": 0.35, "test_top5": 0.8, "macro_f1": 0.3, "params": 1000, "train_seconds": 1.5,
               "device": "cpu", "amp": "off", "torch": "2.x", "test_images": 10000 if split == "full" else 5000,
               "test_split": split, "test_subset": subset, "test_images_total": 10000}
    if verdict is not None:
        summary["data_provenance"] = verdict
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_run_report_states_the_data_and_the_test_images(official, tmp_path):
    copy = tmp_path / "modified" / "cifar-10-batches-py"
    copy.mkdir(parents=True)
    for n in CIFAR10_FILES:
        data = (official / n).read_bytes()
        (copy / n).write_bytes(data[:-1] + bytes([data[-1] ^ 1]) if n == "data_batch_1" else data)

    report = write_run_report(make_run(tmp_path / "a", verify_data("cifar10", official.parent))).read_text()
    assert f"Data: {MATCH}." in report and "Test images: full test split (10,000 images)." in report
    assert "JPEG" not in report and "shared/data" not in report

    report = write_run_report(make_run(tmp_path / "b", verify_data("cifar10", copy.parent), "half")).read_text()
    assert f"Data: {DIFFERS}." in report
    assert "Test images: the fixed half of the test split (5,000 of 10,000)." in report

    report = write_run_report(make_run(tmp_path / "c", None, "full", 1000)).read_text()
    assert f"Data: {NOT_RECORDED}." in report and "the first 1,000 images of the full test split" in report


def variant(tmp_path: Path, name: str, verdict, split: str, recipe: str = "cm-xl") -> VariantResult:
    run_dir = make_run(tmp_path / name, verdict, split, recipe=recipe)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    v = VariantResult(name=name, dir=name, config=config, settings={},
                      runs=[RunResult(0, 0, run_dir, "done", summary)])
    v.published = published_figures(config["published"])
    return v


def test_published_rows_say_whether_they_compare(official, tmp_path):
    good = verify_data("cifar10", official.parent)
    bad = {**good, "official": False, "mismatch": ["data_batch_1"]}
    rows = [variant(tmp_path, "ok", good, "xl-half"), variant(tmp_path, "jpeg", bad, "xl-half"),
            variant(tmp_path, "split", good, "full"), variant(tmp_path, "old", None, "xl-half"), variant(tmp_path, "own-half", good, "half"),
            variant(tmp_path, "ref25", good, "full", recipe="convmixer-cifar10-25ep")]
    assert [comparable_cell(v) for v in rows] == [
        "yes", "no: data differs from the official release",
        "no: evaluated on full test split, published on the XL study's half",
        "no: data provenance not recorded",
        "no: evaluated on the fixed half of the test split, published on the XL study's half", "yes"]
    table = table_markdown(rows)
    assert "| comparable? |" in table.splitlines()[0]
    assert "| 94.52 | yes |" in table and "| 94.52 | no: data differs from the official release |" in table

    lines = "\n".join(setup_lines({"commands": ["isoconv ablate x"], "baseline": "ok"}, rows[:2]))
    assert f"- **data**: {MATCH}; {DIFFERS}" in lines
    assert "the XL study's half (5,000 of 10,000)" in lines
