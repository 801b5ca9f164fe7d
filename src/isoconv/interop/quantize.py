"""INT8 ONNX models for CPU inference: static post-training quantization with onnxruntime's `quantize_static`.

QDQ format, weights int8 per output channel, activations uint8 per tensor (onnxruntime's recommended U8S8 on x86),
MinMax calibration on a few hundred training images prepared as the run prepares test images (the stored
`Preprocessing`). The graph is first optimised by onnxruntime's `quant_pre_process` (BatchNorm folded into the
convolutions, shapes inferred), so the quantized convolutions are the fused ones.

Why onnxruntime and not torchao's PT2E flow with the X86 Inductor quantizer: see docs/results.md ("INT8"), measured
on this project's models; the output here must also be an ONNX file that onnxruntime alone runs.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data import load_dataset, resolve_data_root
from ..errors import UserError
from ..formats import CALIBRATION_IMAGES
from ..weights.files import INSTALL_HINT
from ..weights.meta import META_KEY, ModelMeta
from .load import preprocess_for

CALIBRATION_BATCH = 32


def calibration_batch(meta: ModelMeta, data_dir: Optional[str], n: int = CALIBRATION_IMAGES) -> torch.Tensor:
    """The first `n` training images of the run's dataset as the model's float input (resized, padded and normalized
    as the run's stored preprocessing says). A missing or different dataset is a UserError naming --data-dir."""
    if n < 1:
        raise UserError(f"--calibration-images must be at least 1, got {n}")
    cfg = meta.train_config("the model's config")
    root = resolve_data_root(data_dir or cfg.data_dir)
    try:
        train = load_dataset(cfg.dataset, root, "train", download=False, label_type=cfg.label_type,
                             image_size=cfg.image_size, val_split=cfg.val_split)
    except UserError as e:
        raise UserError(f"--int8 needs calibration images ({n} training images of {cfg.dataset}) but none could be "
                        f"read under {root} ({str(e).rstrip('.')}); pass --data-dir with the data the run was "
                        f"trained on") from None
    if list(train.classes) != meta.classes:
        raise UserError(f"--int8: the {cfg.dataset} training data under {root} has {train.num_classes} classes "
                        f"({', '.join(train.classes[:3])}, ...), not the model's {len(meta.classes)}; pass --data-dir "
                        f"with the data the run was trained on")
    return preprocess_for(meta)(train.subset(n).images)


def quantize_onnx(model: bytes, calibration: torch.Tensor, input_name: str) -> bytes:
    """An fp32 ONNX model (bytes) as a QDQ INT8 model (bytes) with the same metadata_props."""
    try:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise UserError(f"--int8 needs onnx and onnxruntime: {INSTALL_HINT}") from None

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration[s:s + CALIBRATION_BATCH].numpy().astype(np.float32)
                                for s in range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    source = onnx.load_from_string(model)
    with tempfile.TemporaryDirectory(prefix="isoconv-int8-") as tmp:
        fp32, prepared, int8 = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        fp32.write_bytes(model)
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)  # onnxruntime warns on the root logger for each BatchNorm (per-tensor there)
        try:
            quant_pre_process(str(fp32), str(prepared))
            quantize_static(str(prepared), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        result = onnx.load(str(int8))
    if not any(p.key == META_KEY for p in result.metadata_props):
        result.metadata_props.extend(source.metadata_props)
    result.doc_string = source.doc_string + " (INT8: static post-training quantization, QDQ, per-channel weights)"
    return result.SerializeToString()
