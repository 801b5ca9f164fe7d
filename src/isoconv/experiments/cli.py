"""The `isoconv ablate` and `isoconv report` subcommands (registered by isoconv.cli)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ..config import CONFIG_KEYS, add_setting_flags, settings_from_args, suggest
from ..errors import ConfigError, Interrupted, UserError
from ..rundir import check_output_folder
from .ablate import ABLATE_FLAGS, default_sweep_dir, format_command, run_ablation
from .report import write_report
from .spec import load_spec


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
    return out


def cmd_ablate(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    overrides = {k: v for k, v in settings_from_args(args).items() if v is not None}
    overrides.update(parse_set(args.set))
    seeds = args.seeds if args.seeds is not None else spec.seeds
    out = Path(check_output_folder(args.out, "--out", "sweep folder")) if args.out is not None else \
        default_sweep_dir(spec)
    only = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    command = format_command(args.spec, seeds=seeds, parallel=args.parallel, out=out, overrides=overrides,
                             only=only)
    try:
        run_ablation(spec, out=out, seeds=seeds, parallel=args.parallel, overrides=overrides, command=command,
                     dry_run=args.dry_run, only=only)
    except KeyboardInterrupt:
        return interrupted(command, 130)
    except Interrupted as e:
        return interrupted(command, e.exit_code)
    return 0


def interrupted(command: str, code: int) -> int:
    print(f"isoconv: sweep interrupted; finished runs are kept and the interrupted one resumes when you rerun "
          f"`{command}`", file=sys.stderr)
    return code


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(Path(args.target), command=f"isoconv report {args.target}")
    print(f"wrote {path} and its plots in {path.parent / 'plots'}")
    return 0
