"""Data loading: the real CIFAR-10 copy, the restricted unpickler, and the (offline) download path."""
import hashlib
import io
import os
import pickle
import re
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from isoconv.augment.batched import BatchAugment
from isoconv.data import ImageDataset, channel_stats, load_cifar10, load_dataset, resolve_data_root
from isoconv.data import cifar as cifar_mod
from isoconv.data.cifar import CIFAR10_MEAN, CIFAR10_STD, RestrictedUnpickler, load_pickle
from isoconv.errors import UserError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCH_COUNTS = [  # label counts per training batch, from shared/data/README.md
    [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981],
    [984, 1007, 1010, 995, 1010, 988, 1008, 1026, 987, 985],
    [994, 1042, 965, 997, 990, 1029, 978, 1015, 961, 1029],
    [1003, 963, 1041, 976, 1004, 1021, 1004, 981, 1024, 983],
    [1014, 1014, 952, 1016, 997, 1025, 980, 977, 1003, 1022],
]
BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@pytest.fixture(scope="module")
def train_ds(data_root) -> ImageDataset:
    return load_cifar10(data_root, train=True, download=False)


@pytest.fixture(scope="module")
def test_ds(data_root) -> ImageDataset:
    return load_cifar10(data_root, train=False, download=False)


# ---------------------------------------------------------------------------------------------
# the real data


def test_train_split_shapes_and_counts(train_ds):
    assert len(train_ds) == 50000
    assert train_ds.images.shape == (50000, 3, 32, 32)
    assert train_ds.images.dtype == torch.uint8 and train_ds.images.is_contiguous()
    assert train_ds.labels.shape == (50000,) and train_ds.labels.dtype == torch.int64
    assert torch.bincount(train_ds.labels, minlength=10).tolist() == [5000] * 10
    for k, expected in enumerate(BATCH_COUNTS):
        got = torch.bincount(train_ds.labels[10000 * k: 10000 * (k + 1)], minlength=10).tolist()
        assert got == expected, f"data_batch_{k + 1}"
    assert train_ds.classes == CLASSES
    assert (train_ds.name, train_ds.split) == ("cifar10", "train")
    assert train_ds.num_classes == 10 and train_ds.image_size == 32
    assert train_ds.mean == CIFAR10_MEAN == (0.4914, 0.4822, 0.4465)
    assert train_ds.std == CIFAR10_STD == (0.2471, 0.2435, 0.2616)


def test_test_split_shapes_and_counts(test_ds):
    assert len(test_ds) == 10000
    assert test_ds.images.shape == (10000, 3, 32, 32) and test_ds.images.dtype == torch.uint8
    assert test_ds.labels.dtype == torch.int64
    assert torch.bincount(test_ds.labels, minlength=10).tolist() == [1000] * 10
    assert test_ds.classes == CLASSES
    assert test_ds.split == "test"


def test_channel_stats_close_to_reference(train_ds):
    x = train_ds.images[:5000].float().div_(255)
    mean = x.mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(CIFAR10_MEAN), atol=5e-3)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).mean()
    return float(10 * torch.log10(255.0 ** 2 / mse))


def test_pixels_match_lossless_reference(test_ds, train_ds, lossless_subset):
    ref = np.load(lossless_subset)
    ref_test = torch.from_numpy(ref["test_images_hwc"]).permute(0, 3, 1, 2).float()  # HWC -> CHW
    assert ref_test.shape == (1000, 3, 32, 32)
    ours = test_ds.images[:1000].float()
    mad = (ours - ref_test).abs().mean().item()
    assert mad < 10, mad
    assert _psnr(ours, ref_test) > 25
    per_image = [_psnr(ours[i], ref_test[i]) for i in range(0, 1000, 50)]
    assert min(per_image) > 20, per_image
    # a one-position misalignment is far worse (the order is right)
    shifted_mad = (ours[1:] - ref_test[:-1]).abs().mean().item()
    assert shifted_mad > 3 * mad
    assert _psnr(ours[1:], ref_test[:-1]) < 15
    # channel-plane layout: a transposed image is far worse too
    assert _psnr(ours.transpose(2, 3), ref_test) < 15
    # labels agree with the reference subset
    assert test_ds.labels[:1000].tolist() == ref["test_labels"].tolist()
    assert train_ds.labels[:4000].tolist() == ref["train_labels"].tolist()


