"""Measure what the JPEG degradation of the shared CIFAR-10 copy costs in top-1: a 2 x 2 table, 3 seeds per cell.

    python3 scripts/jpeg-penalty.py --data-dir ../shared/data [--out runs/jpeg-penalty] [--epochs 15]
                                    [--seeds 0,1,2]

Trains the `cpu-quick` recipe (with --epochs, in fp32) on official CIFAR-10 train images 0-3999, once from their
lossless pixels (`--dataset cifar10-lossless`) and once from the JPEG pixels of the same images (`--dataset cifar10
--train-subset 4000`), and evaluates every model on the lossless and on the JPEG version of test images 0-999
(`isoconv eval RUN --dataset cifar10-lossless` / `--dataset cifar10 --test-subset 1000`). Both datasets share labels,
order, class names and CIFAR-10's normalization constants, so the pixels are the only difference. Every step is an
ordinary isoconv command (printed as it runs); finished runs and evaluations are reused when the script is run again.
Writes OUT/jpeg-penalty.json and OUT/jpeg-penalty.md (the table, mean ± sample std over seeds).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

TRAIN_ARMS = {"lossless": ["--dataset", "cifar10-lossless"],
              "jpeg": ["--dataset", "cifar10", "--train-subset", "4000", "--test-subset", "1000"]}
TEST_SETS = {"lossless": ["--dataset", "cifar10-lossless"], "jpeg": ["--dataset", "cifar10", "--test-subset", "1000"]}


def isoconv(*args: str) -> None:
    command = [sys.executable, "-m", "isoconv", *args]
    print("$ isoconv " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def train(out: Path, arm: str, seed: int, epochs: int, data_dir: str) -> Path:
    run = out / f"train-{arm}" / f"seed{seed}"
    if not (run / "summary.json").is_file():
        isoconv("train", "--recipe", "cpu-quick", "--epochs", str(epochs), "--amp", "off", "--seed", str(seed),
                "--data-dir", data_dir, *TRAIN_ARMS[arm], "--out", str(run))
    return run


def evaluate(run: Path, test: str, data_dir: str) -> float:
    report = run / f"eval-{test}.json"
    if not report.is_file():
        isoconv("eval", str(run), "--data-dir", data_dir, *TEST_SETS[test], "--json", str(report))
    result = json.loads(report.read_text())
    assert result["test_images"] == 1000, result["test_images"]
    return float(result["test_top1"])


def cell(values: list) -> str:
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py and the lossless .npz")
    ap.add_argument("--out", default="runs/jpeg-penalty")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    out, seeds = Path(args.out), [int(s) for s in args.seeds.split(",")]
    top1 = {arm: {test: [] for test in TEST_SETS} for arm in TRAIN_ARMS}
    for seed in seeds:
        for arm in TRAIN_ARMS:
            run = train(out, arm, seed, args.epochs, args.data_dir)
            for test in TEST_SETS:
                top1[arm][test].append(evaluate(run, test, args.data_dir))
    command = f"python3 scripts/jpeg-penalty.py --data-dir DATA --epochs {args.epochs} --seeds {args.seeds}"
    penalty = [lj - jj for lj, jj in zip(top1["lossless"]["lossless"], top1["jpeg"]["jpeg"])]
    lines = [f"Top-1 (%) on test images 0-999, mean ± std over seeds {args.seeds}; `cpu-quick` recipe in fp32, "
             f"{args.epochs} epochs on train images 0-3999. Command: `{command}`.", "",
             "| trained on \\ tested on | lossless test | JPEG test |", "|---|---|---|"]
    lines += [f"| {arm} train | {cell(top1[arm]['lossless'])} | {cell(top1[arm]['jpeg'])} |" for arm in TRAIN_ARMS]
    lines += ["", f"JPEG penalty, all-lossless minus all-JPEG (paired by seed): {cell(penalty)} pt"]
    text = "\n".join(lines)
    print(text)
    (out / "jpeg-penalty.md").write_text(text + "\n")
    (out / "jpeg-penalty.json").write_text(json.dumps(
        {"top1": top1, "penalty_pt": [100 * p for p in penalty], "epochs": args.epochs, "seeds": seeds,
         "command": command, "machine": platform.processor() or platform.machine()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
