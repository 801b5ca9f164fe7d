"""The `isoconv ablate` and `isoconv report` subcommands (registered by isoconv.cli)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

from ..config import CONFIG_KEYS, SETTINGS, add_setting_flags, check_value, setting_tokens, settings_from_args, suggest
from ..errors import ConfigError, Interrupted, UserError
from ..lazy import lazy_function
from ..rundir import check_output_folder
from .launchers import DEFAULT_TIME_MIN, LAUNCHERS, LaunchOptions, parse_time
from .spec import ABLATE_FLAGS, load_spec
from .tune_spec import load_tune_spec

# Imported when a sweep, study or report runs: `isoconv --help` loads no torch (tests/test_startup.py)
default_sweep_dir = lazy_function("isoconv.experiments.ablate", "default_sweep_dir")
format_command = lazy_function("isoconv.experiments.ablate", "format_command")
run_ablation = lazy_function("isoconv.experiments.ablate", "run_ablation")
write_report = lazy_function("isoconv.experiments.report", "write_report")
default_study_dir = lazy_function("isoconv.experiments.tune", "default_study_dir")
run_study = lazy_function("isoconv.experiments.tune", "run_study")
summary_line = lazy_function("isoconv.experiments.tune", "summary_line")

# Settings `isoconv tune` has a flag for (the rest are given as --set KEY=VALUE).
TUNE_FLAGS = ("data_dir", "download", "device", "amp", "track", "tracking_uri", "val_split")


def add_experiment_parsers(sub) -> None:
    p = sub.add_parser("ablate", help="run an ablation spec (grid or list of variants) x seeds, resumably; "
                       "writes results.md/csv, plots and report.md")
    p.add_argument("spec", metavar="SPEC", help="shipped spec name (a wrong name lists them) or a YAML file")
    p.add_argument("--seeds", type=int, help="repetitions per variant (default: the spec's, else 1); "
                   "repetition k uses seed + k")
    p.add_argument("--parallel", type=int, default=1, help="runs at once, each in its own process with "
                   "cores/N threads (default 1)")
    p.add_argument("--out", help="sweep directory (default ablations/<spec name>)")
    add_setting_flags(p, ABLATE_FLAGS)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting for every variant (YAML value), e.g. --set epochs=2; repeatable")
    p.add_argument("--variants", metavar="NAME[,NAME]", help="train only these variants now (comma-separated; "
                   "the results still list all)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, train nothing")
    add_launcher_flags(p)

    p = sub.add_parser("tune", help="search settings with Optuna (trials scored on a held-out validation split, "
                       "pruned early, resumable); writes best.yaml, results, plots and the retrained best's test "
                       "figures")
    p.add_argument("spec", metavar="SPEC", help="tuning spec: a YAML file (base recipe, space, trials, pruner) or a "
                   "shipped name")
    p.add_argument("--out", help="study folder (default tunes/<spec name>); rerun the same command to continue")
    p.add_argument("--trials", type=int, help="number of trials (default: the spec's)")
    p.add_argument("--storage", metavar="URL", help="Optuna RDB storage shared by several processes or machines, "
                   "e.g. sqlite:///study.db or postgresql://... (default: a journal file in the study folder)")
    p.add_argument("--study", metavar="NAME", help="study name in the storage (default: the spec's name)")
    p.add_argument("--parallel", type=int, default=1, help="workers at once, each in its own process with "
                   "cores/N threads (default 1)")
    p.add_argument("--no-retrain", action="store_true", help="do not retrain the best configuration on the whole "
                   "training set (the test set is then never read)")
    add_setting_flags(p, TUNE_FLAGS)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting for every trial (YAML value), e.g. --set epochs=2; repeatable")
    add_launcher_flags(p)

    p = sub.add_parser("report", help="(re)generate plots and report.md for a run or sweep directory")
    p.add_argument("target", metavar="RUN_OR_SWEEP_DIR")


def add_launcher_flags(p) -> None:
    g = p.add_argument_group("launcher (where the runs train)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="local", help="local: this machine (--parallel); "
                   "ray: one Ray task per run; slurm: one Slurm job array (submitit) (default local)")
    g.add_argument("--gpus-per-run", type=float, metavar="N", help="ray/slurm: GPUs per run (default 0)")
    g.add_argument("--cpus-per-run", type=int, metavar="N", help="ray/slurm: CPUs per run, also its torch "
                   "threads (default 1)")
    g.add_argument("--retries", type=int, metavar="N", help="ray: retries of a run whose process or node died "
                   "or that was stopped by SIGTERM; it resumes from its checkpoint (default 3)")
    g.add_argument("--ray-address", metavar="ADDR", help="ray: the cluster to use (e.g. auto, or "
                   "ray://HEAD:10001; default: start a local Ray instance)")
    g.add_argument("--partition", help="slurm: partition")
    g.add_argument("--time", metavar="MIN|[D-]HH:MM:SS", help=f"slurm: wall time per run (default "
                   f"{DEFAULT_TIME_MIN // 60} h); a run still going is requeued and resumes from its checkpoint")
    g.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="slurm: any other #SBATCH option, e.g. account=proj, qos=high, mem=16G; repeatable")



def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in CONFIG_KEYS:
            raise ConfigError(f"unknown setting {key!r} in --set {item}{suggest(key, CONFIG_KEYS)}")
        if key == "out":
            raise ConfigError("--set out=... is not a run setting here; pass --out DIR for the sweep folder")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise UserError(f"--set {item}: {value!r} is not a valid value") from None
        try:
            if out[key] is not None:  # `KEY=` leaves the setting to the spec
                check_value(SETTINGS[key], out[key])
        except ConfigError as e:
            raise ConfigError(f"--set {item}: {e}") from None
    return out


def cmd_ablate(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    # ablate's --out is the sweep folder, not a run setting
    overrides = {k: v for k, v in settings_from_args(args).items() if v is not None and k != "out"}
    overrides.update(parse_set(args.set))
    seeds = args.seeds if args.seeds is not None else spec.seeds
    out = Path(check_output_folder(args.out, "--out", "sweep folder")) if args.out is not None else \
        default_sweep_dir(spec)
    only = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    launch, launch_args = launch_options(args)
    command = format_command(args.spec, seeds=seeds, parallel=args.parallel, out=out, overrides=overrides,
                             only=only, launch_args=launch_args)
    try:
        run_ablation(spec, out=out, seeds=seeds, parallel=args.parallel, overrides=overrides, command=command,
                     dry_run=args.dry_run, only=only, launcher=args.launcher, launch=launch)
    except KeyboardInterrupt:
        return interrupted(command, 130)
    except Interrupted as e:
        return interrupted(command, e.exit_code)
    return 0


LAUNCH_FLAGS = {"gpus_per_run": ("ray", "slurm"), "cpus_per_run": ("ray", "slurm"), "retries": ("ray",),
                "ray_address": ("ray",), "partition": ("slurm",), "time": ("slurm",), "slurm_param": ("slurm",)}


def launch_options(args: argparse.Namespace) -> tuple[LaunchOptions, tuple[str, ...]]:
    """The launcher's options from the flags, and the tokens that repeat them in the sweep's command line."""
    tokens: list[str] = [] if args.launcher == "local" else ["--launcher", args.launcher]
    for name, launchers in LAUNCH_FLAGS.items():
        value = getattr(args, name)
        if value is None or value == []:
            continue
        flag = "--" + name.replace("_", "-")
        if args.launcher not in launchers:
            raise UserError(f"{flag} is for --launcher {' or '.join(launchers)}, not {args.launcher}")
        for item in value if isinstance(value, list) else [value]:
            tokens += [flag, f"{item:g}" if isinstance(item, float) else str(item)]
    options = LaunchOptions(ray_address=args.ray_address, partition=args.partition,
                            slurm_params=parse_pairs(args.slurm_param, "--slurm-param"))
    for name in ("gpus_per_run", "cpus_per_run", "retries"):
        if getattr(args, name) is not None:
            setattr(options, name, getattr(args, name))
    if args.time is not None:
        options.time_min = parse_time(args.time)
    return options, tuple(tokens)


def parse_pairs(items: list[str], flag: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def interrupted(command: str, code: int) -> int:
    print(f"isoconv: sweep interrupted; finished runs are kept and the interrupted one resumes when you rerun "
          f"`{command}`", file=sys.stderr)
    return code


def cmd_tune(args: argparse.Namespace) -> int:
    """Everything is checked (spec, flags, output folder) before the study folder is created."""
    spec = load_tune_spec(args.spec)
    overrides = {k: v for k, v in settings_from_args(args).items() if v is not None and k != "out"}
    overrides.update(parse_set(args.set))
    for key in ("out", "val_split"):
        if key in parse_set(args.set):
            raise ConfigError(f"--set {key}=... is not a trial setting; pass --{key.replace('_', '-')}")
    if "val_split" in overrides:
        if spec.on_test:
            raise ConfigError(f"--val-split {overrides['val_split']} and `objective: test_top1` in {spec.path} "
                              f"contradict each other; drop one")
        spec.val_split = overrides.pop("val_split")
    if args.trials is not None:
        if args.trials < 1:
            raise UserError(f"--trials must be at least 1, got {args.trials}")
        spec.trials = args.trials
    if args.storage is not None and "://" not in args.storage:
        raise UserError(f"--storage {args.storage!r} is not a database URL; pass e.g. sqlite:///study.db, or drop "
                        f"--storage to keep the study in a journal file in the study folder")
    for point in spec.space:  # a command-line override of a tuned setting would silently fix it
        if point in overrides:
            raise ConfigError(f"{point} is tuned by {spec.path} (its `space`); drop it from the command line")
    out = Path(check_output_folder(args.out, "--out", "study folder")) if args.out is not None else \
        default_study_dir(spec)
    launch, launch_args = launch_options(args)
    parts = ["isoconv", "tune", args.spec, "--out", str(out)]
    for flag, value in (("--trials", args.trials), ("--storage", args.storage), ("--study", args.study),
                        ("--parallel", args.parallel if args.parallel != 1 else None),
                        ("--val-split", None if spec.on_test or "val_split" not in settings_from_args(args) or
                         settings_from_args(args)["val_split"] is None else spec.val_split)):
        parts += [flag, str(value)] if value is not None else []
    parts += ["--no-retrain"] if args.no_retrain else []
    for key, value in overrides.items():
        parts += setting_tokens(key, value, has_flag=lambda name: name in TUNE_FLAGS)
    command = shlex.join(parts + list(launch_args))
    try:
        summary = run_study(spec, out=out, storage=args.storage, study_name=args.study, overrides=overrides,
                            parallel=args.parallel, launcher=args.launcher, launch=launch,
                            retrain=not args.no_retrain, command=command)
    except KeyboardInterrupt:
        return tune_interrupted(command, 130)
    except Interrupted as e:
        return tune_interrupted(command, e.exit_code)
    print(tune_report(summary, out))
    return 0


def tune_report(summary: dict, out: Path) -> str:
    """The closing lines of `isoconv tune`: counts, pruning savings, the best point and its test figure."""
    lines = [f"study {out}: {summary['finished']} of {summary['requested']} trials; {summary_line(summary)}",
             f"trials were scored on {summary['split']}"]
    best = summary["best"]
    if best is None:
        lines.append("no trial completed; nothing to retrain (see results.md)")
        return "\n".join(lines)
    point = ", ".join(f"{n}={best[n]:.4g}" if isinstance(best[n], float) else f"{n}={best[n]}"
                      for n in summary["params"])
    lines.append(f"best: trial {best['trial']} ({point}), {summary['scored_on']} top-1 "
                 f"{best['top1']:.4f}; recipe {out / 'best.yaml'}")
    retrained = summary.get("retrained")
    if retrained:
        note = ("the trials were scored on the test set too, so this figure is optimistic" if
                summary["scored_on"] == "test" else "the test set was read once, after tuning")
        lines.append(f"retrained on the whole training set: test top-1 {retrained['test_top1']:.4f} ({note}); "
                     f"run folder {retrained['run_dir']}")
    lines.append(f"results: {out / 'results.md'}, plots in {out / 'plots'}")
    return "\n".join(lines)


def tune_interrupted(command: str, code: int) -> int:
    print(f"isoconv: study interrupted; finished trials are kept and the interrupted one resumes when you rerun "
          f"`{command}`", file=sys.stderr)
    return code


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(Path(args.target), command=f"isoconv report {args.target}")
    print(f"wrote {path} and its plots in {path.parent / 'plots'}")
    return 0
