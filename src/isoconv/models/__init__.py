"""Model definitions (ConvMixer, ConvMixer-XL, small ConvNeXt) and the preset registry."""
from ..lazy import lazy_exports

# loaded at the first use: `isoconv models` reads the presets (isoconv.models.presets) without importing torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "ConvMixer": "isoconv.models.convmixer", "ConvNeXt": "isoconv.models.convnext",
    **{name: "isoconv.models.registry" for name in ("build_model", "count_params", "create_model", "list_models",
                                                     "model_info", "register_model", "with_preset_shape")}})

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
