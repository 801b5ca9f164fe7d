"""Datasets beyond CIFAR-10: CIFAR-100, Tiny ImageNet (real sample), ImageFolder trees, the decode cache,
normalization statistics, the fixed test half, and a short train + eval run on Tiny ImageNet."""
import hashlib
import json
import os
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from isoconv.cli import main
from isoconv.config import build_config
from isoconv.data import cifar100 as cifar100_mod
from isoconv.data import tinyimagenet as tin_mod
from isoconv.data import (channel_stats, half_split_indices, holdout_indices, load_cifar10, load_dataset,
                          seeded_half)
from isoconv.data.images import BadImageError, decode_image
from isoconv.errors import ConfigError, UserError
from isoconv.weights.checkpoint import load_checkpoint
from isoconv.data import load_data

from conftest import CIFAR100_TEST, CIFAR100_TRAIN, py2_pickle

CPU = torch.device("cpu")


# The tiny_imagenet_root fixture points $ISOCONV_CACHE at a temporary folder, so nothing is ever cached next to the
# shared sample; tests of the in-folder cache unset it and work on a copy.


# ---------------------------------------------------------------------------------------------
# helpers


def tin_meta(root: Path):
    """(sorted wnids, first words.txt names, val rows [(file, wnid)]) parsed independently of isoconv."""
    folder = root / "tiny-imagenet-200"
    wnids = sorted((folder / "wnids.txt").read_text().split())
    words = dict(line.split("\t", 1) for line in (folder / "words.txt").read_text().splitlines())
    names = [words[w].split(",")[0].strip() for w in wnids]
    rows = [line.split("\t")[:2] for line in (folder / "val" / "val_annotations.txt").read_text().splitlines()]
    return wnids, names, rows


def small_tiny_copy(src_root: Path, dst_root: Path, n_classes: int = 4) -> Path:
    """A writable copy of the sample reduced to its first n_classes wnids (train images and their val rows)."""
    src, dst = src_root / "tiny-imagenet-200", dst_root / "tiny-imagenet-200"
    wnids = sorted((src / "wnids.txt").read_text().split())[:n_classes]
    (dst / "val" / "images").mkdir(parents=True)
    (dst / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (dst / "words.txt").write_text("".join(line + "\n" for line in (src / "words.txt").read_text().splitlines()
                                           if line.split("\t")[0] in wnids))
    for w in wnids:
        shutil.copytree(src / "train" / w, dst / "train" / w)
    rows = [line for line in (src / "val" / "val_annotations.txt").read_text().splitlines()
            if line.split("\t")[1] in wnids]
    for line in rows:
        shutil.copy2(src / "val" / "images" / line.split("\t")[0], dst / "val" / "images")
    (dst / "val" / "val_annotations.txt").write_text("".join(r + "\n" for r in rows))
    return dst_root


def cache_files(folder: Path, pattern: str = "*"):
    return sorted(p.name for p in (folder / ".isoconv-cache").glob(pattern))


def direct_stats(images: torch.Tensor):
    x = images.double() / 255
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3), unbiased=False)


@pytest.fixture(scope="module")
def tin_train(tiny_imagenet_root):
    return load_dataset("tiny-imagenet", tiny_imagenet_root, "train", download=False)


@pytest.fixture(scope="module")
def tin_test(tiny_imagenet_root, tin_train):
    return load_dataset("tiny-imagenet", tiny_imagenet_root, "test", download=False)


# ---------------------------------------------------------------------------------------------
# CIFAR-100


