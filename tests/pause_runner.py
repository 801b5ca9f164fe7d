"""Run the isoconv CLI with a pause at the n-th occurrence of an event, so a test can kill it at exactly that moment.

    python tests/pause_runner.py EVENT[@N] SECONDS ISOCONV_ARGS...

Events: `step` (after a training step returns), `checkpoint-write` (half of a checkpoint file written) and
`export-write` (an export's temporary file written, before it is renamed into place). When the
pause starts, the process prints `ISOCONV_TEST_PAUSED EVENT[@N] rank=R pid=P`. The hooks are monkeypatched here,
so production code carries no test seams. Also usable as the script torchrun starts.
"""
import os
import sys
import time

from isoconv import fileio
from isoconv.cli import main
from isoconv.train.step import TrainStep


def install(spec: str, seconds: float) -> None:
    event, _, nth = spec.partition("@")
    target, count = int(nth or 1), [0]

    def due() -> bool:
        count[0] += 1
        return count[0] == target

    def pause() -> None:
        print(f"ISOCONV_TEST_PAUSED {spec} rank={os.environ.get('RANK', 0)} pid={os.getpid()}", flush=True)
        time.sleep(seconds)

    if event == "step":
        real_step = TrainStep.__call__

        def step(self, *args, **kwargs):
            out = real_step(self, *args, **kwargs)
            if due():
                pause()
            return out
        TrainStep.__call__ = step
    elif event == "checkpoint-write":
        real_write = fileio.write_and_sync

        def write(path, data):
            if os.path.basename(path).startswith(".last.pt.") and due():
                real_write(path, data[: len(data) // 2])
                pause()
            real_write(path, data)
        fileio.write_and_sync = write
    elif event == "export-write":
        from isoconv.interop import export

        real_atomic = export.atomic_write_with

        def atomic(path, write, *args):
            def write_then_pause(tmp):
                write(tmp)
                if due():
                    pause()
            return real_atomic(path, write_then_pause, *args)
        export.atomic_write_with = atomic
    else:
        raise SystemExit(f"unknown event {event!r}")


if __name__ == "__main__":
    install(sys.argv[1], float(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
