"""TensorBoard sink of the training loop: every per-epoch scalar (`isoconv train --tensorboard`)."""
from __future__ import annotations

import math
from numbers import Real
from pathlib import Path
from typing import Any

from ..errors import UserError

# metrics.jsonl key -> TensorBoard tag; any other numeric key is logged under its own name
TAGS = {"lr": "lr", "train_loss": "train/loss", "train_acc": "train/acc", "test_loss": "test/loss",
        "test_top1": "test/top1", "test_top5": "test/top5", "epoch_seconds": "time/epoch_seconds",
        "images_per_second": "time/images_per_second"}


def summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package; `pip install tensorboard` "
                        "(or `pip install 'isoconv[tensorboard]'`), or drop --tensorboard") from None
    return SummaryWriter


class TensorBoardLogger:
    """Writes one scalar per numeric metrics-row key at step = epoch; flushed every epoch so a crash loses nothing."""

    def __init__(self, folder: Path, start_epoch: int = 0):
        writer_class = summary_writer_class()
        # purge_step drops events a crashed attempt wrote after the checkpoint we resume from
        self.writer = writer_class(log_dir=str(folder), purge_step=start_epoch + 1)

    def log_epoch(self, row: dict[str, Any]) -> None:
        step = int(row["epoch"])
        for key, value in row.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                continue
            self.writer.add_scalar(TAGS.get(key, key), float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class NoLogger:
    def log_epoch(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def open_tensorboard(folder: Path, start_epoch: int = 0, enabled: bool = True):
    """A TensorBoardLogger writing to `folder` (a run's RUN_DIR/tensorboard), or one that does nothing."""
    return TensorBoardLogger(folder, start_epoch) if enabled else NoLogger()