def test_cifar100_fine_and_coarse_labels(cifar100_root, data_root):
    source = load_cifar10(data_root, train=False, download=False).images
    train = load_dataset("cifar100", cifar100_root, "train", download=False)
    test = load_dataset("cifar100", cifar100_root, "test", download=False)
    assert (len(train), len(test), train.num_classes) == (CIFAR100_TRAIN, CIFAR100_TEST, 100)
    assert train.classes == [f"fine{i:02d}" for i in range(100)] and train.name == "cifar100"
    assert train.labels.tolist() == [i % 100 for i in range(CIFAR100_TRAIN)]
    assert test.labels.tolist() == [i % 100 for i in range(CIFAR100_TRAIN, CIFAR100_TRAIN + CIFAR100_TEST)]
    assert torch.equal(train.images, source[:CIFAR100_TRAIN])  # official plane layout kept
    assert torch.equal(test.images, source[CIFAR100_TRAIN:CIFAR100_TRAIN + CIFAR100_TEST])

    coarse = load_dataset("cifar100", cifar100_root, "train", download=False, label_type="coarse")
    assert coarse.num_classes == 20 and coarse.classes[:2] == ["coarse00", "coarse01"]
    assert coarse.labels.tolist() == [(i % 100) // 5 for i in range(CIFAR100_TRAIN)]

    # its own statistics, from the training split, shared by the test split
    mean, std = direct_stats(train.images)
    assert train.mean == pytest.approx(mean.tolist(), abs=1e-9) and train.std == pytest.approx(std.tolist(), abs=1e-9)
    assert test.mean == train.mean and test.std == train.std and coarse.mean == train.mean
    assert train.mean != pytest.approx((0.4914, 0.4822, 0.4465), abs=1e-4)  # not the CIFAR-10 constants


def test_cifar100_upsampled_at_load(cifar100_root):
    small = load_dataset("cifar100", cifar100_root, "test", download=False)
    big = load_dataset("cifar100", cifar100_root, "test", download=False, image_size=48)
    assert big.images.shape == (CIFAR100_TEST, 3, 48, 48) and big.image_size == 48
    expected = F.interpolate(small.images.float(), size=(48, 48), mode="bicubic", antialias=True,
                             align_corners=False).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(big.images, expected)
    assert torch.equal(big.labels, small.labels)
    assert big.mean != small.mean  # statistics of the images actually used


def _copy_cifar100(cifar100_root: Path, dst: Path) -> Path:
    shutil.copytree(cifar100_root / "cifar-100-python", dst / "cifar-100-python",
                    ignore=shutil.ignore_patterns(".*"))
    return dst / "cifar-100-python"


def test_cifar100_label_out_of_range_names_the_file(cifar100_root, tmp_path):
    folder = _copy_cifar100(cifar100_root, tmp_path)
    batch = pickle.loads((folder / "test").read_bytes(), encoding="bytes")
    batch[b"fine_labels"][3] = 100
    (folder / "test").write_bytes(py2_pickle(batch))
    with pytest.raises(UserError, match=r"fine_labels must lie in 0\.\.99, found 0\.\.100") as e:
        load_dataset("cifar100", tmp_path, "test", download=False)
    assert str(folder / "test") in str(e.value) and "CIFAR-100" in str(e.value)
    # the coarse labels of the same file are fine
    assert len(load_dataset("cifar100", tmp_path, "test", download=False, label_type="coarse")) == CIFAR100_TEST


def test_cifar100_restricted_unpickler(cifar100_root, tmp_path):
    folder = _copy_cifar100(cifar100_root, tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": Payload()}, protocol=2))
    with pytest.raises(UserError, match=r"refusing to unpickle .*system.*download CIFAR-100 again"):
        load_dataset("cifar100", tmp_path, "test", download=False)
    assert not marker.exists()


def test_cifar100_missing_and_incomplete(tmp_path, cifar100_root):
    with pytest.raises(UserError, match=r"CIFAR-100 not found at .*cifar-100-python.*--no-download"):
        load_dataset("cifar100", tmp_path / "none", "train", download=False)
    folder = _copy_cifar100(cifar100_root, tmp_path)
    (folder / "test").unlink()
    with pytest.raises(UserError, match=r"CIFAR-100 at .* is incomplete: test is missing"):
        load_dataset("cifar100", tmp_path, "test", download=False)


def _tar_archive(folder: Path, archive: Path) -> str:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return hashlib.md5(archive.read_bytes()).hexdigest()


def test_cifar100_download_md5_checked(cifar100_root, tmp_path, monkeypatch):
    src = _copy_cifar100(cifar100_root, tmp_path / "src")
    archive = tmp_path / "srv" / "cifar-100-python.tar.gz"
    md5 = _tar_archive(src, archive)
    monkeypatch.setattr(cifar100_mod, "CIFAR100_URL", archive.as_uri())
    monkeypatch.setattr(cifar100_mod, "CIFAR100_MD5", "0" * 32)
    root = tmp_path / "root"
    with pytest.raises(UserError, match=f"CIFAR-100 archive from .* has md5 {md5}, expected 0{{32}}"):
        load_dataset("cifar100", root, "test")
    assert not root.exists()  # nothing half-written, not even the folder
    monkeypatch.setattr(cifar100_mod, "CIFAR100_MD5", md5)
    ds = load_dataset("cifar100", root, "test")
    assert [p.name for p in root.iterdir()] == ["cifar-100-python"]
    assert len(ds) == CIFAR100_TEST and ds.classes[0] == "fine00"


# ---------------------------------------------------------------------------------------------
# Tiny ImageNet (the real sample)


def test_tiny_imagenet_sample_loads(tiny_imagenet_root, tin_train, tin_test):
    wnids, names, rows = tin_meta(tiny_imagenet_root)
    assert (len(tin_train), len(tin_test), tin_train.num_classes) == (6000, 2000, 200)
    assert tin_train.classes == names == tin_test.classes
    assert names[:3] == ["goldfish", "European fire salamander", "bullfrog"]
    assert torch.bincount(tin_train.labels, minlength=200).tolist() == [30] * 200
    assert tin_test.labels.tolist() == [wnids.index(w) for _, w in rows]
    assert tin_train.images.shape == (6000, 3, 32, 32) and tin_test.name == "tiny-imagenet"
    # pixels are the files' own; train is interleaved round-robin over classes (sorted file order within a
    # class), so the first N images of a subset cover every class
    folder = tiny_imagenet_root / "tiny-imagenet-200"
    files = sorted(os.listdir(folder / "train" / wnids[1] / "images"))
    assert torch.equal(tin_train.images[1], decode_image(folder / "train" / wnids[1] / "images" / files[0]))
    assert torch.equal(tin_train.images[201], decode_image(folder / "train" / wnids[1] / "images" / files[1]))
    assert tin_train.labels[:400].tolist() == list(range(200)) * 2
    assert torch.bincount(tin_train.subset(1000).labels, minlength=200).tolist() == [5] * 200
    assert torch.equal(tin_test.images[1999], decode_image(folder / "val" / "images" / rows[1999][0]))


def test_tiny_imagenet_normalization_stats(tin_train, tin_test):
    mean, std = direct_stats(tin_train.images)
    assert tin_train.mean == pytest.approx(mean.tolist(), abs=1e-9)
    assert tin_train.std == pytest.approx(std.tolist(), abs=1e-9)
    assert (tin_test.mean, tin_test.std) == (tin_train.mean, tin_train.std)
    assert channel_stats(tin_test.images) != (tin_train.mean, tin_train.std)


def test_tiny_imagenet_cache_hit_is_equal_and_decodes_nothing(tiny_imagenet_root, tmp_path, monkeypatch, capsys):
    root = small_tiny_copy(tiny_imagenet_root, tmp_path)
    folder = root / "tiny-imagenet-200"
    monkeypatch.delenv("ISOCONV_CACHE")
    first = load_dataset("tiny-imagenet", root, "train", download=False)
    assert "decoding 120 images" in capsys.readouterr().err
    assert len(cache_files(folder, "tiny-imagenet-train-native-*.pt")) == 1
    again = load_dataset("tiny-imagenet", root, "train", download=False)
    assert "decoding" not in capsys.readouterr().err
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert (first.mean, first.std, first.classes) == (again.mean, again.std, again.classes)


def test_stale_cache_is_rebuilt_when_files_change(tiny_imagenet_root, tmp_path, monkeypatch, capsys):
    root = small_tiny_copy(tiny_imagenet_root, tmp_path)
    folder = root / "tiny-imagenet-200"
    monkeypatch.delenv("ISOCONV_CACHE")
    before = load_dataset("tiny-imagenet", root, "train", download=False)
    old = cache_files(folder, "*train*.pt")
    images = sorted((folder / "train").glob("*/images"))[2]
    shutil.copy(images / os.listdir(images)[0], images / "zz_added.JPEG")
    capsys.readouterr()
    added = load_dataset("tiny-imagenet", root, "train", download=False)
    err = capsys.readouterr().err
    assert "is stale" in err and "decoding 121 images" in err
    assert len(added) == len(before) + 1 and torch.bincount(added.labels).tolist() == [30, 30, 31, 30]
    # classes are interleaved round-robin, so the one 31st image comes after 30 rounds of 4 classes
    assert torch.equal(added.images[120], decode_image(images / "zz_added.JPEG"))
    new = cache_files(folder, "*train*.pt")
    assert len(new) == 1 and new != old  # the stale file is gone
    (images / "zz_added.JPEG").unlink()
    (images / sorted(os.listdir(images))[0]).unlink()
    removed = load_dataset("tiny-imagenet", root, "train", download=False)
    assert len(removed) == len(before) - 1 and "is stale" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "garbage"])
