import contextlib
import io
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from isoconv.cli import configure_logging
from isoconv.models import compiled

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ISOCONV_TEST_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def _require(path: Path) -> Path:
    if not path.exists():
        msg = f"test data {path} is missing (set ISOCONV_TEST_DATA to the folder holding cifar-10-batches-py)"
        if os.environ.get("CI"):
            pytest.fail(msg)  # never skip in CI
        pytest.skip(msg)
    return path


@pytest.fixture(scope="module")
def one_cpu_thread():
    """For test modules of many small ops: run them single-threaded. On a shared 2-core box a busy neighbour makes
    every 2-thread OpenMP op ~10x slower; the previous setting is restored afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(autouse=True)
def console_logging():
    """isoconv's log records reach stdout/stderr as the CLI shows them, whether a test calls the CLI or a library
    function (so capsys sees the same lines in any test order)."""
    configure_logging()


@pytest.fixture(autouse=True)
def aten_unless_a_test_asks(monkeypatch):
    """In this process, training stays on aten's kernels unless a test lowers the threshold itself: the CPU fast
    paths compile inductor kernels (tens of seconds per dtype, layout and kernel size on a fresh machine), which
    the tests about flags, files and recipes do not need. The fast paths have their own tests (test_depthwise,
    test_act_norm, and test_crash's run in a real process, where this does not apply)."""
    monkeypatch.setattr(compiled, "FAST_MIN_ELEMENTS", 2 ** 62)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Caches the tests write (decoded images, checksums, --amp auto measurements) go to a temporary folder, not to
    the user's ~/.cache; tests about cache locations unset or change $ISOCONV_CACHE themselves."""
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("ISOCONV_CACHE"):
            mp.setenv("ISOCONV_CACHE", str(tmp_path_factory.mktemp("isoconv-cache-session")))
        yield


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder holding the real cifar-10-batches-py (JPEG-degraded pixels, exact labels)."""
    _require(SHARED_DATA / "cifar-10-batches-py")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lossless_subset() -> Path:
    return _require(SHARED_DATA / "cifar10_lossless_reference_subset.npz")


@pytest.fixture(scope="session")
def tiny_imagenet_root(tmp_path_factory):
    """Folder holding the real tiny-imagenet-200 sample (official layout, 200 classes x 30 train, 2,000 val images,
    re-saved at 32x32). Shared and read-only: tests that change it or cache next to it work on a copy, and while
    this fixture is active decoded-image caches go to a temporary $ISOCONV_CACHE instead of next to the data."""
    root = _require(SHARED_DATA / "tiny-imagenet-200-subset32" / "tiny-imagenet-200").parent
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("ISOCONV_CACHE"):
            mp.setenv("ISOCONV_CACHE", str(tmp_path_factory.mktemp("isoconv-cache")))
        yield root


CIFAR100_TRAIN, CIFAR100_TEST = 600, 200


def py2_pickle(obj) -> bytes:
    """Protocol-2 pickle that stores bytes as py2 `str` (BINSTRING), as the official Python-2 CIFAR files do."""
    import pickle
    import struct

    class Py2Pickler(pickle._Pickler):
        dispatch = pickle._Pickler.dispatch.copy()

        def save_py2_str(self, b):
            if len(b) < 256:
                self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
            else:
                self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
            self.memoize(b)

        dispatch[bytes] = save_py2_str

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


@pytest.fixture(scope="session")
def cifar100_root(data_root, tmp_path_factory) -> Path:
    """A small cifar-100-python folder in the official format (py2-style pickles with bytes keys): real CIFAR-10
    test pixels with synthetic labels, fine label i % 100 and coarse label fine // 5, names fine00.. / coarse00.."""
    from isoconv.data import load_cifar10

    src = load_cifar10(data_root, train=False, download=False)
    folder = tmp_path_factory.mktemp("cifar100") / "cifar-100-python"
    folder.mkdir()
    flat = src.images[:CIFAR100_TRAIN + CIFAR100_TEST].reshape(-1, 3072).numpy()
    for name, rows in (("train", slice(0, CIFAR100_TRAIN)), ("test", slice(CIFAR100_TRAIN, None))):
        fine = [i % 100 for i in range(rows.start, rows.start + len(flat[rows]))]
        batch = {b"filenames": [f"img{i}.png".encode() for i in range(len(fine))], b"batch_label": name.encode(),
                 b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine], b"data": flat[rows].copy()}
        (folder / name).write_bytes(py2_pickle(batch))
    meta = {b"fine_label_names": [f"fine{i:02d}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(py2_pickle(meta))
    return folder.parent


@contextmanager
def captured_logs(name: str = "isoconv"):
    """The messages isoconv logs (INFO and up) while the block runs, whatever the logging setup."""
    lines: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger, handler = logging.getLogger(name), ListHandler(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="session")
def tiny_finished_run(tmp_path_factory, data_root) -> Path:
    """One finished 1-epoch run of a tiny ConvMixer (fp32), trained once per session. Tests that change its files
    work on a copy (shutil.copytree)."""
    from isoconv.config import build_config
    from isoconv.train.loop import train

    run = tmp_path_factory.mktemp("tiny-finished") / "run"
    cfg = build_config(model="cm-cpu", dim=16, depth=1, epochs=1, train_subset=64, test_subset=32, batch_size=32,
                       data_dir=str(data_root), out=str(run), amp="off", device="cpu")
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg)
    return run