def test_load_dataset_dispatch(data_root, test_ds):
    ds = load_dataset("cifar10", data_root, "test", download=False)
    assert torch.equal(ds.images, test_ds.images) and torch.equal(ds.labels, test_ds.labels)
    with pytest.raises(UserError, match=r"'cifar1000'.*cifar10, cifar10-lossless, cifar100, tiny-imagenet, folder"):
        load_dataset("cifar1000", data_root, "test")
    with pytest.raises(UserError, match=r"'val'.*train, test"):
        load_dataset("cifar10", data_root, "val")


def test_batches_folder_itself_is_accepted(data_root):
    ds = load_cifar10(data_root / "cifar-10-batches-py", train=False, download=False)
    assert len(ds) == 10000


# ---------------------------------------------------------------------------------------------
# ImageDataset


def test_subset_and_to(test_ds):
    sub = test_ds.subset(100)
    assert len(sub) == 100
    assert torch.equal(sub.images, test_ds.images[:100]) and torch.equal(sub.labels, test_ds.labels[:100])
    assert sub.images.is_contiguous()
    assert (sub.classes, sub.mean, sub.std, sub.name, sub.split) == (
        test_ds.classes, test_ds.mean, test_ds.std, test_ds.name, test_ds.split)
    assert len(test_ds) == 10000  # original untouched
    assert test_ds.subset(None) is test_ds
    assert len(test_ds.subset(10000)) == 10000
    with pytest.raises(UserError) as e:
        test_ds.subset(12345)
    assert "12345" in str(e.value) and "10000" in str(e.value)
    assert len(test_ds.subset(np.int64(7))) == 7
    for bad in (0, -3, 2.5, True):
        with pytest.raises(UserError, match=f"subset size {bad!r} is invalid"):
            test_ds.subset(bad)
    moved = sub.to("cpu")
    assert moved.images.device.type == "cpu" and torch.equal(moved.images, sub.images)
    if torch.cuda.is_available():
        on_gpu = sub.to("cuda")
        assert on_gpu.images.is_cuda and on_gpu.labels.is_cuda and on_gpu.classes == sub.classes


def test_dataset_rejects_bad_tensors():
    with pytest.raises(ValueError):
        ImageDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64), ["a"], (0, 0, 0), (1, 1, 1), "x", "train")
    with pytest.raises(ValueError):
        ImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), ["a"],
                     (0, 0, 0), (1, 1, 1), "x", "train")


# ---------------------------------------------------------------------------------------------
# data root


def test_resolve_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ISOCONV_DATA", str(tmp_path / "env"))
    assert resolve_data_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_data_root("~/data") == tmp_path / "home" / "data"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("ISOCONV_DATA")
    assert resolve_data_root(None) == tmp_path / "home" / ".cache" / "isoconv"


# ---------------------------------------------------------------------------------------------
# restricted unpickler and broken files


def _fake_folder(tmp_path: Path, data_root: Path, name: str = "root") -> Path:
    """A root whose cifar-10-batches-py has the real batches.meta and nothing else yet."""
    folder = tmp_path / name / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes((data_root / "cifar-10-batches-py" / "batches.meta").read_bytes())
    return folder


