"""Model definitions (ConvMixer, ConvMixer-XL, small ConvNeXt) and the preset registry."""
from .convmixer import ConvMixer
from .convnext import ConvNeXt, DropPath
from .registry import count_params, create_model, list_models, model_info, register_model

__all__ = [
    "ConvMixer",
    "ConvNeXt",
    "DropPath",
    "count_params",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
]
