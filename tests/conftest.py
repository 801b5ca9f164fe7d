import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Folder holding the real cifar-10-batches-py (JPEG-degraded pixels, exact labels)."""
    _require(SHARED_DATA / "cifar-10-batches-py")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lossless_subset() -> Path:
    return _require(SHARED_DATA / "cifar10_lossless_reference_subset.npz")