class _ShellPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class _ExecPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("payload_cls", [_ShellPayload, _ExecPayload])
@pytest.mark.parametrize("where", ["test_batch", "batches.meta"])
def test_restricted_unpickler_refuses_malicious_pickle(tmp_path, data_root, payload_cls, where):
    folder = _fake_folder(tmp_path, data_root)
    marker = tmp_path / "pwned"
    payload = payload_cls(marker)
    if where == "test_batch":
        evil = {"batch_label": "testing batch 1 of 1", "labels": [0], "data": payload}
    else:
        evil = {"num_cases_per_batch": 1, "label_names": payload, "num_vis": 3072}
        real = data_root / "cifar-10-batches-py" / "test_batch"
        (folder / "test_batch").write_bytes(real.read_bytes())
    with open(folder / where, "wb") as f:
        pickle.dump(evil, f, protocol=2)

    with pytest.raises(UserError) as e:
        load_cifar10(folder.parent, train=False, download=False)
    msg = str(e.value)
    func = os.system if payload_cls is _ShellPayload else exec
    # protocol 2 spells builtins as __builtin__ (py2 compatibility)
    assert re.search(rf"refusing to unpickle (posix|nt|os|builtins|__builtin__)\.{func.__name__}: ", msg), msg
    assert where in msg and "malicious" in msg
    assert not marker.exists()

    # the payload is real: an unrestricted unpickler would have run it
    with open(folder / where, "rb") as f:
        pickle.load(f, encoding="latin1")
    assert marker.exists()


def test_restricted_unpickler_admits_only_numpy_array_globals():
    from numpy import dtype, ndarray

    u = RestrictedUnpickler(io.BytesIO(b""), path="x")
    assert u.find_class("numpy", "ndarray") is ndarray
    assert u.find_class("numpy", "dtype") is dtype
    rec = u.find_class("numpy.core.multiarray", "_reconstruct")
    assert u.find_class("numpy._core.multiarray", "_reconstruct") is rec
    for module, name in [("numpy", "load"), ("numpy.core.multiarray", "scalar"), ("builtins", "eval"),
                         ("_codecs", "decode"), ("codecs", "encode"), ("builtins", "bytearray"),
                         ("numpy.core.multiarray", "_reconstruct_"), ("numpy._core.numeric", "frombuffer")]:
        with pytest.raises(UserError, match=rf"x: refusing to unpickle {module}\.{name}:"):
            u.find_class(module, name)


def test_restricted_unpickler_pins_codecs_encode_and_bytes_to_what_pickle_writes():
    u = RestrictedUnpickler(io.BytesIO(b""), path="x")
    encode = u.find_class("_codecs", "encode")
    assert encode("\xff\x00a", "latin1") == b"\xff\x00a"
    assert encode("ab", "latin-1") == b"ab"
    for args in [("ab", "rot13"), ("ab", "zlib_codec"), (b"ab", "latin1"), ("ab", "utf-8")]:
        with pytest.raises(ValueError, match="only allowed as str -> latin1"):
            encode(*args)
    empty = u.find_class("__builtin__", "bytes")
    assert empty() == b"" and u.find_class("builtins", "bytes")() == b""
    with pytest.raises(ValueError, match="not allowed"):
        empty(10 ** 12)


def _official_style_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch 1 of 5",
            b"labels": [int(x) for x in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n - 1)] + [b""]}


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_cifar_format_pickle_loads_with_every_protocol(tmp_path, protocol):
    """Python 3 writes bytes via _codecs.encode (protocols 0-2) and arrays via _frombuffer (protocol 5)."""
    batch = _official_style_batch(7, seed=protocol)
    meta = {b"num_cases_per_batch": 7, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))

    d = load_pickle(folder / "test_batch")
    assert sorted(d) == ["batch_label", "data", "filenames", "labels"]
    assert d["batch_label"] == b"training batch 1 of 5"
    assert d["filenames"] == batch[b"filenames"]
    assert d["labels"] == batch[b"labels"]
    assert d["data"].dtype == np.uint8 and np.array_equal(d["data"], batch[b"data"])

    ds = load_cifar10(tmp_path, train=False, download=False)
    assert ds.classes == CLASSES
    assert ds.labels.tolist() == batch[b"labels"]
    assert torch.equal(ds.images.reshape(7, 3072), torch.from_numpy(batch[b"data"]))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_refused_with_every_protocol(tmp_path, protocol):
    marker = tmp_path / "pwned"
    batch = _official_style_batch(3, seed=0)
    batch[b"filenames"] = _ShellPayload(marker)
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    with pytest.raises(UserError, match=r"refusing to unpickle (posix|nt|os)\.system: .*malicious"):
        load_pickle(path)
    assert not marker.exists()


