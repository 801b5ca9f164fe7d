"""Inference sees what training saw: a padded run and a seed file give `isoconv eval`'s logits through isoconv.load,
isoconv predict and an ONNX export (the same test images, as PNG files where a path needs files)."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import isoconv
from isoconv.config import build_config
from isoconv.data import load_data, load_dataset
from isoconv.eval import evaluate as evaluate_module
from isoconv.eval.evaluate import predict_logits
from isoconv.eval.run import evaluate_target
from isoconv.interop.export import export_model, export_target
from isoconv.interop.load import read_foreign, read_model
from isoconv.interop.predict import predict_files
from isoconv.train.loop import train
from isoconv.weights.checkpoint import load_checkpoint, save_checkpoint
from isoconv.weights.meta import PREPROCESS_KEY, ModelMeta, Preprocessing
from test_seed_layouts import SeedConvNext, randomise

N = 12  # test images
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def padded_run(data_root, tmp_path_factory) -> Path:
    """A really trained run with --pad-to (32x32 CIFAR zero-padded to 40x40) and an even kernel."""
    out = tmp_path_factory.mktemp("padded") / "run"
    cfg = build_config(model="cm-cpu", dim=16, depth=1, kernel=4, epochs=1, train_subset=64, test_subset=N,
                       batch_size=32, pad_to=40, data_dir=str(data_root), out=str(out), amp="off")
    train(cfg)
    return out


@pytest.fixture(scope="module")
def test_files(data_root, tmp_path_factory) -> list[Path]:
    """The first N CIFAR-10 test images (as decoded by isoconv: JPEG-degraded copy) as lossless PNG files."""
    folder = tmp_path_factory.mktemp("test-images")
    test = load_dataset("cifar10", data_root, "test").subset(N)
    paths = []
    for i, image in enumerate(test.images):
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


def eval_logits(run: Path, monkeypatch) -> torch.Tensor:
    """The logits `isoconv eval RUN` computes on its first N test images."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(predict_logits(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(evaluate_module, "predict_logits", spy)
    report = evaluate_target(run, test_subset=N, device="cpu")
    assert report["test_images"] == N
    return seen[0]


def probabilities(result) -> torch.Tensor:
    """(N, classes) softmax from a predict_files result asked for every class."""
    out = torch.zeros(len(result.predictions), len(result.predictions[0].indices))
    for row, p in enumerate(result.predictions):
        out[row, p.indices] = torch.tensor(p.probabilities)
    return out


def test_padded_run_gives_eval_logits_through_load_predict_and_onnx(padded_run, test_files, tmp_path, monkeypatch):
    reference = eval_logits(padded_run, monkeypatch)
    model, preprocess = isoconv.load(padded_run)
    assert (preprocess.image_size, preprocess.pad_to, preprocess.input_size) == (32, 40, 40)
    batch = preprocess.to_uint8(test_files)
    assert batch[:, :, :4].sum() == 0 and batch[:, :, -4:].sum() == 0  # zero borders, not a resized image
    with torch.no_grad():
        assert torch.allclose(model(preprocess(test_files)), reference, atol=1e-5, rtol=0)
    predicted = probabilities(predict_files(padded_run, test_files, top_k=10, device="cpu"))
    assert torch.allclose(predicted, reference.softmax(1), atol=1e-6)

    onnx_file = export_target(padded_run, "onnx", tmp_path / "padded.onnx").path
    onnx_model, onnx_pre = isoconv.load(onnx_file)
    assert (onnx_pre.image_size, onnx_pre.pad_to) == (32, 40)
    with torch.no_grad():
        assert torch.allclose(onnx_model(onnx_pre(test_files)), reference, atol=1e-4, rtol=0)
    predicted = probabilities(predict_files(onnx_file, test_files, top_k=10, device="cpu"))
    assert torch.allclose(predicted, reference.softmax(1), atol=1e-5)


