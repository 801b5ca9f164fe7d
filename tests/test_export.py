"""`isoconv export`: ONNX matches PyTorch for every preset; TorchScript and safetensors round-trip; metadata travels."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import isoconv
from isoconv.cli import main
from isoconv.config import build_config
from isoconv.errors import UserError
from isoconv.interop.export import MATCH_TOLERANCE, export_model, export_target, write_atomically
from isoconv.interop.load import model_format, read_model
from isoconv.rundir import RunDir
from isoconv.weights.meta import META_KEY, ModelMeta
from isoconv.weights.checkpoint import save_checkpoint

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny graphs: one intra-op thread is as fast, and much faster than two when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_meta(model: str, image_size: int, num_classes: int = 10, **overrides) -> ModelMeta:
    cfg = build_config(model=model, **overrides)
    data = {"classes": [f"c{i}" for i in range(num_classes)] if num_classes != 10 else CLASSES,
            "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "image_size": image_size, "dataset": "cifar10"}
    return ModelMeta(cfg.to_dict(), data)


def randomise_state(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and layer scales, so every op shows in the outputs (eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith("gamma"):  # ConvNeXt layer scale starts at 1e-6, which would hide the blocks
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.5)
    return model.eval()


def make_run(run_dir: Path, model="cm-cpu", image_size=32, seed=0, finished=True, **overrides) -> Path:
    """A run directory with a checkpoint as training writes it (random weights, no training), and unless
    `finished=False` the summary.json that marks a finished run."""
    meta = make_meta(model, image_size, **overrides)
    torch.manual_seed(seed)
    net = randomise_state(meta.build_model("test"), seed)
    run_dir.mkdir(parents=True)
    save_checkpoint({"model": net.state_dict(), "config": meta.config, "epoch": 1, "params": 0, "data": meta.data},
                    run_dir / "last.pt")
    if finished:
        RunDir(run_dir).write_summary({"epochs": 1}, "")
    return run_dir


def reference_model(run_dir: Path) -> torch.nn.Module:
    model, _ = read_model(run_dir, torch.device("cpu"))
    return model


def ort_session(path: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def batch(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# Every preset, plus even kernels (asymmetric "same" padding) with and without ConvMixer-XL's skips.
PRESET_CASES = [(name, {}) for name in isoconv.list_models()] + [
    ("cm-vanilla", {"kernel": 4}), ("cm-xl", {"kernel": 6, "depth": 6}), ("cm-cpu", {"kernel": 2})]


@pytest.mark.parametrize("name,overrides", PRESET_CASES,
                         ids=[n + "".join(f"-{k}{v}" for k, v in o.items()) for n, o in PRESET_CASES])
def test_onnx_matches_pytorch_for_every_preset(name, overrides, tmp_path):
    """Every preset's ops through the legacy exporter (about 1 s each; the dynamo exporter, about 20 s a model on
    two shared cores, is checked on the padded even-kernel run and the cases of test_dynamo_onnx_...)."""
    info = isoconv.models.model_info(name)
    size = 8 if info["family"] == "convmixer" and info["defaults"]["patch_size"] <= 2 else 16  # small but not 1x1
    meta = make_meta(name, image_size=size, **overrides)
    torch.manual_seed(0)
    model = randomise_state(meta.build_model("test"), seed=1)
    result = export_model(model, meta, "onnx", tmp_path / "m.onnx", batch_size=2, exporter="legacy")

    session = ort_session(tmp_path / "m.onnx")
    assert session.get_inputs()[0].shape == [2, 3, size, size]
    x = batch(2, size)
    out = session.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    diff = float(np.abs(out - ref).max())
    assert diff <= MATCH_TOLERANCE, f"{name} {overrides}: ONNX differs from PyTorch by {diff}"
    assert result.max_abs_diff <= MATCH_TOLERANCE
    assert np.abs(ref).max() > 1e-2  # the comparison is not between two near-zero outputs


def test_even_kernel_padding_is_asymmetric_in_onnx(tmp_path):
    """PyTorch pads an even "same" kernel by (k-1)//2 before and k//2 after; the ONNX graph must say so."""
    meta = make_meta("cm-cpu", image_size=16, kernel=4, dim=8, depth=1, patch=1)
    model = randomise_state(meta.build_model("test"), seed=2)
    export_model(model, meta, "onnx", tmp_path / "m.onnx", batch_size=1)  # the default (dynamo) exporter
    depthwise = [n for n in onnx.load(str(tmp_path / "m.onnx")).graph.node
                 if n.op_type == "Conv" and any(a.name == "group" and a.i == 8 for a in n.attribute)]
    assert len(depthwise) == 1
    attrs = {a.name: a for a in depthwise[0].attribute}
    # either explicit pads (top, left, bottom, right) or SAME_UPPER (the extra row/column at the end)
    assert list(attrs["pads"].ints) == [1, 1, 2, 2] if "pads" in attrs else attrs["auto_pad"].s == b"SAME_UPPER"