def test_load_pickle_accepts_str_and_bytes_keys(tmp_path):
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    for i, key in enumerate(["data", b"data"]):
        p = tmp_path / f"p{i}"
        p.write_bytes(pickle.dumps({key: arr}, protocol=4))
        d = load_pickle(p)
        assert list(d) == ["data"] and np.array_equal(d["data"], arr)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "not-a-dict"])
def test_broken_pickle_names_the_file(tmp_path, data_root, kind):
    folder = _fake_folder(tmp_path, data_root)
    real = data_root / "cifar-10-batches-py" / "test_batch"
    if kind == "truncated":
        with open(real, "rb") as f:
            blob = f.read(200_000)
    elif kind == "garbage":
        blob = bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8))
    elif kind == "empty":
        blob = b""
    else:
        blob = pickle.dumps([1, 2, 3], protocol=2)
    (folder / "test_batch").write_bytes(blob)
    with pytest.raises(UserError) as e:
        load_cifar10(folder.parent, train=False, download=False)
    msg = str(e.value)
    assert str(folder / "test_batch") in msg
    assert "download" in msg


def _write_batch(path: Path, data, labels, *, bytes_keys: bool = False) -> None:
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    d = {k("batch_label"): "batch", k("labels"): labels, k("data"): data,
         k("filenames"): [f"img{i}.png" for i in range(len(labels))]}
    path.write_bytes(pickle.dumps(d, protocol=4))


@pytest.mark.parametrize("case,pattern", [
    ("wide", r"uint8 array of shape \(N, 3072\).*\(4, 1000\)"),
    ("float", r"uint8 array of shape \(N, 3072\).*float32"),
    ("short-labels", r"'labels' must be 4 integers"),
    ("label-range", r"labels must lie in 0\.\.9, found 0\.\.10"),
    ("no-labels", r"missing key 'labels'"),
])
def test_invalid_batch_contents(tmp_path, data_root, case, pattern):
    folder = _fake_folder(tmp_path, data_root)
    data = np.zeros((4, 3072), np.uint8)
    labels = [0, 1, 2, 3]
    if case == "wide":
        data = np.zeros((4, 1000), np.uint8)
    elif case == "float":
        data = np.zeros((4, 3072), np.float32)
    elif case == "short-labels":
        labels = [0, 1, 2]
    elif case == "label-range":
        labels = [0, 1, 2, 10]
    _write_batch(folder / "test_batch", data, labels)
    if case == "no-labels":
        (folder / "test_batch").write_bytes(pickle.dumps({"data": data}, protocol=4))
    with pytest.raises(UserError, match=pattern) as e:
        load_cifar10(folder.parent, train=False, download=False)
    assert "test_batch" in str(e.value)


def test_missing_folder_without_download(tmp_path):
    with pytest.raises(UserError) as e:
        load_cifar10(tmp_path / "nowhere", train=True, download=False)
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    assert "--data-dir" in msg and "ISOCONV_DATA" in msg and "--no-download" in msg
    assert not (tmp_path / "nowhere").exists()  # nothing created


def test_incomplete_folder_names_missing_file(tmp_path, data_root):
    folder = _fake_folder(tmp_path, data_root)
    with pytest.raises(UserError, match=r"data_batch_1 is missing"):
        load_cifar10(folder.parent, train=True, download=True)  # never downloads over an existing folder


# ---------------------------------------------------------------------------------------------
# download (no network here: unreachable and file:// URLs only)


N_PER_BATCH = 3


