"""Model definitions (ConvMixer, ConvMixer-XL, small ConvNeXt) and the preset registry."""
from .convmixer import ConvMixer
from .convnext import ConvNeXt
from .registry import (build_model, count_params, create_model, list_models, model_info, register_model,
                       with_preset_shape)

__all__ = [
    "ConvMixer",
    "ConvNeXt",
    "build_model",
    "count_params",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
    "with_preset_shape",
]
