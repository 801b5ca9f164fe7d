"""How long `isoconv` takes to answer: the median wall time of N runs of each command, in fresh processes, beside the
bare interpreter (`python -c pass`), `import yaml` and `import torch` on the same machine.

    python scripts/bench-startup.py                                  # this checkout's src/
    python scripts/bench-startup.py --tree before=/tmp/old/src --tree after=src --runs 5

With several --tree the runs alternate (command by command, tree by tree), so a neighbour's load falls on every
tree alike. "first training step" is `isoconv train --recipe cpu-quick` up to the moment its first optimisation step
is called (the process exits there), with warm caches: one untimed run per tree fills the decoded-data, checksum,
--amp auto and kernel caches first (in a temporary $ISOCONV_CACHE). It needs CIFAR-10 in --data-dir.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "bench-startup: first step"

# Calls isoconv's CLI with the first optimisation step replaced by an exit: the time to reach training.
FIRST_STEP = f"""
import os, sys
import isoconv.train.step as step
def first_step(self, *args, **kwargs):
    print({MARK!r}, flush=True)
    os._exit(0)
step.TrainStep.__call__ = first_step
from isoconv.cli import main
sys.exit(main(sys.argv[1:]))
"""


def commands(data_dir: str, out: str) -> dict[str, list[str]]:
    py = [sys.executable]
    return {
        "python -c pass": py + ["-c", "pass"],
        "python -c 'import yaml'": py + ["-c", "import yaml"],
        "python -c 'import torch'": py + ["-c", "import torch"],
        # torch.optim's optimizers import torch._dynamo when the first one is built (torch/_compile.py)
        "python -c 'import torch._dynamo'": py + ["-c", "import torch._dynamo"],
        "isoconv --help": py + ["-m", "isoconv", "--help"],
        "isoconv train --help": py + ["-m", "isoconv", "train", "--help"],
        "isoconv recipes": py + ["-m", "isoconv", "recipes"],
        "isoconv models": py + ["-m", "isoconv", "models"],
        "first training step (cpu-quick)": py + ["-c", FIRST_STEP, "train", "--recipe", "cpu-quick", "--data-dir",
                                                 data_dir, "--no-download", "--out", out],
    }


def run_once(argv: list[str], src: str, cache: str, out: str) -> float:
    env = {**os.environ, "PYTHONPATH": src, "ISOCONV_CACHE": cache}
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or ("-c" in argv and "train" in argv and MARK not in done.stdout):
        raise SystemExit(f"{' '.join(argv[:4])} failed ({done.returncode}) with PYTHONPATH={src}:\n"
                         f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    if Path(out).exists():  # the interrupted run's folder
        subprocess.run(["rm", "-rf", out], check=True)
    return seconds


def machine() -> dict:
    info = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info.setdefault("cpu", value.strip())
            if key.strip() == "flags":
                info.setdefault("cpu_flags", value.split())
    except OSError:
        pass
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", metavar="LABEL=SRC", help="a source folder to time (repeatable; "
                        "default: this checkout's src)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data-dir", default=os.environ.get("ISOCONV_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--only", help="comma-separated words: time only the commands whose name holds one")
    parser.add_argument("--json", metavar="PATH", help="also write every time as JSON")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree) if args.tree else {"this": str(REPO / "src")}
    trees = {label: str(Path(src).resolve()) for label, src in trees.items()}

    info = machine()
    print(f"CPU: {info.get('cpu', '?')}, {info['cpus']} cores; load average {info['load_average']}; "
          f"Python {info['python']}")
    print(f"CPU flags: {' '.join(info.get('cpu_flags', []))}")
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        out = str(Path(tmp) / "run")
        todo = commands(args.data_dir, out)
        if args.only:
            words = [w.strip() for w in args.only.split(",") if w.strip()]
            todo = {name: argv for name, argv in todo.items() if any(w in name for w in words)}
        caches = {label: str(Path(tmp) / f"cache-{i}") for i, label in enumerate(trees)}
        for label, src in trees.items():  # warm caches: page cache, decoded data, --amp auto, C kernels
            for name, argv in todo.items():
                run_once(argv, src, caches[label], out)
        times: dict = {name: {label: [] for label in trees} for name in todo}
        for r in range(args.runs):
            for name, argv in todo.items():
                for label, src in trees.items():
                    times[name][label].append(run_once(argv, src, caches[label], out))
            table(times, trees, f"median of {r + 1} runs")  # so far (on stderr), in case the rest is cut short
            if args.json:
                Path(args.json).write_text(json.dumps({"machine": info, "trees": trees, "runs": r + 1,
                                                       "seconds": times}, indent=2))
    print(f"\nmedian of {args.runs} runs, seconds (load average now {os.getloadavg()})")
    table(times, trees, file=sys.stdout)
    return 0


def table(times: dict, trees: dict, title: str = "", file=sys.stderr) -> None:
    width = max(len(n) for n in times)
    if title:
        print(title, file=file)
    print(f"{'command':<{width}}  " + "  ".join(f"{label:>10}" for label in trees), file=file)
    for name in times:
        print(f"{name:<{width}}  " + "  ".join(f"{statistics.median(times[name][label]):>10.2f}" for label in trees),
              file=file, flush=True)


if __name__ == "__main__":
    sys.exit(main())