def test_corrupt_cache_is_rebuilt_with_a_warning(tiny_imagenet_root, tmp_path, monkeypatch, capsys, damage):
    root = small_tiny_copy(tiny_imagenet_root, tmp_path, n_classes=2)
    folder = root / "tiny-imagenet-200"
    monkeypatch.delenv("ISOCONV_CACHE")
    good = load_dataset("tiny-imagenet", root, "test", download=False)
    (path,) = (folder / ".isoconv-cache").glob("*val*.pt")
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip-byte":
        blob[int(len(blob) * 0.6)] ^= 0xFF  # inside the pixel data
    else:
        blob = bytearray(b"not a torch file")
    path.write_bytes(bytes(blob))
    capsys.readouterr()
    rebuilt = load_dataset("tiny-imagenet", root, "test", download=False)
    err = capsys.readouterr().err
    assert f"cache file {path} is corrupt" in err and "rebuilding" in err
    assert torch.equal(rebuilt.images, good.images) and torch.equal(rebuilt.labels, good.labels)
    load_dataset("tiny-imagenet", root, "test", download=False)
    assert "corrupt" not in capsys.readouterr().err  # the rebuilt file is valid


def test_unwritable_data_folder_falls_back_to_home_cache(tiny_imagenet_root, tmp_path, monkeypatch, capsys):
    root = small_tiny_copy(tiny_imagenet_root, tmp_path / "data", n_classes=2)
    monkeypatch.delenv("ISOCONV_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (root / "tiny-imagenet-200" / ".isoconv-cache").write_text("a file where the cache folder would go")
    ds = load_dataset("tiny-imagenet", root, "train", download=False)
    assert "caching in" in capsys.readouterr().err
    fallback = tmp_path / "home" / ".cache" / "isoconv" / "cache"
    assert len(list(fallback.glob("tiny-imagenet-*-train-native-*.pt"))) == 1
    again = load_dataset("tiny-imagenet", root, "train", download=False)
    assert "decoding" not in capsys.readouterr().err and torch.equal(again.images, ds.images)


def test_tiny_imagenet_grayscale_becomes_rgb_and_errors(tiny_imagenet_root, tmp_path):
    root = small_tiny_copy(tiny_imagenet_root, tmp_path, n_classes=2)
    folder = root / "tiny-imagenet-200"
    wnids = (folder / "wnids.txt").read_text().split()
    val = folder / "val" / "val_annotations.txt"
    first = val.read_text().splitlines()[0].split("\t")[0]
    gray = Image.open(folder / "val" / "images" / first).convert("L")
    gray.save(folder / "val" / "images" / first, format="JPEG", quality=95)
    ds = load_dataset("tiny-imagenet", root, "test", download=False)
    assert torch.equal(ds.images[0, 0], ds.images[0, 1]) and torch.equal(ds.images[0, 1], ds.images[0, 2])
    assert torch.equal(ds.images[0, 0], torch.from_numpy(np.array(Image.open(folder / "val" / "images" / first))))

    # a val label outside the classes
    lines = val.read_text().splitlines()
    val.write_text("\n".join(lines[:3] + [lines[3].replace(lines[3].split("\t")[1], "n99999999")] + lines[4:]))
    with pytest.raises(UserError, match=r"val_annotations.txt line 4: class 'n99999999' .* not in wnids.txt"):
        load_dataset("tiny-imagenet", root, "test", download=False)
    # an empty class folder
    for f in (folder / "train" / wnids[1] / "images").iterdir():
        f.unlink()
    with pytest.raises(UserError, match=rf"class folder .*{wnids[1]}/images has no images"):
        load_dataset("tiny-imagenet", root, "train", download=False)
    # missing splits: train/ (the test split needs its statistics) and val/ (checked before train/ is decoded)
    shutil.rmtree(folder / "train")
    with pytest.raises(UserError, match=r"Tiny ImageNet at .* is incomplete: the train/ split is missing"):
        load_dataset("tiny-imagenet", root, "test", download=False)
    shutil.rmtree(folder / "val")
    with pytest.raises(UserError, match=r"is incomplete: the val/ split \(val/val_annotations.txt\) is missing"):
        load_dataset("tiny-imagenet", root, "train", download=False)


def _zip_folder(folder: Path, archive: Path, extra=()) -> str:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(folder.parent).as_posix())
        for info, data in extra:
            zf.writestr(info, data)
    return hashlib.md5(archive.read_bytes()).hexdigest()


