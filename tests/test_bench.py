import json

import pytest

from isoconv.bench import run_bench
from isoconv.cli import main
from isoconv.config import build_config


def test_bench_rows_cover_every_loader_and_precision(data_root, tmp_path):
    cfg = build_config("cpu-quick", data_dir=str(data_root), batch_size=16, train_subset=64, test_subset=16,
                       workers=0)
    out = tmp_path / "bench.json"
    rows = run_bench(cfg, models=["cm-cpu"], amps=["off", "bf16"], loaders=["device", "torchvision"], steps=1,
                     warmup=1, windows=1, json_path=out, log=lambda *_: None)
    assert [(r["loader"], r["amp"]) for r in rows] == [("device", "fp32"), ("device", "bf16"),
                                                       ("torchvision", "fp32"), ("torchvision", "bf16")]
    for r in rows:
        assert r["train_images_per_second"] > 0 and r["inference_images_per_second"] > 0
        assert r["epoch_seconds_estimate"] == pytest.approx(50000 / r["train_images_per_second"])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and "torch" in saved


def test_bench_rejects_an_empty_list(capsys):
    assert main(["bench", "--models", ","]) == 2
    assert "--models needs at least one value" in capsys.readouterr().err
