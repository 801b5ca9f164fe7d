"""INT8 vs fp32 on the CPU for one finished run: top-1 on the test set and images/s at batch 1 and 64.

    python3 scripts/int8_compare.py RUN_DIR --data-dir /work/shared/data [--test-subset N] [--rounds 3]

Exports RUN_DIR's model as fp32 ONNX, INT8 ONNX (`isoconv export --int8`'s path) and pt2 into a temporary folder,
scores each and eager PyTorch on the test images (the run's own preprocessing), then times all of them at batch 1
and at batch 64, alternating the models round by round (the machine may be shared), and prints one JSON document.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from isoconv.config import TrainConfig, apply_overrides
from isoconv.data import load_data
from isoconv.interop.export import export_target
from isoconv.interop.load import OnnxModel, read_model
from isoconv.runtime import cpu_flags


def top1(model, images: torch.Tensor, labels: torch.Tensor, batch: int = 250) -> float:
    with torch.no_grad():
        preds = torch.cat([model(images[s:s + batch]).argmax(1) for s in range(0, len(images), batch)])
    return (preds == labels).float().mean().item()


def images_per_second(model, x: torch.Tensor, seconds: float) -> float:
    with torch.no_grad():
        model(x)  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += len(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="timing per model, batch size and round")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of torch and onnxruntime (default 1: "
                   "on a shared machine more threads than free cores measure contention)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # OnnxModel gives onnxruntime the same number
    run = Path(args.run)
    eager, meta = read_model(run, torch.device("cpu"))
    pre = meta.preprocessing
    cfg = apply_overrides(TrainConfig(), meta.config, "run")
    cfg = apply_overrides(cfg, {"data_dir": args.data_dir, "download": False, "test_subset": args.test_subset,
                                "pad_to": pre.pad_to}, "flags")
    _, test = load_data(cfg, torch.device("cpu"), train=False, norm=(pre.mean, pre.std))
    x = ((test.images.float() / 255) - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        fp32 = export_target(run, "onnx", Path(tmp) / "fp32.onnx")
        fp32_s = time.perf_counter() - t
        t = time.perf_counter()
        int8 = export_target(run, "onnx", Path(tmp) / "int8.onnx", int8=True, data_dir=args.data_dir)
        int8_s = time.perf_counter() - t
        pt2 = export_target(run, "pt2", Path(tmp) / "model.pt2")
        models = {"fp32 eager": eager, "fp32 ONNX": OnnxModel(fp32.path), "INT8 ONNX": OnnxModel(int8.path),
                  "pt2": read_model(pt2.path, torch.device("cpu"))[0]}
        result = {"run": str(run), "model": meta.config.get("model"), "test_images": len(x),
                  "threads": torch.get_num_threads(), "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c"))), "torch": torch.__version__,
                  "export_seconds": {"fp32 ONNX": round(fp32_s, 1), "INT8 ONNX": round(int8_s, 1)},
                  "max_abs_diff_vs_eager": {"fp32 ONNX": fp32.max_abs_diff, "INT8 ONNX": int8.max_abs_diff,
                                            "pt2": pt2.max_abs_diff},
                  "top1": {name: top1(m, x, test.labels) for name, m in models.items()}}
        speed = {name: {1: [], 64: []} for name in models}
        for _ in range(args.rounds):
            for bs in (1, 64):
                for name, m in models.items():  # alternating: every model once per round
                    speed[name][bs].append(images_per_second(m, x[:bs], args.seconds))
        result["images_per_second"] = {name: {f"batch {bs}": round(max(v), 1) for bs, v in s.items()}
                                       for name, s in speed.items()}
        result["images_per_second_all_rounds"] = {name: {f"batch {bs}": [round(r, 1) for r in v]
                                                         for bs, v in s.items()} for name, s in speed.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
