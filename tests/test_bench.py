"""`isoconv bench` (throughput rows, FLOP counts, machine matmul rate, time to accuracy) and `--compile`.

torch.compile's default (inductor) backend needs ~30 s of C++ code generation even for a tiny model on this
CPU, so the compile tests set runtime.COMPILE_BACKEND to eager: dynamo still captures and runs the graph (the
wrapper, the recompiles and the state dict are the real ones), only the code generation is skipped.
"""
import json

import pytest
from conftest import captured_logs
import torch

from isoconv import bench, create_model, runtime
from isoconv.bench import matmul_gflops, run_bench, time_to_accuracy
from isoconv.cli import main
from isoconv.config import build_config
from isoconv.errors import ConfigError
from isoconv.models.flops import forward_flops
from isoconv.train import train
from isoconv.weights import load_checkpoint
from isoconv.runtime import compile_model
from isoconv.train.setup import build_optimizer

TINY = dict(model="cm-cpu", dim=16, depth=1, batch_size=8, workers=0, amp="off")


def quiet(*_):
    pass


def tiny(data_root, **kw):
    return build_config("cpu-quick", **{**TINY, "data_dir": str(data_root), **kw})


def convmixer_flops(dim, depth, kernel, patch, image=32, classes=10):
    """Forward FLOPs of a ConvMixer by hand: a multiply-add is 2 FLOPs; biases, BatchNorm and activations
    are not counted (as torch.utils.flop_counter does)."""
    positions = (image // patch) ** 2
    embed = positions * dim * 3 * patch * patch
    block = positions * (dim * kernel * kernel + dim * dim)  # depthwise + pointwise
    return 2 * (embed + depth * block + dim * classes)


def test_forward_flops_of_cm_vanilla_is_the_analytic_count():
    expected = 2 * (256 * 256 * 12 + 8 * 256 * (256 * 25 + 256 * 256) + 256 * 10)
    assert convmixer_flops(256, 8, 5, 2) == expected == 296_227_840
    assert forward_flops(create_model("cm-vanilla"), 32) == expected
    assert forward_flops(create_model("cm-vanilla"), 32, batch_size=3) == 3 * expected


def test_matmul_rate_is_positive_in_both_precisions():
    for amp in ("fp32", "bf16"):
        assert matmul_gflops(torch.device("cpu"), amp, size=64, repeats=2) > 0


def test_bench_table_and_json_side_by_side(data_root, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--recipe", "cpu-quick", "--dim", "16", "--depth", "1", "--batch-size", "8",
                 "--epoch-images", "16", "--steps", "1", "--windows", "2", "--warmup", "1", "--workers", "0",
                 "--matmul-size", "64", "--full-epoch", "--data-dir", str(data_root), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train GFLOP/s" in printed and "x tv fp32" in printed
    report = json.loads(out.read_text())
    rows, machine = report["rows"], report["machine"]
    # defaults: both loaders x both precisions
    assert [(r["loader"], r["amp"]) for r in rows] == [("device", "fp32"), ("device", "bf16"),
                                                       ("torchvision", "fp32"), ("torchvision", "bf16")]
    assert set(machine["matmul_gflops"]) == {"fp32", "bf16"} and min(machine["matmul_gflops"].values()) > 0
    assert machine["matmul_size"] == 64 and machine["device"] == "cpu"
    flops = convmixer_flops(16, 1, 5, 4)
    by_key = {(r["loader"], r["amp"]): r for r in rows}
    for r in rows:
        assert r["model"] == "cm-cpu" and r["batch_size"] == 8 and r["train_images"] == 16
        assert r["forward_flops_per_image"] == flops
        assert r["train_gflops_per_second"] == pytest.approx(3 * flops * r["train_images_per_second"] / 1e9)
        assert r["inference_gflops_per_second"] == pytest.approx(flops * r["inference_images_per_second"] / 1e9)
        assert r["epoch_seconds_estimate"] == pytest.approx(16 / r["train_images_per_second"])
        assert r["epoch_seconds"] > 0  # --full-epoch timed a real one
        assert r["matmul_gflops"] == machine["matmul_gflops"][r["amp"]]
        assert r["train_fraction_of_matmul"] == pytest.approx(r["train_gflops_per_second"] / r["matmul_gflops"])
        same = by_key[("torchvision", r["amp"])]
        assert r["speedup_vs_torchvision"] == pytest.approx(r["train_images_per_second"]
                                                            / same["train_images_per_second"])
        assert r["speedup_vs_torchvision_fp32"] == pytest.approx(
            r["train_images_per_second"] / by_key[("torchvision", "fp32")]["train_images_per_second"])
        assert r["epoch_speedup_vs_torchvision"] == pytest.approx(same["epoch_seconds"] / r["epoch_seconds"])
        assert r["compile_seconds"] is None and r["inference_compile_seconds"] is None
    assert by_key[("torchvision", "bf16")]["speedup_vs_torchvision"] == 1.0


def test_bench_profile_shows_where_a_training_step_goes(data_root):
    with captured_logs() as logged:
        report = run_bench(tiny(data_root, train_subset=16, test_subset=8), models=["cm-cpu"], amps=["off"],
                           loaders=["device"], steps=1, warmup=1, windows=1, matmul_size=64, profile=True)
    (row,) = report["rows"]
    ops = row["profile"]
    assert 3 <= len(ops) <= bench.PROFILE_TOP + 1
    assert sum(op["share"] for op in ops) == pytest.approx(1.0, abs=1e-6)
    shares = [op["share"] for op in ops if op["operator"] != "(other)"]
    assert shares == sorted(shares, reverse=True) and all(op["ms_per_step"] >= 0 for op in ops)
    assert any("conv" in op["operator"] for op in ops)  # a ConvMixer step is mostly convolutions
    assert any(line.strip().startswith("operator") and "share" in line for line in logged)


def test_bench_with_compile_reports_compile_time(data_root, monkeypatch):
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "eager")
    report = run_bench(tiny(data_root, train_subset=16, test_subset=8, compile=True), models=["cm-cpu"],
                       amps=["off"], loaders=["device"], steps=1, warmup=2, windows=1, matmul_size=64)
    (row,) = report["rows"]
    assert row["compile"] is True
    assert row["compile_seconds"] >= 0 and row["inference_compile_seconds"] >= 0
    assert row["speedup_vs_torchvision"] is None  # no torchvision row to compare with


def test_bench_rejects_bad_lists_before_timing_anything(capsys):
    assert main(["bench", "--models", ","]) == 2
    assert "--models needs at least one value" in capsys.readouterr().err
    assert main(["bench", "--models", "cm-cpu,cm-nope", "--amps", "off"]) == 2
    assert "cm-nope" in capsys.readouterr().err
    assert main(["bench", "--amps", "off,fp8"]) == 2
    assert "--amp must be one of auto, bf16, fp16, off, got 'fp8'" in capsys.readouterr().err
    assert main(["bench", "--windows", "0", "--amps", "off", "--loaders", "device"]) == 2
    assert "--windows must be at least 1, got 0" in capsys.readouterr().err


def test_time_to_accuracy_reports_the_first_epoch_at_the_threshold(data_root, tmp_path, capsys):
    out = tmp_path / "tta.json"
    assert main(["bench", "--time-to-accuracy", "0.0", "--recipe", "cpu-quick", "--model", "cm-cpu", "--dim", "16",
                 "--depth", "1", "--batch-size", "8", "--train-subset", "16", "--test-subset", "16", "--epochs", "2",
                 "--workers", "0", "--amp", "off", "--data-dir", str(data_root), "--out", str(tmp_path / "run"),
                 "--json", str(out)]) == 0
    assert "time to 0.00% test top-1: epoch 1" in capsys.readouterr().out
    report = json.loads(out.read_text())
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert report["reached"] is True and report["epoch"] == 1 and report["threshold"] == 0.0
    assert report["test_top1"] == metrics[0]["test_top1"]
    assert report["train_seconds"] == pytest.approx(metrics[0]["epoch_seconds"])
    assert report["wall_seconds"] >= report["train_seconds"]  # the data loading and the evaluation too
    assert [e["epoch"] for e in report["timeline"]] == [1, 2]
    assert report["timeline"][1]["train_seconds"] == pytest.approx(metrics[0]["epoch_seconds"]
                                                                   + metrics[1]["epoch_seconds"])
    assert report["timeline"][1]["wall_seconds"] > report["timeline"][0]["wall_seconds"]
    assert report["final_test_top1"] == metrics[1]["test_top1"] and report["compile_seconds"] is None


def test_time_to_accuracy_that_is_never_reached(data_root, tmp_path):
    with captured_logs() as logged:
        report = time_to_accuracy(tiny(data_root, train_subset=16, test_subset=16, epochs=1,
                                       out=str(tmp_path / "r")), 1.0, json_path=tmp_path / "tta.json")
    assert report["final_test_top1"] < 1.0  # a 2-step model
    assert report["reached"] is False
    assert report["epoch"] is None and report["train_seconds"] is None and report["wall_seconds"] is None
    assert json.loads((tmp_path / "tta.json").read_text())["reached"] is False
    assert logged[-1].startswith("test top-1 never reached 100.00% in 1 epochs")


def test_time_to_accuracy_flags(capsys):
    assert main(["bench", "--time-to-accuracy", "92.5"]) == 2
    assert "--time-to-accuracy 92.5 is not a top-1 fraction in [0, 1]; write 0.925 for 92.5%" in \
        capsys.readouterr().err
    assert main(["bench", "--time-to-accuracy", "0.9", "--models", "cm-cpu"]) == 2
    assert "--models is for throughput runs" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --compile in training

def test_compiled_training_matches_eager_and_saves_plain_keys(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "eager")
    kw = dict(train_subset=16, test_subset=16, epochs=1)
    plain = train(tiny(data_root, out=str(tmp_path / "plain"), **kw))
    with captured_logs() as logged:
        compiled = train(tiny(data_root, out=str(tmp_path / "compiled"), compile=True, **kw))
    assert plain["compile_seconds"] is None and compiled["compile_seconds"] >= 0
    assert any(line.startswith("torch.compile: ") for line in logged)
    a = load_checkpoint(tmp_path / "plain" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "compiled" / "last.pt")["model"]
    assert list(a) == list(b) and not any("_orig_mod" in k for k in b)
    for k in a:  # the same computation, so the same weights after the steps
        assert a[k].shape == b[k].shape and torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    assert compiled["test_top1"] == plain["test_top1"]


def test_compile_errors_are_config_errors(monkeypatch):
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "no-such-backend")
    with pytest.raises(ConfigError, match=r"--compile is not available here \(.*no-such-backend.*\); drop --compile"):
        compile_model(model, torch.device("cpu"))
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", "inductor")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ConfigError, match="--compile on a CPU needs a C.. compiler"):
        compile_model(model, torch.device("cpu"))


def test_adamw_is_fused_only_on_cuda():
    cfg = build_config(None, model="cm-cpu")
    model = torch.nn.Linear(2, 2)
    cpu_opt, _ = build_optimizer(cfg, model, torch.device("cpu"), "fp32")
    assert not cpu_opt.defaults.get("fused")  # the CPU path stays the reference for-each implementation
    cuda_opt, _ = build_optimizer(cfg, model, torch.device("cuda"), "fp32")
    assert cuda_opt.defaults["fused"] is True
