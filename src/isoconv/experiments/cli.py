"""The `isoconv ablate` and `isoconv report` subcommands (registered by isoconv.cli)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ..config import CONFIG_KEYS, SETTINGS, add_setting_flags, check_value, settings_from_args, suggest
from ..errors import ConfigError, Interrupted, UserError
from ..lazy import lazy_function
from ..rundir import check_output_folder
from .launchers import DEFAULT_TIME_MIN, LAUNCHERS, LaunchOptions, parse_time
from .spec import ABLATE_FLAGS, load_spec

# Imported when a sweep or report runs: `isoconv --help` loads no torch (tests/test_startup.py)
default_sweep_dir = lazy_function("isoconv.experiments.ablate", "default_sweep_dir")
format_command = lazy_function("isoconv.experiments.ablate", "format_command")
run_ablation = lazy_function("isoconv.experiments.ablate", "run_ablation")
write_report = lazy_function("isoconv.experiments.report", "write_report")


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

    p = sub.add_parser("report", help="(re)generate plots and report.md for a run or sweep directory")
    p.add_argument("target", metavar="RUN_OR_SWEEP_DIR")


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


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(Path(args.target), command=f"isoconv report {args.target}")
    print(f"wrote {path} and its plots in {path.parent / 'plots'}")
    return 0