def _symlink_member():
    info = zipfile.ZipInfo("tiny-imagenet-200/link")
    info.external_attr = (0o120777 << 16)
    return info, "/etc/passwd"


@pytest.mark.parametrize("extra", [[], [("../escaped.txt", "x")], [_symlink_member()]],
                         ids=["ok", "dotdot", "symlink"])
def test_tiny_imagenet_zip_download(tiny_imagenet_root, tmp_path, monkeypatch, extra):
    src = small_tiny_copy(tiny_imagenet_root, tmp_path / "src", n_classes=2) / "tiny-imagenet-200"
    archive = tmp_path / "srv" / "tiny-imagenet-200.zip"
    md5 = _zip_folder(src, archive, extra)
    monkeypatch.setattr(tin_mod, "TINY_IMAGENET_URL", archive.as_uri())
    monkeypatch.setattr(tin_mod, "TINY_IMAGENET_MD5", md5)
    root = tmp_path / "root"
    if extra:
        with pytest.raises(UserError, match=r"refusing to extract member"):
            load_dataset("tiny-imagenet", root, "test")
        assert not root.exists() and not (tmp_path / "escaped.txt").exists()
        return
    ds = load_dataset("tiny-imagenet", root, "test")
    assert [p.name for p in root.iterdir()] == ["tiny-imagenet-200"]
    assert ds.num_classes == 2 and len(ds) == len((src / "val" / "val_annotations.txt").read_text().splitlines())