def test_checkpoint_without_stored_preprocessing_derives_it_from_its_config(padded_run, tmp_path, monkeypatch):
    """A checkpoint written before the preprocessing was stored: pad and decoded size come from its config."""
    state = load_checkpoint(padded_run / "last.pt")
    assert state["data"][PREPROCESS_KEY] == {"image_size": 32, "pad_to": 40, "mean": state["data"]["mean"],
                                             "std": state["data"]["std"]}
    old = copy.deepcopy(state)
    del old["data"][PREPROCESS_KEY]
    (tmp_path / "old").mkdir()
    save_checkpoint(old, tmp_path / "old" / "last.pt")
    _, meta = read_model(tmp_path / "old", CPU)
    assert meta.preprocessing == Preprocessing(32, 40, tuple(state["data"]["mean"]), tuple(state["data"]["std"]))
    assert torch.allclose(eval_logits(tmp_path / "old", monkeypatch), eval_logits(padded_run, monkeypatch))


def test_simple_convnext_seed_file_sees_64x64_zero_padded_unnormalized_input(data_root, test_files, tmp_path):
    """The seed's own file with model="convnext-cifar": load, its ONNX export and predict on that export give the
    seed's logits on CenterCrop(64) (zero padding) of the raw [0, 1] test images, which is also what isoconv's
    evaluation path gives with the seed's preprocessing."""
    seed = randomise(SeedConvNext(10, 1, [8, 16, 24, 32], [1, 1, 1, 1]), seed=5)
    torch.save({"model_state": seed.state_dict()}, tmp_path / "convnext.pt")
    images = load_dataset("cifar10", data_root, "test").subset(N).images
    with torch.no_grad():
        reference = seed(v2.CenterCrop(64)(images).float() / 255)  # the seed's test transform, torchvision's pad
    cfg = build_config(model="convnext-cifar", pad_to=64, test_subset=N, data_dir=str(data_root))
    _, test = load_data(cfg, CPU, train=False, norm=((0.0,) * 3, (1.0,) * 3))
    assert torch.allclose(predict_logits(seed, test.images, test.mean, test.std, device=CPU), reference)

    kwargs = dict(dims=[8, 16, 24, 32], depths=[1, 1, 1, 1])
    model, preprocess = isoconv.load(tmp_path / "convnext.pt", model="convnext-cifar", **kwargs)
    assert (preprocess.image_size, preprocess.pad_to, preprocess.mean, preprocess.std) == (32, 64, (0.0,) * 3,
                                                                                           (1.0,) * 3)
    with torch.no_grad():
        assert torch.allclose(model(preprocess(test_files)), reference, atol=1e-5, rtol=1e-5)

    net, meta = read_foreign(tmp_path / "convnext.pt", CPU, "convnext-cifar", kwargs)
    onnx_file = export_model(net, meta, "onnx", tmp_path / "seed.onnx").path
    onnx_model, onnx_pre = isoconv.load(onnx_file)
    assert onnx_pre == preprocess
    with torch.no_grad():
        assert torch.allclose(onnx_model(onnx_pre(test_files)), reference, atol=1e-4, rtol=1e-4)
    predicted = probabilities(predict_files(onnx_file, test_files, top_k=10, device="cpu"))
    assert torch.allclose(predicted, reference.softmax(1), atol=1e-5)


def test_stored_preprocessing_must_match_the_model_input(tmp_path):
    meta = ModelMeta({"model": "cm-cpu"}, {"classes": ["a", "b"], "mean": [0.5] * 3, "std": [0.2] * 3,
                                           "image_size": 40, PREPROCESS_KEY: Preprocessing(32, 48, (0.5,) * 3,
                                                                                           (0.2,) * 3).to_dict()})
    with pytest.raises(isoconv.errors.UserError, match="makes 48x48 inputs but the model takes 40"):
        ModelMeta.from_json(meta.to_json(), "model.onnx")