def _make_fake_archive(tmp_path: Path, test_ds: ImageDataset, extra_members=()) -> "tuple[Path, str, dict]":
    """A tiny cifar-10-python.tar.gz in the official layout, built from real test images."""
    src = tmp_path / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    flat = test_ds.images[: N_PER_BATCH * 6].reshape(-1, 3072).numpy()
    labels = test_ds.labels[: N_PER_BATCH * 6].tolist()
    expected = {}
    for i, name in enumerate(BATCH_FILES):
        sl = slice(i * N_PER_BATCH, (i + 1) * N_PER_BATCH)
        _write_batch(src / name, flat[sl].copy(), labels[sl], bytes_keys=True)
        expected[name] = (flat[sl].copy(), labels[sl])
    meta = {b"num_cases_per_batch": N_PER_BATCH, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    (src / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))
    archive = tmp_path / "srv" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
        for info, data in extra_members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest(), expected


def _serve(monkeypatch, archive: Path, md5: str) -> None:
    monkeypatch.setattr(cifar_mod, "CIFAR10_URL", archive.resolve().as_uri())
    monkeypatch.setattr(cifar_mod, "CIFAR10_MD5", md5)


def test_download_without_network_is_a_user_error(tmp_path, monkeypatch):
    url = "http://127.0.0.1:9/cifar-10-python.tar.gz"
    monkeypatch.setattr(cifar_mod, "CIFAR10_URL", url)
    root = tmp_path / "root"
    with pytest.raises(UserError) as e:
        load_cifar10(root, train=False, download=True)
    msg = str(e.value)
    assert msg.startswith(f"could not download CIFAR-10 from {url} (")
    assert "--data-dir DIR" in msg and "ISOCONV_DATA" in msg
    assert not root.exists()  # no half-written archive, and not the folder the download created


def test_download_md5_mismatch(tmp_path, monkeypatch, test_ds):
    archive, md5, _ = _make_fake_archive(tmp_path, test_ds)
    _serve(monkeypatch, archive, "0" * 32)
    root = tmp_path / "root"
    with pytest.raises(UserError) as e:
        load_cifar10(root, train=False)
    msg = str(e.value)
    assert f"md5 {md5}, expected {'0' * 32}" in msg and "--data-dir" in msg
    assert not root.exists()


def test_download_verifies_extracts_and_loads(tmp_path, monkeypatch, test_ds):
    archive, md5, expected = _make_fake_archive(tmp_path, test_ds)
    _serve(monkeypatch, archive, md5)
    root = tmp_path / "root"
    ds = load_cifar10(root, train=False)
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]  # temp archive and dir removed
    data, labels = expected["test_batch"]
    assert ds.images.shape == (N_PER_BATCH, 3, 32, 32)
    assert torch.equal(ds.images, torch.from_numpy(data).view(-1, 3, 32, 32))
    assert torch.equal(ds.images, test_ds.images[5 * N_PER_BATCH: 6 * N_PER_BATCH])
    assert ds.labels.tolist() == labels
    assert ds.classes == CLASSES  # bytes label names decoded
    # the folder stays: a second load needs no download, and the train split is all five batches in order
    monkeypatch.setattr(cifar_mod, "CIFAR10_URL", "http://127.0.0.1:9/should-not-be-used")
    train = load_cifar10(root, train=True, download=False)
    assert len(train) == 5 * N_PER_BATCH
    assert torch.equal(train.images, test_ds.images[: 5 * N_PER_BATCH])
    assert train.labels.tolist() == sum((expected[f"data_batch_{i}"][1] for i in range(1, 6)), [])