# ---------------------------------------------------------------------------------------------
# ImageFolder trees


def make_tree(tin_root: Path, dst: Path, *, val: bool = True, per_class: int = 6) -> dict:
    """train/ (and val/) with 3 classes of real images saved as JPEG, PNG, BMP and grayscale PNG."""
    src = tin_root / "tiny-imagenet-200" / "train"
    wnids = sorted(os.listdir(src))[:3]
    formats = [("jpg", "JPEG", "RGB"), ("png", "PNG", "RGB"), ("bmp", "BMP", "RGB"), ("png", "PNG", "L")]
    files = {}
    for split, offset, n in (("train", 0, per_class), ("val", per_class, 2)):
        if split == "val" and not val:
            continue
        for c, (name, wnid) in enumerate(zip(["cat", "apple", "bee"], wnids)):
            for i in range(n):
                ext, fmt, mode = formats[(c + i) % len(formats)]
                out = dst / split / name / f"img{i:02d}.{ext}"
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.open(src / wnid / "images" / f"{wnid}_{offset + i}.JPEG").convert(mode).save(out, format=fmt)
                files.setdefault(split, []).append(out)
    (dst / "train" / "cat" / "notes.txt").write_text("not an image: ignored")
    return files


def interleaved(paths):
    """Files in the order the folder loader keeps them: the 1st file of every class, then the 2nd, ..."""
    ordered = sorted(paths, key=lambda p: (p.parent.name, p.name))
    rank = {p: sum(q.parent.name == p.parent.name for q in ordered[:i]) for i, p in enumerate(ordered)}
    return sorted(ordered, key=lambda p: (rank[p], p.parent.name))