def test_onnx_export_takes_any_batch_size_by_default(tmp_path, capsys):
    run = make_run(tmp_path / "run", model="cm-cpu", dim=16, depth=2)
    assert main(["export", str(run), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "any batch size" in out and "max abs diff vs PyTorch" in out
    session = ort_session(run / "model.onnx")
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic batch dimension
    assert isinstance(session.get_outputs()[0].shape[0], str)
    model = reference_model(run)
    for n in (1, 2, 7):
        x = batch(n, 32, seed=n)
        out = session.run(None, {"images": x.numpy()})[0]
        assert out.shape == (n, 10)
        with torch.no_grad():
            assert np.abs(out - model(x).numpy()).max() <= MATCH_TOLERANCE
    assert export_target(run, "onnx", tmp_path / "api.onnx", exporter="legacy").dynamic_batch  # the Python API too


def test_dynamic_batch_flag_is_a_no_op_alias(tmp_path, capsys):
    run = make_run(tmp_path / "run", model="cm-cpu", dim=16, depth=1)
    assert main(["export", str(run), "--format", "onnx", "--dynamic-batch", "--onnx-exporter", "legacy"]) == 0
    assert "any batch size" in capsys.readouterr().out
    assert isinstance(ort_session(run / "model.onnx").get_inputs()[0].shape[0], str)
    assert main(["export", str(run), "--format", "onnx", "--dynamic-batch", "--static-batch"]) == 2
    assert "--dynamic-batch contradicts" in capsys.readouterr().err


@pytest.mark.parametrize("flags,fixed,exporter", [
    (["--static-batch"], 1, "legacy"), (["--batch-size", "1"], 1, "legacy"), (["--batch-size", "3"], 3, "dynamo"),
    (["--static-batch", "--batch-size", "3"], 3, "legacy")])
def test_fixed_batch_option_refuses_other_batch_sizes(tmp_path, capsys, flags, fixed, exporter):
    run = make_run(tmp_path / "run", model="cm-cpu", dim=16, depth=1)
    assert main(["export", str(run), "--format", "onnx", *flags, "--onnx-exporter", exporter]) == 0
    assert f"batch size {fixed};" in capsys.readouterr().out
    session = ort_session(run / "model.onnx")
    assert session.get_inputs()[0].shape[0] == fixed
    assert session.run(None, {"images": batch(fixed, 32).numpy()})[0].shape == (fixed, 10)
    with pytest.raises(Exception, match=r"(?i)invalid dimensions|got: \d+ expected: " + str(fixed)):
        session.run(None, {"images": batch(fixed + 1, 32).numpy()})


def test_fixed_batch_onnx_is_fed_in_chunks_by_isoconv_load(tmp_path):
    run = make_run(tmp_path / "run", model="cm-cpu", dim=16, depth=1)
    export_target(run, "onnx", tmp_path / "fixed.onnx", batch_size=2, exporter="legacy")
    session = ort_session(tmp_path / "fixed.onnx")
    assert session.get_inputs()[0].shape[0] == 2
    onnx_model, preprocess = isoconv.load(tmp_path / "fixed.onnx")
    assert not onnx_model.training
    x = batch(5, 32)  # 2 + 2 + 1 (zero-padded to 2)
    with torch.no_grad():
        assert (onnx_model(x) - reference_model(run)(x)).abs().max().item() <= MATCH_TOLERANCE
    assert preprocess.classes == tuple(CLASSES)


def test_onnx_metadata_holds_config_and_data_meta(tmp_path):
    run = make_run(tmp_path / "run", model="cm-cpu", dim=16, depth=1, kernel=4)
    path = export_target(run, "onnx", exporter="legacy").path
    assert path == run / "model.onnx"
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    doc = json.loads(props[META_KEY])
    assert doc["config"]["model"] == "cm-cpu" and doc["config"]["kernel"] == 4
    assert doc["data"]["classes"] == CLASSES and doc["data"]["image_size"] == 32
    assert doc["data"]["mean"] == [0.49, 0.48, 0.45]


def test_torchscript_round_trip_gives_equal_outputs(tmp_path):
    run = make_run(tmp_path / "run", model="cm-xl", dim=16, depth=6, image_size=16)
    result = export_target(run, "torchscript", tmp_path / "exported" / "model.pt")
    assert result.max_abs_diff <= 1e-6
    assert model_format(result.path) == "torchscript" and model_format(run / "last.pt") == "checkpoint"
    loaded, preprocess = isoconv.load(result.path)
    x = batch(3, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference_model(run)(x), atol=1e-6, rtol=0)
    assert preprocess.image_size == 16 and preprocess.classes == tuple(CLASSES)


def test_safetensors_round_trip_is_exact_and_carries_metadata(tmp_path):
    from safetensors import safe_open

    run = make_run(tmp_path / "run", model="convnext-cifar", image_size=16)
    path = export_target(run, "safetensors", tmp_path / "w.safetensors").path
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
        stored = {k: f.get_tensor(k) for k in f.keys()}
    reference = reference_model(run)
    assert meta["config"]["model"] == "convnext-cifar" and meta["data"]["classes"] == CLASSES
    assert stored.keys() == reference.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in reference.state_dict().items())
    loaded, _ = isoconv.load(path)
    x = batch(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


def test_export_refuses_exported_models_and_unknown_formats(tmp_path, capsys):
    run = make_run(tmp_path / "run", model="cm-cpu", dim=16, depth=1)
    onnx_path = export_target(run, "onnx", exporter="legacy").path
    with pytest.raises(UserError, match="already an exported onnx model"):
        export_target(onnx_path, "torchscript")
    with pytest.raises(UserError, match="--format must be one of onnx, pt2, torchscript, safetensors"):
        export_target(run, "tflite")
    assert main(["export", str(tmp_path / "missing"), "--format", "onnx"]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    safetensors_path = export_target(run, "safetensors").path
    with pytest.raises(UserError, match="is the file being exported"):
        export_target(safetensors_path, "safetensors", safetensors_path)


def test_failed_write_leaves_nothing_behind(tmp_path):
    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="cannot write .*out.onnx: No space left on device"):
        write_atomically(tmp_path / "out.onnx", fail)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- every format on a padded run

EXPORTS = [("onnx", "dynamo"), ("onnx", "legacy"), ("pt2", "dynamo"), ("torchscript", "dynamo")]


@pytest.fixture(scope="module")
def padded_exports(tmp_path_factory) -> dict:
    """A padded run (32x32 images zero-padded to 40, as --pad-to 40 trains) with an even kernel, exported once in
    each format (the dynamo ONNX export takes about 20 s on two shared cores)."""
    root = tmp_path_factory.mktemp("padded-exports")
    run = make_run(root / "run", model="cm-cpu", image_size=40, dim=16, depth=2, kernel=4, pad_to=40)
    exported = {(fmt, exporter): export_target(run, fmt, root / f"{exporter}.{fmt}", exporter=exporter)
                for fmt, exporter in EXPORTS}
    return {"run": run, **exported}


@pytest.mark.parametrize("fmt,exporter", EXPORTS, ids=[f"{f}-{e}" for f, e in EXPORTS])
def test_every_format_matches_eager_at_batch_1_and_3_on_a_padded_even_kernel_run(padded_exports, fmt, exporter):
    result = padded_exports[(fmt, exporter)]
    assert result.dynamic_batch and result.max_abs_diff <= MATCH_TOLERANCE  # checked at batch 3 when written
    eager = reference_model(padded_exports["run"])
    loaded, preprocess = isoconv.load(result.path)
    assert (preprocess.image_size, preprocess.pad_to) == (32, 40)
    for n in (1, 3):
        x = batch(n, 40, seed=10 + n)
        with torch.no_grad():
            ref = eager(x)
            diff = (loaded(x) - ref).abs().max().item()
        assert diff <= MATCH_TOLERANCE, f"{fmt} ({exporter}) at batch {n}: {diff}"
        assert ref.abs().max() > 1e-2


def test_onnx_metadata_props_say_the_preprocessing_in_plain_keys(padded_exports):
    path = padded_exports[("onnx", "dynamo")].path
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["image_size"]) == 32 and json.loads(props["pad_to"]) == 40
    assert json.loads(props["mean"]) == [0.49, 0.48, 0.45] and json.loads(props["std"]) == [0.25, 0.24, 0.26]
    assert json.loads(props["classes"]) == CLASSES
    assert json.loads(props[META_KEY])["data"]["preprocess"]["pad_to"] == 40
    assert proto.opset_import[0].version == 18  # the dynamo exporter's opset
    assert isinstance(ort_session(path).get_inputs()[0].shape[0], str)  # a dynamic batch axis


def test_pt2_runs_with_torch_alone(padded_exports, tmp_path):
    """torch.export.load runs the archive in a process where isoconv cannot be imported."""
    import subprocess
    import sys

    path = padded_exports[("pt2", "dynamo")].path
    x = batch(3, 40, seed=7)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys; sys.modules['isoconv'] = None; import torch; "
            f"m = torch.export.load({str(path)!r}).module(); "
            f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "y.pt"), reference_model(padded_exports["run"])(x), atol=1e-5)