def _member(name: str, data=b"x", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


@pytest.mark.parametrize("member", [
    _member("../escaped.txt"),
    _member("cifar-10-batches-py/../../escaped.txt"),
    _member("/tmp/isoconv-absolute-escape.txt"),
    _member("cifar-10-batches-py/link", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink"])
def test_download_rejects_unsafe_archive_members(tmp_path, monkeypatch, test_ds, member):
    archive, md5, _ = _make_fake_archive(tmp_path, test_ds, extra_members=[member])
    _serve(monkeypatch, archive, md5)
    root = tmp_path / "root"
    with pytest.raises(UserError, match=r"refusing to extract member"):
        load_cifar10(root, train=False)
    assert not root.exists()
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/isoconv-absolute-escape.txt").exists()


def test_download_corrupt_archive(tmp_path, monkeypatch):
    archive = tmp_path / "srv" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(b"\x1f\x8b" + b"not really gzip" * 100)
    _serve(monkeypatch, archive, hashlib.md5(archive.read_bytes()).hexdigest())
    root = tmp_path / "root"
    with pytest.raises(UserError, match=r"cannot extract"):
        load_cifar10(root, train=False)
    assert not root.exists()


def test_archive_without_batches_folder(tmp_path, monkeypatch):
    archive = tmp_path / "srv" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        info, data = _member("something-else/readme.txt")
        tar.addfile(info, io.BytesIO(data))
    _serve(monkeypatch, archive, hashlib.md5(archive.read_bytes()).hexdigest())
    root = tmp_path / "root"
    with pytest.raises(UserError, match=r"no cifar-10-batches-py/ folder"):
        load_cifar10(root, train=False)
    assert not root.exists()


def test_a_constant_channel_normalises_to_zero_instead_of_failing():
    # a folder of images whose blue channel is one value (grey scans, a one-colour background) has std 0 there
    images = torch.randint(0, 256, (6, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images[:, 2] = 77
    mean, std = channel_stats(images)
    assert std[2] == 1.0 and 0 < std[0] < 1 and 0 < std[1] < 1
    assert mean[2] == 77 / 255
    augment = BatchAugment(image_size=4, mean=mean, std=std, no_aug=True)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out[:, 2].abs().max().item() == 0.0
    assert out[:, :2].std().item() > 0.5


def test_lossless_subset_dataset_has_the_official_labels_order_and_pixels(test_ds, train_ds, lossless_subset):
    ref = np.load(lossless_subset)
    for split, jpeg, n in (("train", train_ds, 4000), ("test", test_ds, 1000)):
        ds = load_dataset("cifar10-lossless", lossless_subset.parent, split)
        assert (ds.name, ds.split, len(ds), ds.classes) == ("cifar10-lossless", split, n, CLASSES)
        assert ref[f"{split}_indices"].tolist() == list(range(n))
        assert ds.labels.tolist() == jpeg.labels[:n].tolist()  # official order: the same labels as the JPEG copy
        assert torch.equal(ds.images, torch.from_numpy(ref[f"{split}_images_hwc"]).permute(0, 3, 1, 2))
        assert (ds.mean, ds.std) == (jpeg.mean, jpeg.std) == (CIFAR10_MEAN, CIFAR10_STD)
        assert not torch.equal(ds.images, jpeg.images[:n])  # the pixels are the lossless ones
    # pointing at the .npz itself, or at cifar-10-batches-py beside it, finds the same file
    for root in (lossless_subset, lossless_subset.parent / "cifar-10-batches-py"):
        assert len(load_dataset("Cifar10_Lossless", root, "test")) == 1000


def test_lossless_subset_missing_or_broken_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"cifar10_lossless_reference_subset.npz not found: --dataset "
                                        r"cifar10-lossless reads"):
        load_dataset("cifar10-lossless", tmp_path, "test")
    bad = tmp_path / "cifar10_lossless_reference_subset.npz"
    np.savez(bad, test_images_hwc=np.zeros((2, 32, 32, 3), np.uint8), test_labels=np.zeros(2, np.uint8),
             test_indices=np.array([1, 0], np.int32))
    with pytest.raises(UserError, match=r"test_indices are not 0..1 in order"):
        load_dataset("cifar10-lossless", tmp_path, "test")
    bad.write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"is not a readable CIFAR-10 lossless subset"):
        load_dataset("cifar10-lossless", tmp_path, "test")
