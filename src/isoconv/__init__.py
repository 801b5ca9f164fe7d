"""isoconv: train, evaluate and ablate isotropic ConvNets (ConvMixer, ConvMixer-XL) and small ConvNeXts."""
import os
import signal
import sys


def _interrupted_while_starting(signum, frame) -> None:
    sys.stderr.write("isoconv: interrupted\n")
    os._exit(128 + signum)


# `python -m isoconv` / the `isoconv` script: Ctrl-C while torch loads (seconds, before the command line is read)
# stops quietly, as it does later; nothing has been written yet. The command line restores Python's handler.
if sys.argv[:1] == ["-m"] or os.path.basename(sys.argv[0] if sys.argv else "") == "isoconv":
    signal.signal(signal.SIGINT, _interrupted_while_starting)

from .config import TrainConfig, build_config  # noqa: E402
from .lazy import lazy_exports  # noqa: E402

# loaded at the first use, so that `isoconv --help` does not import torch
__getattr__, __dir__ = lazy_exports(__name__, {"load": "isoconv.interop.load", "create_model": "isoconv.models",
                                               "list_models": "isoconv.models"})

__version__ = "0.1.0"

__all__ = ["load", "create_model", "list_models", "TrainConfig", "build_config", "__version__"]
