"""isoconv: train, evaluate and ablate isotropic ConvNets (ConvMixer, ConvMixer-XL) and small ConvNeXts."""
from .config import TrainConfig, build_config
from .lazy import lazy_exports

# loaded at the first use, so that `isoconv --help` does not import torch
__getattr__, __dir__ = lazy_exports(__name__, {"load": "isoconv.interop.load", "create_model": "isoconv.models",
                                               "list_models": "isoconv.models"})

__version__ = "0.1.0"

__all__ = ["load", "create_model", "list_models", "TrainConfig", "build_config", "__version__"]
