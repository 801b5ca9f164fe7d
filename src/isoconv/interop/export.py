"""`isoconv export`: a run's model as ONNX, TorchScript or safetensors, with its config and data meta inside.

ONNX uses PyTorch's TorchScript-based exporter (``dynamo=False``): it exists in every supported torch
(2.4-2.14), needs no onnxscript, exports the asymmetric padding of even "same" kernels exactly, and is
several times faster than the dynamo exporter. ONNX files take any batch size unless a fixed `batch_size` is
asked for (timm's convention). Every export is checked against the PyTorch model on a
random batch and the largest absolute difference is reported.
"""
from __future__ import annotations

import copy
import inspect
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..errors import UserError
from ..formats import FORMATS
from ..fileio import atomic_write_with, write_and_sync
from ..rundir import check_output_file
from ..weights.files import INSTALL_HINT, model_format
from ..weights.meta import META_KEY, ModelMeta
from .load import TORCHSCRIPT_META_FILE, OnnxModel, import_onnxruntime, read_model, read_torchscript

SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
SUFFIX_FORMATS = {".onnx": "onnx", ".safetensors": "safetensors", ".pt": "torchscript", ".pth": "torchscript"}
DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "safetensors": "model.safetensors"}
ONNX_OPSET = 17  # LayerNormalization is a single op from 17 on; onnxruntime >= 1.14 runs it
INPUT_NAME, OUTPUT_NAME = "images", "logits"
MATCH_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    dynamic_batch: bool  # True: any batch size; False: only `batch_size`
    batch_size: Optional[int]  # the fixed batch size of an ONNX export, None when it is dynamic
    max_abs_diff: float  # exported model vs PyTorch on a random batch (0.0 for safetensors: same tensors)


def export_target(target: Union[str, Path], fmt: str, out: Optional[Union[str, Path]] = None, *,
                  batch_size: Optional[int] = None, overwrite: bool = False) -> ExportResult:
    """Export a run directory, checkpoint or isoconv .safetensors file to `fmt`.

    The output (`out`, else a default name next to the weights) is never a run's own file, nor an existing file
    unless `overwrite`.

    ONNX: `batch_size=None` (default) exports a dynamic batch axis; an int fixes the batch to that size.
    """
    target = Path(target)
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    kind = model_format(target)
    if kind in ("onnx", "torchscript"):
        raise UserError(f"{target} is already an exported {kind} model; export from the run directory, its "
                        f"checkpoint or a .safetensors file")
    out_path = Path(out) if out else default_output(target, kind, fmt)
    if out_path.exists() and out_path.resolve() == target.resolve():
        raise UserError(f"--output {out_path} is the file being exported; choose another --output")
    check_output_file(out_path, "--output", overwrite=overwrite, parents_created=True)
    claimed = SUFFIX_FORMATS.get(out_path.suffix.lower())
    if claimed is not None and claimed != fmt:
        raise UserError(f"--output {out_path} names a {claimed} file but --format is {fmt}; name it "
                        f"{out_path.with_suffix(SUFFIXES[fmt]).name} (or pass --format {claimed})")
    model, meta = read_model(target, torch.device("cpu"))
    return export_model(model, meta, fmt, out_path, batch_size=batch_size)


def default_output(target: Path, kind: str, fmt: str) -> Path:
    return (target if kind in ("run", "folder") else target.parent) / DEFAULT_NAMES[fmt]


def export_model(model: nn.Module, meta: ModelMeta, fmt: str, out: Union[str, Path], *,
                 batch_size: Optional[int] = None) -> ExportResult:
    """Write `model` (with `meta` embedded) to `out` atomically and check the result against `model`.

    ONNX: `batch_size=None` exports a dynamic batch axis, an int a graph fixed to that batch size.
    """
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    dynamic = batch_size is None
    out = Path(out)
    model = copy.deepcopy(model).to("cpu", torch.float32).to(memory_format=torch.contiguous_format).eval()
    # trace a dynamic graph at batch 2 so nothing in it can specialise to a batch of 1
    example = torch.zeros(2 if dynamic else batch_size, 3, meta.image_size, meta.image_size)
    check_batch = 3 if dynamic else batch_size  # a dynamic export is checked at a size it was not traced at
    if fmt == "onnx":
        import_onnxruntime("checking the ONNX export")  # before anything is written
        data = onnx_bytes(model, meta, example, dynamic)
        write_atomically(out, lambda tmp: tmp.write_bytes(data))
        return ExportResult(out, fmt, dynamic, batch_size, max_abs_diff(model, OnnxModel(out), meta, check_batch))
    if fmt == "torchscript":
        data = torchscript_bytes(trace(model, example), meta)  # in memory first: a full disk is then an OSError
        write_atomically(out, lambda tmp: write_and_sync(tmp, data))
        loaded, _ = read_torchscript(out, torch.device("cpu"))
        return ExportResult(out, fmt, True, None, max_abs_diff(model, loaded, meta, example.shape[0] + 1))
    if fmt == "safetensors":
        data = safetensors_bytes(model, meta)
        write_atomically(out, lambda tmp: write_and_sync(tmp, data))
        return ExportResult(out, fmt, True, None, 0.0)
    raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: `out` is never half-written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}; check the folder and its permissions") from None
    try:
        atomic_write_with(out, write)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}; check the free space and permissions") from None


def onnx_bytes(model: nn.Module, meta: ModelMeta, example: torch.Tensor, dynamic_batch: bool) -> bytes:
    """The serialized ONNX model with the isoconv metadata in metadata_props."""
    try:
        import onnx
    except ImportError:
        raise UserError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from None
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET,
                  do_constant_folding=True)
    if dynamic_batch:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # torch >= 2.9 defaults to the dynamo exporter (needs onnxscript)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of the exporter, even-kernel padding notes
        torch.onnx.export(model, (example,), buf, **kwargs)
    proto = onnx.load_from_string(buf.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, meta.to_json()
    proto.doc_string = f"isoconv {meta.config.get('model')}: {len(meta.classes)} classes, " \
                       f"{meta.image_size}x{meta.image_size} RGB input normalized with the stored mean/std"
    return proto.SerializeToString()  # validated by loading it in onnxruntime right after


def trace(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notices in recent torch
        with torch.no_grad():
            return torch.jit.trace(model, example)


def torchscript_bytes(traced: torch.jit.ScriptModule, meta: ModelMeta) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save is deprecated from torch 2.9 on
        torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_META_FILE: meta.to_json()})
    return buffer.getvalue()


def safetensors_bytes(model: nn.Module, meta: ModelMeta) -> bytes:
    try:
        from safetensors.torch import save
    except ImportError:
        raise UserError(f"safetensors export needs the safetensors package: {INSTALL_HINT}") from None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save(state, metadata={"format": "pt", META_KEY: meta.to_json()})  # "format": what the Hub reads


@torch.no_grad()
def max_abs_diff(reference: nn.Module, exported: nn.Module, meta: ModelMeta, n: int) -> float:
    """Largest |exported - reference| over a seeded random batch of `n` images."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, meta.image_size, meta.image_size, generator=gen)
    return (exported(x).float() - reference(x).float()).abs().max().item()
