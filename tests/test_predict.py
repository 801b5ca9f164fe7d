"""`isoconv predict` and `isoconv.load`: files, folders, globs, bad files, output formats, exported models."""
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import isoconv
from isoconv.cli import main
from isoconv.config import build_config
from isoconv.data import load_dataset
from isoconv.errors import UserError
from isoconv.interop.export import export_target
from isoconv.interop.preprocess import collect_image_paths
from isoconv.weights.checkpoint import save_checkpoint
from isoconv.train.loop import train

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
GOOD = ["photos/a.png", "photos/b.jpg", "photos/gray.png", "photos/sub/c.bmp", "photos/rgba.png", "extra/d.png"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory as training writes it, with random weights (no training needed to test inference)."""
    run = tmp_path_factory.mktemp("predict") / "run"
    cfg = build_config(model="cm-cpu", dim=16, depth=1, kernel=4, amp="off")  # fp32, like the references below
    torch.manual_seed(0)
    model = isoconv.create_model("cm-cpu", dim=16, depth=1, kernel_size=4, num_classes=10)
    with torch.no_grad():  # spread the logits so top-1 is decided by the image, not by ties
        model.head.weight.mul_(20)
    run.mkdir()
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 1, "params": 0,
                     "data": {"classes": CLASSES, "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26],
                              "image_size": 32, "dataset": "cifar10"}}, run / "last.pt")
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Images of several formats, sizes and modes, plus a broken file and a non-image file, under one root."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)

    def rgb(h, w):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    (root / "photos" / "sub").mkdir(parents=True)
    (root / "extra").mkdir()
    rgb(32, 32).save(root / "photos/a.png")
    rgb(48, 40).save(root / "photos/b.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / "photos/gray.png")
    rgb(32, 32).save(root / "photos/sub/c.bmp")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)).save(root / "photos/rgba.png")
    rgb(64, 64).save(root / "extra/d.png")
    (root / "photos/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    (root / "photos/notes.txt").write_text("not an image, ignored inside folders")
    return root


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_files_folders_and_globs_skips_a_bad_file(run_dir, images, capsys, monkeypatch):
    monkeypatch.chdir(images)
    code, out, err = run_cli(["predict", str(run_dir), "photos", "extra/*.png", "photos/a.png", "--top-k", "3"],
                             capsys)
    assert code == 1  # broken.png was skipped
    assert "photos/broken.png" in err and "cannot read image" in err
    rows = out.strip().splitlines()
    assert rows[0].split() == ["file", "top-1", "top-2", "top-3"]
    assert sorted(r.split()[0] for r in rows[1:]) == sorted(GOOD)  # each image once, notes.txt not tried
    for row in rows[1:]:
        cells = row.split()
        assert cells[1] in CLASSES and 0 < float(cells[2]) <= 1


def test_predict_exit_code_is_zero_when_nothing_is_skipped(run_dir, images, capsys):
    code, out, err = run_cli(["predict", str(run_dir), str(images / "extra")], capsys)
    assert code == 0 and err == ""
    assert "d.png" in out


def test_missing_input_is_named_and_skipped(run_dir, images, capsys):
    code, out, err = run_cli(["predict", str(run_dir), str(images / "extra/d.png"), str(images / "nope.png"),
                              str(images / "*.gif")], capsys)
    assert code == 1
    assert "nope.png: no such file or folder" in err and "*.gif: pattern matches no image files" in err
    assert "d.png" in out


def test_json_output_parses_and_matches_the_model(run_dir, images, capsys):
    code, out, _ = run_cli(["predict", str(run_dir), str(images / "photos"), "--format", "json", "--top-k", "4"], capsys)
    assert code == 1
    doc = json.loads(out)
    assert [s["file"] for s in doc["skipped"]] == [str(images / "photos/broken.png")]
    assert len(doc["predictions"]) == 5
    model, preprocess = isoconv.load(run_dir)
    for p in doc["predictions"]:
        top = p["top"]
        assert len(top) == 4
        assert [t["class"] for t in top] == [CLASSES[t["index"]] for t in top]
        probs = [t["probability"] for t in top]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        with torch.no_grad():
            expected = model(preprocess([p["file"]])).softmax(1)[0]
        assert top[0]["index"] == int(expected.argmax())
        assert abs(top[0]["probability"] - expected.max().item()) < 1e-6


def test_csv_output_parses(run_dir, images, capsys):
    code, out, _ = run_cli(["predict", str(run_dir), str(images / "extra"), str(images / "photos/a.png"), "--format", "csv",
                            "--top-k", "2"], capsys)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 4 and [r["rank"] for r in rows] == ["1", "2", "1", "2"]
    assert all(r["class"] == CLASSES[int(r["index"])] and 0 < float(r["probability"]) <= 1 for r in rows)


def test_flip_tta_averages_plain_and_mirrored_softmax(run_dir, images, capsys):
    path = str(images / "extra/d.png")
    code, out, _ = run_cli(["predict", str(run_dir), path, "--format", "json", "--tta", "flip", "--top-k", "10"], capsys)
    assert code == 0
    got = {t["index"]: t["probability"] for t in json.loads(out)["predictions"][0]["top"]}
    model, preprocess = isoconv.load(run_dir)
    x = preprocess([path])
    with torch.no_grad():
        expected = (model(x).softmax(1) + model(x.flip(3)).softmax(1))[0] / 2
        plain = model(x).softmax(1)[0]
    assert max(abs(got[i] - expected[i].item()) for i in range(10)) < 1e-6
    assert (expected - plain).abs().max() > 1e-4  # the mirrored image did change the result


def test_preprocess_resizes_like_the_decoder_for_paths_pil_and_tensors(run_dir, images):
    _, preprocess = isoconv.load(run_dir)
    path = images / "photos/b.jpg"  # 40x48: resized to 32x32
    from_path = preprocess([path])
    with Image.open(path) as im:
        from_pil = preprocess(im)
        as_tensor = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    assert from_path.shape == (1, 3, 32, 32) and from_path.dtype == torch.float32
    assert torch.equal(from_path, from_pil) and torch.equal(from_path, preprocess(as_tensor))
    u8 = preprocess.to_uint8(path)
    expected = (u8.float() / 255 - torch.tensor(preprocess.mean).view(3, 1, 1)) / torch.tensor(preprocess.std).view(
        3, 1, 1)
    assert torch.allclose(from_path, expected, atol=1e-6)
    with pytest.raises(UserError, match="uint8 \\(3, H, W\\)"):
        preprocess(torch.zeros(3, 32, 32))


@pytest.mark.parametrize("fmt,name", [("onnx", "model.onnx"), ("safetensors", "model.safetensors"),
                                      ("torchscript", "model.pt")])
def test_exported_file_alone_predicts_like_the_run(run_dir, images, fmt, name, tmp_path, capsys):
    exported = export_target(run_dir / "last.pt", fmt, tmp_path / "elsewhere" / name).path  # no summary: the checkpoint
    _, from_run, _ = run_cli(["predict", str(run_dir), str(images / "photos"), "--format", "json"], capsys)
    code, from_file, _ = run_cli(["predict", str(exported), str(images / "photos"), "--format", "json"], capsys)
    assert code == 1
    run_preds, file_preds = json.loads(from_run)["predictions"], json.loads(from_file)["predictions"]
    assert [p["top"][0]["class"] for p in file_preds] == [p["top"][0]["class"] for p in run_preds]
    for a, b in zip(run_preds, file_preds):
        assert abs(a["top"][0]["probability"] - b["top"][0]["probability"]) < 1e-4


def test_collect_image_paths_drops_duplicates_and_reports_empty_folders(images, tmp_path):
    (tmp_path / "empty").mkdir()
    paths, problems = collect_image_paths([images / "extra", str(images / "extra" / "*.png"), tmp_path / "empty"])
    assert paths == [images / "extra/d.png"]
    assert problems == [(str(tmp_path / "empty"), "folder holds no image files")]


def test_predict_errors_exit_2_with_one_line(run_dir, images, tmp_path, capsys):
    code, _, err = run_cli(["predict", str(tmp_path / "no-run"), str(images / "extra")], capsys)
    assert code == 2 and "no-run does not exist" in err
    code, _, err = run_cli(["predict", str(run_dir), str(tmp_path / "nothing-*.png")], capsys)
    assert code == 2 and "no image files found" in err
    code, _, err = run_cli(["predict", str(run_dir), str(images / "extra"), "--top-k", "0"], capsys)
    assert code == 2 and "--top-k must be at least 1" in err
    (tmp_path / "weights.safetensors").write_bytes(b"garbage")
    code, _, err = run_cli(["predict", str(tmp_path / "weights.safetensors"), str(images / "extra")], capsys)
    assert code == 2 and "cannot read" in err and "weights.safetensors" in err


def test_load_reproduces_the_runs_evaluation(data_root, tmp_path):
    """A really trained run: isoconv.load + its preprocessing give the run's own test accuracy and logits."""
    cfg = build_config(model="cm-cpu", dim=16, depth=1, epochs=1, train_subset=64, test_subset=32, batch_size=32,
                       data_dir=str(data_root), out=str(tmp_path / "run"), amp="off")
    summary = train(cfg)
    model, preprocess = isoconv.load(tmp_path / "run")
    assert not model.training
    test = load_dataset("cifar10", data_root, "test").subset(32)
    assert preprocess.classes == tuple(test.classes)
    with torch.no_grad():
        logits = model(preprocess(test.images))
    top1 = (logits.argmax(1) == test.labels).float().mean().item()
    assert top1 == pytest.approx(summary["test_top1"], abs=1e-9)

    from isoconv.eval.evaluate import predict_logits  # the evaluation training ran
    reference = predict_logits(model, test.images, preprocess.mean, preprocess.std, device=torch.device("cpu"),
                               precision="fp32", channels_last=cfg.channels_last)
    assert torch.allclose(logits, reference, atol=1e-4, rtol=0)


def test_predict_runs_in_the_training_precision(run_dir, images, tmp_path, capsys):
    """One inference path: predict autocasts like evaluation does, in the precision the run trained in."""
    from isoconv.eval.evaluate import predict_logits
    from isoconv.weights import load_checkpoint

    state = load_checkpoint(run_dir / "last.pt")
    bf16_run = tmp_path / "bf16"
    bf16_run.mkdir()
    save_checkpoint({**state, "config": {**state["config"], "amp": "bf16"}}, bf16_run / "last.pt")
    model, preprocess = isoconv.load(bf16_run)
    files = [images / name for name in GOOD[:3]]
    code, out, _ = run_cli(["predict", str(bf16_run), *map(str, files), "--format", "json", "--top-k", "1"], capsys)
    assert code == 0
    got = [p["top"][0]["probability"] for p in json.loads(out)["predictions"]]
    batch = torch.stack([preprocess.image_to_uint8(f) for f in files])
    top = {precision: predict_logits(model, batch, preprocess.mean, preprocess.std, device=torch.device("cpu"),
                                     precision=precision).softmax(1).max(1).values.tolist()
           for precision in ("bf16", "fp32")}
    assert max(abs(g - p) for g, p in zip(got, top["bf16"])) < 1e-6
    assert max(abs(g - p) for g, p in zip(got, top["fp32"])) > 1e-5  # it really ran in bf16


def test_predict_with_amp_auto_uses_the_precision_the_run_trained_in(run_dir, images, tmp_path, capsys,
                                                                      monkeypatch):
    """A run trained with --amp auto predicts in what auto chose then (its summary), as `isoconv eval` does, not in
    what the rule alone would pick now."""
    from isoconv import runtime
    from isoconv.eval.evaluate import predict_logits
    from isoconv.weights import load_checkpoint

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)  # the rule alone would say bf16
    state = load_checkpoint(run_dir / "last.pt")
    auto_run = tmp_path / "auto"
    auto_run.mkdir()
    save_checkpoint({**state, "config": {**state["config"], "amp": "auto"}}, auto_run / "last.pt")
    (auto_run / "summary.json").write_text(json.dumps({"amp": "fp32", "device": "cpu"}))
    model, preprocess = isoconv.load(auto_run)
    files = [images / name for name in GOOD[:3]]
    batch = torch.stack([preprocess.image_to_uint8(f) for f in files])
    top = {precision: predict_logits(model, batch, preprocess.mean, preprocess.std, device=torch.device("cpu"),
                                     precision=precision).softmax(1).max(1).values.tolist()
           for precision in ("bf16", "fp32")}
    for target in (auto_run, auto_run / "last.pt"):
        code, out, _ = run_cli(["predict", str(target), *map(str, files), "--format", "json", "--top-k", "1"],
                               capsys)
        assert code == 0
        got = [p["top"][0]["probability"] for p in json.loads(out)["predictions"]]
        assert max(abs(g - p) for g, p in zip(got, top["fp32"])) < 1e-6, target
        assert max(abs(g - p) for g, p in zip(got, top["bf16"])) > 1e-5, target
