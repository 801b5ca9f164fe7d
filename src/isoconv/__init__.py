"""isoconv: train, evaluate and ablate isotropic ConvNets (ConvMixer, ConvMixer-XL) and small ConvNeXts."""
from .config import TrainConfig, build_config
from .interop.load import load
from .models import create_model, list_models

__version__ = "0.1.0"

__all__ = ["load", "create_model", "list_models", "TrainConfig", "build_config", "__version__"]
