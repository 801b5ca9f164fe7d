"""Graceful stops: SIGINT/SIGTERM end a run at a step boundary with a checkpoint, on every process together."""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

from ..errors import Interrupted
from . import distributed as ddp
from .distributed import Dist


class TrainingInterrupted(Interrupted):
    """SIGINT/SIGTERM arrived; the run was checkpointed and can be resumed."""


def interrupted(signum: int, run_dir: Path, epoch_done: int, step: int) -> TrainingInterrupted:
    where = f"epoch {epoch_done + 1} step {step}" if step else f"the end of epoch {epoch_done}"
    return TrainingInterrupted(f"stopped by {signal.Signals(signum).name} at {where}; the checkpoint is saved — "
                               f"continue with `isoconv train --resume {run_dir}`", signum)


class StopSignals:
    """While active, the first SIGINT/SIGTERM only sets a flag (the loop checkpoints and stops after the
    current step); a second one interrupts at once, unless repeat_interrupts=False (under torchrun, where a
    terminal's Ctrl-C reaches a worker twice, directly and forwarded by torchrun, which kills workers that have
    not exited 30 s later anyway)."""

    def __init__(self, repeat_interrupts: bool = True):
        self.signum: Optional[int] = None
        self.repeat_interrupts = repeat_interrupts
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        if not self.repeat_interrupts:
            return
        for sig, handler in self._previous.items():  # a second signal acts immediately
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Stopper(StopSignals):
    """StopSignals plus the agreement between processes: under torchrun every process must stop (and take a
    time-based checkpoint) at the same step, so they compare notes every STOP_POLL_STEPS steps (and at every
    step-count checkpoint and epoch end)."""

    def __init__(self, dist: Dist):
        super().__init__(repeat_interrupts=not dist.enabled)
        self.dist = dist

    def mid_epoch(self, done: int, steps_per_epoch: int, checkpoint_due: bool,
                  time_due: bool) -> tuple[Optional[int], bool]:
        """(the signal every process agrees to stop on after step `done`, or None; whether the checkpoint that
        time asks for is due on every process)."""
        if not self.dist.enabled:
            return self.signum, time_due
        poll = done < steps_per_epoch and (checkpoint_due or done % ddp.STOP_POLL_STEPS == 0)
        return ddp.agreed_stop_and_flag(self.dist, self.signum, time_due) if poll else (None, False)

    def epoch_end(self) -> Optional[int]:
        return ddp.agreed_signal(self.dist, self.signum)