def test_torchscript_export_says_it_is_deprecated(tmp_path, capsys):
    run = make_run(tmp_path / "run", model="cm-cpu", dim=16, depth=1)
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    captured = capsys.readouterr()
    assert "max abs diff vs PyTorch" in captured.out
    assert "--format torchscript (torch.jit) is deprecated" in captured.err and "--format pt2" in captured.err


def bad_export(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_unfinished_run_unknown_format_and_int8_without_data_exit_2_leaving_no_file(tmp_path, capsys):
    unfinished = make_run(tmp_path / "unfinished", model="cm-cpu", dim=16, depth=1, finished=False)
    err = bad_export(["export", str(unfinished), "--format", "onnx"], capsys)
    assert "has not finished (no summary.json)" in err and "--resume" in err
    run = make_run(tmp_path / "run", model="cm-cpu", dim=16, depth=1)
    err = bad_export(["export", str(run), "--format", "tflite"], capsys)
    assert err == "isoconv: error: --format must be one of onnx, pt2, torchscript, safetensors, folder, got 'tflite'"
    empty = tmp_path / "no-data"
    empty.mkdir()
    err = bad_export(["export", str(run), "--format", "onnx", "--int8", "--data-dir", str(empty)], capsys)
    assert "--int8 needs calibration images" in err and str(empty) in err and "--data-dir" in err
    err = bad_export(["export", str(run), "--format", "pt2", "--int8"], capsys)
    assert "--int8 applies to --format onnx only" in err
    err = bad_export(["export", str(run), "--format", "onnx", "--onnx-exporter", "jit"], capsys)
    assert err == "isoconv: error: --onnx-exporter must be one of dynamo, legacy, got 'jit'"
    assert sorted(p.name for p in unfinished.iterdir()) == ["last.pt"]
    assert sorted(p.name for p in run.iterdir()) == ["last.pt", "report.txt", "summary.json"]
    assert sorted(p.name for p in empty.iterdir()) == []


def test_export_errors_are_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    for name in ("export of an unfinished run", "unknown export format", "INT8 without calibration data",
                 "INT8 for another format", "unknown ONNX exporter"):
        assert f"| {name} |" in doc, name
