"""The summary of `scripts/gpu-check.sh`: OUT/summary.json and OUT/summary.md from doctor.json, bench.json and
tta.json in OUT. Standard library only (importing torch again would cost seconds).

    python3 scripts/gpu_check_summary.py OUT DEVICE QUICK(0|1) STEPS_JSON
STEPS_JSON: {"doctor": {"exit_code": 0, "seconds": 12.3}, ...}. Exit code 0 when every step's was 0, else 1.
"""
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

MARKS = {"ok": "✔", "fail": "✗", "n/a": "-"}


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def doctor_section(doctor: Optional[dict]) -> list[str]:
    if not doctor:
        return ["no doctor.json was written"]
    env = doctor["environment"]
    memory = env.get("device_memory_gib")
    md = [f"- torch {env['torch']}, torchvision {env['torchvision']}, Python {env['python']}, CUDA {env['cuda']}",
          f"- device {env['device']}: {env['device_name']}" + (f", {memory:.1f} GiB" if memory else ""),
          "- CPU flags: " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in env["cpu_flags"].items()),
          f"- threads: {env['threads']} torch threads, {env['cpu_count']} CPUs; allocator: {env['allocator']}",
          f"- C++ compiler: {env['cxx_compiler'] or 'none on PATH'}; compile backend {env['compile_backend']}",
          "", "| feature | ok | detail |", "|---|---|---|"]
    return md + [f"| {c['name']} | {MARKS[c['status']]} | {c['detail']} |" for c in doctor["checks"]]


def throughput_section(bench: Optional[dict]) -> list[str]:
    if not bench:
        return ["no bench.json was written"]
    m = bench["machine"]
    md = [f"{m['device']} ({m['device_name']}), {m['matmul_size']}² matmul GFLOP/s: "
          + ", ".join(f"{p} {g:.0f}" for p, g in m["matmul_gflops"].items()), "",
          "| model | loader | amp | train img/s | infer img/s | epoch s (est.) | % matmul | x torchvision |",
          "|---|---|---|---|---|---|---|---|"]
    return md + [f"| {r['model']} | {r['loader']} | {r['amp']} | {fmt(r['train_images_per_second'], '.0f')} | "
                 f"{fmt(r['inference_images_per_second'], '.0f')} | {fmt(r['epoch_seconds_estimate'], '.1f')} | "
                 f"{fmt(r.get('train_fraction_of_matmul') and 100 * r['train_fraction_of_matmul'], '.1f')} | "
                 f"{fmt(r.get('speedup_vs_torchvision'), '.2f')} |" for r in bench["rows"]]


def tta_section(tta: Optional[dict]) -> list[str]:
    if not tta:
        return ["no tta.json was written"]
    reached = (f"reached {tta['threshold']:.2%} at epoch {tta['epoch']} after {tta['train_seconds']:.1f} s of "
               f"training ({fmt(tta['wall_seconds'], '.1f')} s wall)" if tta["reached"]
               else f"did not reach {tta['threshold']:.2%}")
    stop = (f"; stopped by the time budget ({tta['time_budget']:.0f} s) after {tta['epochs_done']} of "
            f"{tta['epochs']} epochs (resumable)" if tta.get("stopped_early") else "")
    return [f"- {tta['recipe']} ({tta['model']}, {tta['amp']}, batch {tta['batch_size']}, {tta['loader']} loader): "
            f"{reached}{stop}",
            f"- final test top-1 {fmt(tta['final_test_top1'], '.4f')}, {tta['total_train_seconds']:.1f} s of "
            f"training, {tta['total_wall_seconds']:.1f} s wall, compile {fmt(tta.get('compile_seconds'), '.1f')} s",
            f"- run folder {tta['run_dir']}"]


def summarize(out: Path, device: str, quick: bool, steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    doctor, bench, tta = (read_json(out / f"{name}.json") for name in ("doctor", "bench", "tta"))
    summary = {"device": device, "quick": quick, "ok": all(s.get("exit_code") == 0 for s in steps.values()),
               "steps": steps, "total_seconds": sum(s.get("seconds", 0) for s in steps.values()),
               "doctor": doctor, "throughput": bench,
               "time_to_accuracy": {k: v for k, v in tta.items() if k != "timeline"} if tta else None}
    md = [f"# GPU check ({device}{', quick' if quick else ''})", "",
          f"{'every step passed' if summary['ok'] else 'SOME STEPS FAILED'}; {summary['total_seconds']:.0f} s in all",
          "", "| step | exit code | seconds |", "|---|---|---|"]
    md += [f"| {name} | {s.get('exit_code')} | {s.get('seconds', 0):.0f} |" for name, s in steps.items()]
    md += ["", "## Doctor", "", *doctor_section(doctor), "", "## Throughput", "", *throughput_section(bench),
           "", "## Time to accuracy", "", *tta_section(tta)]
    write(out / "summary.json", json.dumps(summary, indent=2))
    write(out / "summary.md", "\n".join(md) + "\n")
    return summary


if __name__ == "__main__":
    out = Path(sys.argv[1])
    result = summarize(out, sys.argv[2], sys.argv[3] == "1", json.loads(sys.argv[4]))
    print((out / "summary.md").read_text(), end="")
    sys.exit(0 if result["ok"] else 1)
