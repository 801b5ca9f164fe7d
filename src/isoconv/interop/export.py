"""`isoconv export`: a run's model as ONNX (fp32 or INT8), a torch.export program (pt2), TorchScript or
safetensors, with its config and preprocessing inside.

ONNX uses PyTorch's current exporter (``torch.onnx.export(..., dynamo=True)``, opset 18, onnxscript); the
TorchScript-based one stays behind ``exporter="legacy"`` (``--onnx-exporter legacy``) while torch ships it. pt2 is
``torch.export.save``'s archive: ``torch.export.load(path).module()`` runs it with torch alone. TorchScript is the
deprecated route (torch.jit is deprecated in favour of torch.export). Exported files take any batch size unless a
fixed `batch_size` is asked for (ONNX, timm's convention). Every export is checked against the PyTorch model on a
random batch of 3 (2 when tracing, so a dynamic graph never specialises to it) and the largest absolute difference
is reported.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..errors import UserError
from ..formats import CALIBRATION_IMAGES, FORMATS, ONNX_EXPORTERS
from ..fileio import atomic_write_with, write_and_sync
from ..rundir import RunDir, check_output_file
from ..weights.files import INSTALL_HINT, model_format
from ..weights.meta import META_KEY, ModelMeta
from .load import EXTRA_META_FILE, OnnxModel, import_onnxruntime, read_exported_program, read_model, read_torchscript
from .quantize import calibration_batch, quantize_onnx

SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt", "safetensors": ".safetensors"}
SUFFIX_FORMATS = {".onnx": "onnx", ".pt2": "pt2", ".safetensors": "safetensors", ".pt": "torchscript",
                  ".pth": "torchscript"}
DEFAULT_NAMES = {"onnx": "model.onnx", "pt2": "model.pt2", "torchscript": "model.torchscript.pt",
                 "safetensors": "model.safetensors"}
INT8_NAME = "model.int8.onnx"
ONNX_OPSETS = {"dynamo": 18, "legacy": 17}  # LayerNormalization is one op from 17 on; 18 is the dynamo default
INPUT_NAME, OUTPUT_NAME = "images", "logits"
MATCH_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    dynamic_batch: bool  # True: any batch size; False: only `batch_size`
    batch_size: Optional[int]  # the fixed batch size of an ONNX export, None when it is dynamic
    max_abs_diff: float  # exported model vs PyTorch on a random batch (0.0 for safetensors: same tensors)
    int8: bool = False  # an INT8 ONNX model (max_abs_diff is then the quantization error, not an export check)


def export_target(target: Union[str, Path], fmt: str, out: Optional[Union[str, Path]] = None, *,
                  batch_size: Optional[int] = None, exporter: str = "dynamo", int8: bool = False,
                  data_dir: Optional[str] = None, calibration_images: int = CALIBRATION_IMAGES,
                  overwrite: bool = False) -> ExportResult:
    """Export a finished run directory, a checkpoint or an isoconv .safetensors file to `fmt`.

    The output (`out`, else a default name next to the weights) is never a run's own file, nor an existing file
    unless `overwrite`.

    ONNX: `batch_size=None` (default) exports a dynamic batch axis; an int fixes the batch to that size. `int8`:
    static post-training quantization calibrated on `calibration_images` training images of the run's dataset
    (under `data_dir`, default the run's), prepared as the run prepares test images.
    """
    target = Path(target)
    check_format(fmt, exporter, int8)
    kind = model_format(target)
    if kind in ("onnx", "pt2", "torchscript"):
        raise UserError(f"{target} is already an exported {kind} model; export from the run directory, its "
                        f"checkpoint or a .safetensors file")
    if kind == "run" and RunDir(target).state() != "done":
        raise UserError(f"{target} is a run that has not finished (no summary.json); let it finish or resume it "
                        f"with `isoconv train --resume {target}`, or export its checkpoint {target / 'last.pt'}")
    out_path = Path(out) if out else default_output(target, kind, INT8_NAME if int8 else DEFAULT_NAMES[fmt])
    if out_path.exists() and out_path.resolve() == target.resolve():
        raise UserError(f"--output {out_path} is the file being exported; choose another --output")
    check_output_file(out_path, "--output", overwrite=overwrite, parents_created=True)
    claimed = SUFFIX_FORMATS.get(out_path.suffix.lower())
    if claimed is not None and claimed != fmt:
        raise UserError(f"--output {out_path} names a {claimed} file but --format is {fmt}; name it "
                        f"{out_path.with_suffix(SUFFIXES[fmt]).name} (or pass --format {claimed})")
    model, meta = read_model(target, torch.device("cpu"))
    calibration = calibration_batch(meta, data_dir, calibration_images) if int8 else None  # before any write
    return export_model(model, meta, fmt, out_path, batch_size=batch_size, exporter=exporter,
                        calibration=calibration)


def check_format(fmt: str, exporter: str = "dynamo", int8: bool = False) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if exporter not in ONNX_EXPORTERS:
        raise UserError(f"--onnx-exporter must be one of {', '.join(ONNX_EXPORTERS)}, got {exporter!r}")
    if int8 and fmt != "onnx":
        raise UserError(f"--int8 applies to --format onnx only, not {fmt}")


def default_output(target: Path, kind: str, name: str) -> Path:
    return (target if kind in ("run", "folder") else target.parent) / name


def export_model(model: nn.Module, meta: ModelMeta, fmt: str, out: Union[str, Path], *,
                 batch_size: Optional[int] = None, exporter: str = "dynamo",
                 calibration: Optional[torch.Tensor] = None) -> ExportResult:
    """Write `model` (with `meta` embedded) to `out` atomically and check the result against `model`.

    ONNX: `batch_size=None` exports a dynamic batch axis, an int a graph fixed to that batch size; `calibration`
    (a prepared float batch) makes it an INT8 model calibrated on those images.
    """
    check_format(fmt, exporter, calibration is not None)
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    dynamic = batch_size is None
    out = Path(out)
    model = copy.deepcopy(model).to("cpu", torch.float32).to(memory_format=torch.contiguous_format).eval()
    size = meta.preprocessing.input_size
    # trace a dynamic graph at batch 2 so nothing in it can specialise to a batch of 1
    example = torch.zeros(2 if dynamic else batch_size, 3, size, size)
    check_batch = 3 if dynamic else max(2, batch_size)  # a dynamic export is checked at a size it was not traced at
    if fmt == "onnx":
        import_onnxruntime("checking the ONNX export")  # before anything is written
        data = onnx_bytes(model, meta, example, dynamic, exporter)
        if calibration is not None:
            data = quantize_onnx(data, calibration, INPUT_NAME)
        write_atomically(out, lambda tmp: tmp.write_bytes(data))
        return ExportResult(out, fmt, dynamic, batch_size, max_abs_diff(model, OnnxModel(out), meta, check_batch),
                            int8=calibration is not None)
    if fmt == "pt2":
        program = export_program(model, example, dynamic)
        write_atomically(out, lambda tmp: save_program(program, meta, tmp))
        loaded, _ = read_exported_program(out, torch.device("cpu"))
        return ExportResult(out, fmt, True, None, max_abs_diff(model, loaded, meta, check_batch))
    if fmt == "torchscript":
        data = torchscript_bytes(trace(model, example), meta)  # in memory first: a full disk is then an OSError
        write_atomically(out, lambda tmp: write_and_sync(tmp, data))
        loaded, _ = read_torchscript(out, torch.device("cpu"))
        return ExportResult(out, fmt, True, None, max_abs_diff(model, loaded, meta, check_batch))
    data = safetensors_bytes(model, meta)
    write_atomically(out, lambda tmp: write_and_sync(tmp, data))
    return ExportResult(out, fmt, True, None, 0.0)


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


def onnx_bytes(model: nn.Module, meta: ModelMeta, example: torch.Tensor, dynamic_batch: bool,
               exporter: str = "dynamo") -> bytes:
    """The serialized ONNX model with the isoconv metadata in metadata_props: the whole document under "isoconv",
    and the preprocessing and classes as plain keys for readers without isoconv (see `onnx_metadata`)."""
    try:
        import onnx
    except ImportError:
        raise UserError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from None
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=ONNX_OPSETS[exporter])
    has_switch = "dynamo" in inspect.signature(torch.onnx.export).parameters
    if exporter == "dynamo":
        if not has_switch:
            raise UserError(f"torch {torch.__version__} has no dynamo ONNX exporter (torch >= 2.5 has); pass "
                            f"--onnx-exporter legacy")
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter translates through it)
        except ImportError:
            raise UserError(f"ONNX export needs the onnxscript package: {INSTALL_HINT}") from None
        kwargs.update(dynamo=True, verbose=False)
        if dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1)},)
    else:
        kwargs.update(do_constant_folding=True)
        if has_switch:
            kwargs["dynamo"] = False
        if dynamic_batch:
            kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    buf = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation notices of the exporters, even-kernel padding notes
        program = torch.onnx.export(model, (example,), None if exporter == "dynamo" else buf, **kwargs)
    proto = program.model_proto if exporter == "dynamo" else onnx.load_from_string(buf.getvalue())
    for key, value in onnx_metadata(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    pre = meta.preprocessing
    proto.doc_string = f"isoconv {meta.config.get('model')}: {len(meta.classes)} classes, {pre.input_size}x" \
                       f"{pre.input_size} RGB input prepared as the metadata_props say"
    return proto.SerializeToString()  # validated by loading it in onnxruntime right after


def onnx_metadata(meta: ModelMeta) -> dict[str, str]:
    """metadata_props of an ONNX export: "isoconv" (the whole document) and, as JSON values for any reader,
    image_size (resize to), pad_to (then zero-pad centred to; null: none), mean and std (on the [0, 1] scale;
    0 and 1: none), classes (the names of the logits, in order)."""
    pre = meta.preprocessing
    plain = {**pre.to_dict(), "classes": meta.classes}
    return {META_KEY: meta.to_json(), **{k: json.dumps(v) for k, v in plain.items()}}


def export_program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool) -> torch.export.ExportedProgram:
    """A torch.export program of `model` (eval mode, no autograd), with a dynamic batch axis unless fixed."""
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # even-kernel padding notes
        return torch.export.export(model, (example,), dynamic_shapes=shapes)


def save_program(program: torch.export.ExportedProgram, meta: ModelMeta, path: Path) -> None:
    buf = io.BytesIO()  # torch.export.save wants a name ending in .pt2 or a buffer, not our temporary file
    torch.export.save(program, buf, extra_files={EXTRA_META_FILE: meta.to_json()})
    path.write_bytes(buf.getvalue())


def trace(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notices in recent torch
        with torch.no_grad():
            return torch.jit.trace(model, example)


def torchscript_bytes(traced: torch.jit.ScriptModule, meta: ModelMeta) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save is deprecated from torch 2.9 on
        torch.jit.save(traced, buffer, _extra_files={EXTRA_META_FILE: meta.to_json()})
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
    size = meta.preprocessing.input_size
    x = torch.randn(n, 3, size, size, generator=gen)
    return (exported(x).float() - reference(x).float()).abs().max().item()
