"""`isoconv.load(path)`: a ready model in eval mode plus its preprocessing, from any file isoconv writes.

Accepted: a run directory (its last.pt), an isoconv checkpoint, and the exports of `isoconv export` —
`.safetensors`, `.onnx` (run with onnxruntime, wrapped as an nn.Module), `.pt2` (torch.export), TorchScript and a
model folder (config.json + model.safetensors + README.md). The format is
recognised from the content where the suffix is ambiguous (TorchScript files are often named .pt too).

Bare weights without isoconv metadata (a timm state dict, the seeds' own checkpoints: the ConvMixer-XL study's
``{'model_state_dict': ...}``, simple-convnext's ``{'model_state': ...}``) are refused with a message naming their
layout: they lack the model settings, classes, image size and normalization a ready model needs. Load them into a
model you build (`isoconv.interop.load_pretrained_into`) or train from them (`--pretrained`).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from ..config import MODEL_KWARGS
from ..data.cifar import CIFAR10_MEAN, CIFAR10_STD
from ..errors import UserError
from ..models import create_model
from ..runtime import resolve_device
from ..weights.checkpoint import load_checkpoint
from ..rundir import CHECKPOINT_NAME
from ..weights.files import INSTALL_HINT, model_format, read_model_folder, read_safetensors, strip_wrapper_prefixes
from ..weights.meta import META_KEY, PREPROCESS_KEY, ModelMeta, Preprocessing
from ..weights.pretrained import foreign_layout, load_pretrained_into
from ..zoo import resolve_model_path
from .preprocess import Preprocess

EXTRA_META_FILE = "isoconv.json"  # the metadata file inside TorchScript and pt2 archives


class LoadedModel(NamedTuple):
    """`model, preprocess = isoconv.load(path)`; `preprocess.classes` names the outputs."""

    model: nn.Module
    preprocess: Preprocess


# The seeds' own saved files (the XL study's, simple-convnext's) were trained on CIFAR-10 images: the XL study's at
# 32x32 normalized with the CIFAR-10 statistics, simple-convnext's zero-padded to 64x64 (its CenterCrop(64)) and not
# normalized at all.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SEED_PREPROCESSING = {"simple-convnext layout": Preprocessing(32, 64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}


def load(path: Union[str, Path], device: Union[str, torch.device] = "cpu", model: Optional[str] = None,
         **model_kwargs) -> LoadedModel:
    """Load a run directory, model folder, checkpoint, .safetensors, .onnx or TorchScript file, or a zoo model by
    name (`isoconv zoo` lists them), for inference.

    The model is in eval mode on `device` and returns logits for a float32 (B, 3, S, S) batch;
    `preprocess(images)` makes that batch from file paths, PIL images or uint8 tensors.
    Weights without isoconv metadata (a seed's own saved file, a timm state dict) load when `model` names the preset
    they fit (`model_kwargs` as for isoconv.create_model, e.g. num_classes=200); they are then preprocessed for
    CIFAR-10-sized images as the seed trained them.
    """
    dev = resolve_device(device)
    path = resolve_model_path(path)
    if model is not None and foreign_layout(path) is not None:
        net, meta = read_foreign(Path(path), dev, model, model_kwargs)
    else:
        net, meta = read_model(Path(path), dev)
    return LoadedModel(net, preprocess_for(meta))


def read_foreign(path: Path, device: torch.device, name: str, model_kwargs: dict) -> tuple[nn.Module, ModelMeta]:
    """A seed's own file (or other bare weights) in preset `name`, with the metadata of the seed's training."""
    layout = foreign_layout(path)
    net = create_model(name, **model_kwargs)
    report = load_pretrained_into(net, path)
    if report.reinitialised:
        raise UserError(f"{path} holds a classifier for another number of classes than {name!r} has "
                        f"({net.num_classes}); pass num_classes=N, N being the file's class count")
    n = net.num_classes
    size = model_kwargs.get("image_size") or 32
    pre = SEED_PREPROCESSING.get(layout, Preprocessing(size, None, CIFAR10_MEAN, CIFAR10_STD))
    data = {"classes": list(CIFAR10_CLASSES) if n == 10 else [str(i) for i in range(n)], "mean": list(pre.mean),
            "std": list(pre.std), "image_size": pre.input_size, "dataset": "cifar10", PREPROCESS_KEY: pre.to_dict()}
    settings = {setting: model_kwargs[kwarg] for setting, kwarg in MODEL_KWARGS.items() if kwarg in model_kwargs}
    config = {"model": name, "pad_to": pre.pad_to, **settings}  # shapes without a setting (dims) are left out
    return net.to(device).eval(), ModelMeta(config, data)


def preprocess_for(meta: ModelMeta) -> Preprocess:
    """The inference preprocessing of a model: its training's (ModelMeta.preprocessing)."""
    pre = meta.preprocessing
    return Preprocess(image_size=pre.image_size, mean=pre.mean, std=pre.std, classes=tuple(meta.classes),
                      pad_to=pre.pad_to)


def read_model(path: Path, device: torch.device) -> tuple[nn.Module, ModelMeta]:
    """The model (eval mode, on device) and its metadata. `path` may name a zoo model."""
    path = resolve_model_path(path)
    fmt = model_format(path)
    if fmt == "onnx":
        model = OnnxModel(path, device)
        return model.eval(), model.meta
    if fmt == "torchscript":
        return read_torchscript(path, device)
    if fmt == "pt2":
        return read_exported_program(path, device)
    if fmt == "folder":
        state, meta = read_model_folder(path)
    elif fmt == "safetensors":
        state, meta = read_safetensors(path)
        if meta is None:
            raise bare_weights_error(path, foreign_layout(path))
    else:
        ckpt_path = path / CHECKPOINT_NAME if fmt == "run" else path
        try:
            ckpt = load_checkpoint(ckpt_path)
        except UserError:
            layout = foreign_layout(ckpt_path) if fmt == "checkpoint" else None
            if layout:
                raise bare_weights_error(path, layout) from None
            raise
        state, meta = ckpt["model"], ModelMeta.from_checkpoint(ckpt, str(ckpt_path))
    return build_with_weights(meta, state, str(path)).to(device).eval(), meta


def bare_weights_error(path: Path, layout) -> UserError:
    """isoconv.load on weights without isoconv metadata: say what they are and the two ways to use them."""
    what = f"bare weights ({layout})" if layout else "weights"
    return UserError(f"{path} holds {what} without isoconv metadata (model settings, classes, image size, "
                     f"normalization); name the preset they fit: isoconv.load(path, model=NAME, ...), or build the "
                     f"model and load them with isoconv.interop.load_pretrained_into(isoconv.create_model(NAME, ...), "
                     f"path), or train from them with `isoconv train --model NAME --pretrained {path}`")


def build_with_weights(meta: ModelMeta, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    model = meta.build_model(source)
    state = strip_wrapper_prefixes(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(f"the weights in {source} do not match its stored config ({detail[:200]}); the file was "
                        f"altered or written by another tool") from None
    return model


def read_torchscript(path: Path, device: torch.device) -> tuple[nn.Module, ModelMeta]:
    extra = {EXTRA_META_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated from torch 2.9 on
            model = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except RuntimeError as e:
        raise UserError(f"cannot load TorchScript file {path} ({str(e).strip().splitlines()[0][:160]})") from None
    text = extra[EXTRA_META_FILE]
    if not text:
        raise UserError(f"TorchScript file {path} has no isoconv metadata ({EXTRA_META_FILE}); export it "
                        f"with `isoconv export --format torchscript`")
    text = text.decode() if isinstance(text, bytes) else text
    return model.eval(), ModelMeta.from_json(text, str(path))


def read_exported_program(path: Path, device: torch.device) -> tuple[nn.Module, ModelMeta]:
    """A `torch.export.save` archive (isoconv export --format pt2) as a callable module, and its metadata."""
    extra = {EXTRA_META_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # torch.export raises many types for a damaged or foreign archive
        raise UserError(f"cannot load torch.export file {path} ({str(e).strip().splitlines()[0][:160]})") from None
    if not extra[EXTRA_META_FILE]:
        raise UserError(f"torch.export file {path} has no isoconv metadata ({EXTRA_META_FILE}); export it with "
                        f"`isoconv export --format pt2`")
    text = extra[EXTRA_META_FILE]
    text = text.decode() if isinstance(text, bytes) else text
    return program.module().to(device), ModelMeta.from_json(text, str(path))


def import_onnxruntime(purpose: str):
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"{purpose} needs onnxruntime: {INSTALL_HINT}") from None
    return onnxruntime


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime, callable like the PyTorch model (float32 NCHW in, logits out).

    A file exported with a fixed batch size is fed in chunks of that size (the last one zero-padded).
    onnxruntime uses as many threads as torch (`torch.set_num_threads`).
    """

    def __init__(self, path: Path, device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        ort = import_onnxruntime(f"running {path}")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # one knob for both: torch.set_num_threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for invalid files
            raise UserError(f"cannot load ONNX model {path} ({str(e).strip().splitlines()[0][:160]})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in metadata:
            raise UserError(f"ONNX file {path} has no isoconv metadata; export it with `isoconv export --format onnx`")
        self.meta = ModelMeta.from_json(metadata[META_KEY], str(path))
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.fixed_batch = first.shape[0] if isinstance(first.shape[0], int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().to("cpu", torch.float32).contiguous()
        step = self.fixed_batch or len(batch)
        outs = []
        for s in range(0, len(batch), step):
            chunk = batch[s:s + step]
            n = len(chunk)
            if n < step:
                chunk = torch.cat([chunk, chunk.new_zeros((step - n, *chunk.shape[1:]))])
            outs.append(torch.from_numpy(self.session.run(None, {self.input_name: chunk.numpy()})[0][:n]))
        return torch.cat(outs).to(x.device)