def test_folder_with_val_formats_and_grayscale(tiny_imagenet_root, tmp_path):
    files = make_tree(tiny_imagenet_root, tmp_path)
    train = load_dataset("folder", tmp_path, "train")
    test = load_dataset("folder", tmp_path, "test")
    assert train.classes == ["apple", "bee", "cat"] == test.classes  # sorted folder names
    assert (len(train), len(test)) == (18, 6) and train.name == "folder"
    assert train.labels.tolist() == [0, 1, 2] * 6  # interleaved round-robin over classes
    expected = interleaved(files["train"])
    for i, path in enumerate(expected):
        assert torch.equal(train.images[i], decode_image(path)), path
    gray = [i for i, p in enumerate(expected) if Image.open(p).mode == "L"]
    assert gray and all(torch.equal(train.images[i, 0], train.images[i, 2]) for i in gray)
    mean, std = direct_stats(train.images)
    assert train.mean == pytest.approx(mean.tolist(), abs=1e-9) and test.std == pytest.approx(std.tolist(), abs=1e-9)


def test_folder_val_split_is_fixed(tiny_imagenet_root, tmp_path):
    files = make_tree(tiny_imagenet_root, tmp_path, val=False)
    for split in ("test", "train"):  # a missing test split fails before anything is decoded
        with pytest.raises(UserError, match=r"has no val/ folder .*--val-split 0\.1"):
            load_dataset("folder", tmp_path, split)
    assert not (tmp_path / ".isoconv-cache").exists()
    order = sorted(files["train"], key=lambda p: (p.parent.name, p.name))  # the hold-out is drawn in this order

    def images_labels(indices):  # each part is then interleaved over classes
        paths = interleaved([order[i] for i in indices.tolist()])
        return (torch.stack([decode_image(p) for p in paths]),
                torch.tensor([["apple", "bee", "cat"].index(p.parent.name) for p in paths]))

    a = load_dataset("folder", tmp_path, "test", val_split=0.25)
    b = load_dataset("folder", tmp_path, "test", val_split=0.25)
    rest = load_dataset("folder", tmp_path, "train", val_split=0.25)
    kept, held = holdout_indices(18, 0.25)
    assert (len(a), len(rest)) == (4, 14) and sorted(kept.tolist() + held.tolist()) == list(range(18))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    (held_images, held_labels), (kept_images, kept_labels) = images_labels(held), images_labels(kept)
    assert torch.equal(a.images, held_images) and torch.equal(a.labels, held_labels)
    assert torch.equal(rest.images, kept_images) and torch.equal(rest.labels, kept_labels)
    assert (a.mean, a.std) == (rest.mean, rest.std) == channel_stats(kept_images)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"has a val/ folder, so --val-split 0\.25"):
        load_dataset("folder", tmp_path, "test", val_split=0.25)


def test_folder_image_size_resizes_at_decode(tiny_imagenet_root, tmp_path):
    files = make_tree(tiny_imagenet_root, tmp_path)
    ds = load_dataset("folder", tmp_path, "test", image_size=48)
    assert ds.images.shape == (6, 3, 48, 48)
    first = sorted(files["val"], key=lambda p: (p.parent.name, p.name))[0]
    assert torch.equal(ds.images[0], decode_image(first, 48))
    # mixed sizes need --image-size
    Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / "val" / "cat" / "big.png")
    with pytest.raises(UserError, match=r"images differ in size: .*big.png is 40x40 .*--image-size"):
        load_dataset("folder", tmp_path, "test")
    assert load_dataset("folder", tmp_path, "test", image_size=32).images.shape == (7, 3, 32, 32)


