"""`isoconv export --int8`: a static INT8 ONNX model, calibrated on training images prepared as the run prepares
test images, scored on the real CIFAR-10 test subset (JPEG-degraded copy) against the fp32 model."""
from pathlib import Path

import onnx
import pytest
import torch
from PIL import Image

import isoconv
from isoconv.cli import main
from isoconv.config import build_config
from isoconv.data import load_data
from isoconv.interop.load import read_model
from isoconv.interop.predict import predict_files
from isoconv.interop.quantize import calibration_batch
from isoconv.train.loop import train

TEST_IMAGES = 500


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory) -> Path:
    """A briefly trained padded run with an even kernel (one epoch on 2,000 images: ~35% top-1, enough for the
    INT8 model's agreement with fp32 to mean something)."""
    out = tmp_path_factory.mktemp("int8") / "run"
    cfg = build_config(model="cm-cpu", dim=32, depth=2, kernel=4, epochs=1, train_subset=2000,
                       test_subset=TEST_IMAGES, batch_size=64, pad_to=36, data_dir=str(data_root), out=str(out),
                       amp="off")
    train(cfg)
    return out


def test_int8_export_keeps_top1_and_carries_the_metadata(trained, data_root, capsys):
    assert main(["export", str(trained), "--format", "onnx", "--int8", "--calibration-images", "256"]) == 0
    out = capsys.readouterr().out
    assert "model.int8.onnx (onnx, INT8, any batch size" in out and "from quantization" in out
    path = trained / "model.int8.onnx"
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 5
    weight_scales = {i.name: i for i in graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1}
    assert any(s.dims[0] == 32 for s in weight_scales.values())  # per output channel (dim 32)

    fp32, pre = isoconv.load(trained)
    int8, int8_pre = isoconv.load(path)
    assert int8_pre == pre and (pre.image_size, pre.pad_to) == (32, 36)
    cfg = build_config(model="cm-cpu", pad_to=36, test_subset=TEST_IMAGES, data_dir=str(data_root))
    _, test = load_data(cfg, torch.device("cpu"), train=False, norm=(pre.mean, pre.std))
    x = (test.images.float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        p32, p8 = fp32(x).argmax(1), int8(x).argmax(1)
    top1_fp32 = (p32 == test.labels).float().mean().item()
    top1_int8 = (p8 == test.labels).float().mean().item()
    assert top1_fp32 > 0.2  # the model learnt something
    assert abs(top1_int8 - top1_fp32) <= 0.03, (top1_fp32, top1_int8)
    assert (p32 == p8).float().mean().item() >= 0.9

    image = trained.parent / "cat.png"  # the first test image as a file, before the 32 -> 36 padding
    Image.fromarray(test.images[0, :, 2:34, 2:34].permute(1, 2, 0).numpy()).save(image)
    result = predict_files(path, [image], top_k=3, device="cpu")
    assert result.predictions[0].indices[0] == p8[0].item()


def test_calibration_images_are_the_training_images_prepared_like_test_images(trained, data_root):
    _, meta = read_model(trained, torch.device("cpu"))
    batch = calibration_batch(meta, str(data_root), 8)
    assert batch.shape == (8, 3, 36, 36)
    border = batch[:, :, :2]  # zero padding, normalized: (0 - mean) / std
    expected = (-torch.tensor(meta.preprocessing.mean) / torch.tensor(meta.preprocessing.std)).view(1, 3, 1, 1)
    assert torch.allclose(border, expected.expand_as(border))
    cfg = build_config(model="cm-cpu", pad_to=36, data_dir=str(data_root), train_subset=8)
    train_ds, _ = load_data(cfg, torch.device("cpu"), train=True)
    first = (train_ds.images[:8].float() / 255 - torch.tensor(train_ds.mean).view(1, 3, 1, 1)) \
        / torch.tensor(train_ds.std).view(1, 3, 1, 1)
    assert torch.allclose(batch, first, atol=1e-6)
