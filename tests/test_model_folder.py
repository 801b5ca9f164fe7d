"""`isoconv export RUN --format folder`: the Hub-layout model folder gives the same logits, predictions and
evaluation as the run it came from (a padded run included), its card and config say what the run was, and bad
input leaves nothing behind."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import isoconv
from isoconv.cli import build_parser, main
from isoconv.config import build_config, settings_from_args
from isoconv.eval.run import evaluate_target
from isoconv.interop import model_folder
from isoconv.interop.predict import predict_files
from isoconv.rundir import RunDir

TINY = ["--model", "cm-cpu", "--dim", "16", "--depth", "1", "--epochs", "1", "--batch-size", "32",
        "--train-subset", "64", "--test-subset", "32", "--amp", "off"]
FILES = {"config.json", "model.safetensors", "README.md"}


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    """Two finished tiny runs on the real (JPEG-degraded) CIFAR-10: plain, and zero-padded to 36x36 with an even
    kernel; each exported as a model folder through the CLI."""
    root = tmp_path_factory.mktemp("folder-runs")
    out = {}
    for name, extra in (("plain", []), ("padded", ["--pad-to", "36", "--kernel", "4"])):
        run = root / name
        assert main(["train", *TINY, *extra, "--data-dir", str(data_root), "--out", str(run)]) == 0
        folder = root / f"{name}-model"
        assert main(["export", str(run), "--format", "folder", "--output", str(folder)]) == 0
        out[name] = (run, folder)
    return out


def images(tmp_path: Path) -> list[Path]:
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i, size in enumerate((32, 48, 20)):
        pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy()
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.mark.parametrize("name", ["plain", "padded"])
def test_folder_gives_the_runs_logits_predictions_and_evaluation(runs, name, tmp_path, data_root):
    run, folder = runs[name]
    assert {p.name for p in folder.iterdir()} == FILES
    from_run, pre_run = isoconv.load(run)
    from_folder, pre_folder = isoconv.load(folder)
    assert pre_folder == pre_run
    side = pre_run.input_size  # after the zero padding of a --pad-to run
    assert side == (36 if name == "padded" else 32)
    for n in (1, 3):
        x = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(n))
        assert torch.equal(from_folder(x), from_run(x))
    files = images(tmp_path)
    assert predict_files(folder, files, top_k=3, device="cpu") == predict_files(run, files, top_k=3, device="cpu")
    a = evaluate_target(run, data_dir=str(data_root), test_subset=32, device="cpu")
    b = evaluate_target(folder, data_dir=str(data_root), test_subset=32, device="cpu")
    for key in ("test_top1", "test_top5", "test_loss", "amp", "epochs", "report_text"):
        assert a[key] == b[key], key
    # model.safetensors alone is an isoconv file too
    alone, _ = isoconv.load(folder / "model.safetensors")
    x = torch.randn(2, 3, side, side)
    assert torch.equal(alone(x), from_run(x))


def test_config_json_holds_architecture_preprocessing_and_classes(runs):
    run, folder = runs["padded"]
    config = json.loads((folder / "config.json").read_text())
    stored = torch.load(run / "last.pt", weights_only=True)
    assert config["model_type"] == "isoconv" and config["architectures"] == ["ConvMixer"]
    assert config["isoconv"]["config"] == stored["config"]
    classes = stored["data"]["classes"]
    assert config["id2label"] == {str(i): c for i, c in enumerate(classes)} and config["num_labels"] == 10
    pre = config["preprocessing"]
    assert (pre["input_size"], pre["pad_to"], pre["mean"], pre["std"]) == (36, 36, stored["data"]["mean"],
                                                                         stored["data"]["std"])
    summary = RunDir(run).read_summary()
    assert config["training_summary"]["test_top1"] == summary["test_top1"]
    assert "run_dir" not in config["training_summary"]  # no path of the training machine


def test_card_states_recipe_data_verdict_metrics_and_a_command_that_rebuilds_the_run(runs):
    run, folder = runs["padded"]
    card = (folder / "README.md").read_text()
    summary = RunDir(run).read_summary()
    assert card.startswith("---\nlibrary_name: isoconv\npipeline_tag: image-classification\n")
    assert f"value: {summary['test_top1']}" in card  # model-index
    assert f"{100 * summary['test_top1']:.2f}%" in card
    assert "JPEG-degraded CIFAR-10 copy" in card and "differs from the official release" in card
    assert "zero-pad, centred, to 36x36" in card
    assert "## Intended use and limits" in card
    command = card.split("```bash\n")[1].split("\n```")[0]
    assert command.startswith("isoconv train ")
    args = build_parser().parse_args(command.split()[1:])
    rebuilt = build_config(args.recipe, **settings_from_args(args)).to_dict()
    stored = json.loads((folder / "config.json").read_text())["isoconv"]["config"]
    for key in ("model", "dim", "depth", "kernel", "pad_to", "epochs", "batch_size", "train_subset", "lr_max"):
        assert rebuilt[key] == stored[key], key


def test_export_again_replaces_the_folder_and_a_failed_export_leaves_nothing(runs, tmp_path, monkeypatch, capsys):
    run, folder = runs["plain"]
    out = tmp_path / "m"
    assert main(["export", str(run), "--format", "folder", "--output", str(out)]) == 0
    (out / "README.md").write_text("edited\n")
    assert main(["export", str(run), "--format", "folder", "--output", str(out)]) == 0
    assert (out / "README.md").read_text() == (folder / "README.md").read_text()

    def broken_card(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_folder, "model_card", broken_card)
    fresh = tmp_path / "new" / "fresh"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "folder", "--output", str(fresh)]) == 2
    assert capsys.readouterr().err.strip() == (f"isoconv: error: cannot write --output {fresh}: No space left on "
                                               f"device; check the free space and permissions")
    assert main(["export", str(run), "--format", "folder", "--output", str(out)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder, no partial one
    assert (out / "README.md").read_text() == (folder / "README.md").read_text()  # the previous folder is kept


def test_folder_without_isoconv_config_is_refused(runs, tmp_path, capsys):
    _, folder = runs["plain"]
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    (other / "config.json").write_text(json.dumps({"model_type": "vit"}))
    capsys.readouterr()
    assert main(["predict", str(other), str(images(tmp_path)[0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json is not an isoconv model config" in err[0]
