"""isoconv: train, evaluate and ablate isotropic ConvNets (ConvMixer, ConvMixer-XL) and small ConvNeXts."""
from .config import TrainConfig, build_config
from .models import create_model, list_models

__version__ = "0.1.0"


def load(path, device="cpu"):
    """`model, preprocess = isoconv.load(path)`: a run directory, checkpoint, .safetensors, .onnx or TorchScript
    file as an eval-mode nn.Module on `device` plus its preprocessing (see isoconv.interop.load)."""
    from .interop.load import load as load_model  # imported lazily: it pulls in the training code

    return load_model(path, device)


__all__ = ["load", "create_model", "list_models", "TrainConfig", "build_config", "__version__"]