def test_folder_truncated_image_fails_or_is_skipped(tiny_imagenet_root, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ISOCONV_CACHE")
    make_tree(tiny_imagenet_root, tmp_path)
    bad = tmp_path / "train" / "bee" / "broken.jpg"
    Image.open(tiny_imagenet_root / "tiny-imagenet-200" / "val" / "images" / "val_0.JPEG").save(bad, format="JPEG")
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(BadImageError, match=rf"cannot read image {bad}: .*--skip-bad-images"):
        load_dataset("folder", tmp_path, "train")
    assert not (tmp_path / ".isoconv-cache").exists() or cache_files(tmp_path, "*train*") == []  # nothing half-written
    capsys.readouterr()
    ds = load_dataset("folder", tmp_path, "train", skip_bad_images=True)
    assert len(ds) == 18 and ds.skipped == ("train/bee/broken.jpg",)
    assert torch.bincount(ds.labels).tolist() == [6, 6, 6]
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err
    # the cache remembers the bad file: without the flag the same error, with it the same data
    with pytest.raises(BadImageError, match=rf"cannot read image {bad}"):
        load_dataset("folder", tmp_path, "train")
    again = load_dataset("folder", tmp_path, "train", skip_bad_images=True)
    assert torch.equal(again.images, ds.images) and "decoding" not in capsys.readouterr().err


def test_folder_structure_errors(tiny_imagenet_root, tmp_path):
    with pytest.raises(UserError, match=r"has no train/ folder"):
        load_dataset("folder", tmp_path, "train")
    make_tree(tiny_imagenet_root, tmp_path)
    (tmp_path / "val" / "dog").mkdir()
    shutil.copy(next((tmp_path / "val" / "cat").iterdir()), tmp_path / "val" / "dog")
    with pytest.raises(UserError, match=r"val/dog is not a class of .*train .*outside the 3 training classes"):
        load_dataset("folder", tmp_path, "test")
    shutil.rmtree(tmp_path / "val" / "dog")
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"class folder .*train/empty has no images"):
        load_dataset("folder", tmp_path, "train")


def test_dataset_option_errors(tmp_path, cifar100_root):
    with pytest.raises(UserError, match=r"unknown dataset 'imagenet'; choose one of: cifar10, cifar10-lossless, cifar100, "
                                        r"tiny-imagenet, folder"):
        load_dataset("imagenet", tmp_path, "train")
    with pytest.raises(ConfigError, match=r"--label-type coarse applies only to --dataset cifar100"):
        load_dataset("tiny-imagenet", tmp_path, "train", label_type="coarse")
    with pytest.raises(ConfigError, match=r"val_split applies only to the folder dataset"):
        load_dataset("cifar100", cifar100_root, "train", val_split=0.1)
    assert len(load_dataset("CIFAR_100", cifar100_root, "test", download=False)) == CIFAR100_TEST


# ---------------------------------------------------------------------------------------------
# the fixed test half and end to end


def test_test_split_half_is_a_fixed_random_half(data_root):
    idx = half_split_indices(10000)
    assert len(idx) == 5000 and len(set(idx.tolist())) == 5000 and 0 <= idx.min() and idx.max() < 10000
    assert torch.all(idx[1:] > idx[:-1])  # original order kept
    assert idx[:8].tolist() == [3, 4, 7, 9, 10, 14, 15, 17]  # pinned: the same half in every version
    assert torch.equal(idx, half_split_indices(10000)) and not torch.equal(idx, half_split_indices(10000, seed=1))
    cfg = build_config(None, data_dir=str(data_root), download=False, test_split="half", test_subset=1000)
    _, test = load_data(cfg, CPU, train=False)
    full = load_cifar10(data_root, train=False, download=False)
    assert len(test) == 1000  # --test-subset applies to the half
    assert torch.equal(test.images, full.images[idx[:1000]]) and torch.equal(test.labels, full.labels[idx[:1000]])
    half = seeded_half(full)
    assert len(half) == 5000 and 400 < torch.bincount(half.labels).min() <= torch.bincount(half.labels).max() < 600


def test_train_and_eval_end_to_end_on_tiny_imagenet(tiny_imagenet_root, tmp_path, tin_train, capsys):
    _, names, _ = tin_meta(tiny_imagenet_root)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "tiny-imagenet", "--data-dir", str(tiny_imagenet_root), "--no-download",
                 "--model", "cm-cpu", "--dim", "16", "--depth", "1", "--epochs", "1", "--train-subset", "256",
                 "--test-subset", "200", "--batch-size", "64", "--amp", "off", "--no-aug", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"] == "tiny-imagenet" and summary["classes"] == names
    assert summary["test_images"] == 200 and len(summary["confusion_matrix"]) == 200
    meta = load_checkpoint(run / "last.pt")["data"]
    assert meta["classes"] == names and meta["image_size"] == 32
    assert meta["mean"] == pytest.approx(list(tin_train.mean)) and meta["std"] == pytest.approx(list(tin_train.std))
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--json", str(out), "--test-subset", "200"]) == 0
    report = json.loads(out.read_text())
    assert report["classes"] == names and report["test_images"] == 200
    assert report["test_top1"] == pytest.approx(summary["test_top1"])
    assert "goldfish" in capsys.readouterr().out
