"""The `isoconv` command line: models, recipes, train, eval, bench, ablate, report, predict, export, serve.

The training flags are generated from TrainConfig's field metadata (`isoconv.config.add_setting_flags`).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .config import (DATASET_CHOICES, RESUME_FREE_FIELDS, add_setting_flags, build_config, list_recipes, load_recipe,
                     settings_from_args)
from .errors import Interrupted, UserError
from .fileio import atomic_write, describe_file
from .experiments.cli import add_experiment_parsers, cmd_ablate, cmd_report, cmd_tune
from .experiments.published import figure_note, figures_text
from .fileio import DISK_FULL, folders_to_create, remove_empty_folders
from .formats import (CALIBRATION_IMAGES, DEFAULT_HOST, DEFAULT_PORT, EXPORT_FORMATS, FOLDER_FORMAT, MAX_UPLOAD_BYTES,
                      ONNX_EXPORTERS)
from .lazy import lazy_function, lazy_module
from .malloc_tuning import tune_allocator
from .models.presets import PRESETS, preset_params
from .rundir import RUNS_FOLDER, RunDir, check_output_file, check_output_folder, check_run_folder
from .zoo import zoo_entries

# Imported by the commands that use them: `isoconv --help`, `recipes` and `models` load no torch (tests/test_startup.py)
torch = lazy_module("torch")
ddp = lazy_module("isoconv.train.distributed")
export = lazy_module("isoconv.interop.export")
run_bench = lazy_function("isoconv.bench", "run_bench")
time_to_accuracy = lazy_function("isoconv.bench", "time_to_accuracy")
run_doctor = lazy_function("isoconv.doctor", "run_doctor")
evaluate_target = lazy_function("isoconv.eval.run", "evaluate_target")
publish_tracked = lazy_function("isoconv.experiments.tracking", "publish_tracked")
export_target = lazy_function("isoconv.interop.export", "export_target")
export_folder = lazy_function("isoconv.interop.model_folder", "export_folder")
serve = lazy_function("isoconv.interop.serve", "serve")
format_csv = lazy_function("isoconv.interop.predict", "format_csv")
format_json = lazy_function("isoconv.interop.predict", "format_json")
format_table = lazy_function("isoconv.interop.predict", "format_table")
predict_files = lazy_function("isoconv.interop.predict", "predict_files")
train = lazy_function("isoconv.train", "train")
check_resume_config = lazy_function("isoconv.train.loop", "check_resume_config")
config_file_edits = lazy_function("isoconv.train.loop", "config_file_edits")
load_latest_checkpoint = lazy_function("isoconv.weights", "load_latest_checkpoint")

CPU_RECIPE = "cpu-quick"
GPU_RECIPE = "convmixer-cifar10-25ep"


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad flag or value (`--epochs 2.5`) reported as isoconv reports every error: one line."""

    def error(self, message: str):
        self.exit(2, f"isoconv: error: {self.prog}: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="isoconv", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command")

    sub.add_parser("models", help="list model presets with parameter counts")
    sub.add_parser("recipes", help="list shipped recipes")
    sub.add_parser("zoo", help="list the trained models shipped with isoconv (usable offline by name)")

    p = sub.add_parser("train", help="train a model (no arguments: the default recipe for this hardware)")
    p.add_argument("--recipe", help="recipe name (see `isoconv recipes`) or a YAML file")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR where it stopped")
    add_setting_flags(p)

    p = sub.add_parser("eval", help="evaluate a run directory or checkpoint on the test set")
    p.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--data-dir")
    p.add_argument("--no-download", dest="download", action="store_false", default=True)
    p.add_argument("--test-subset", type=int)
    p.add_argument("--dataset", choices=DATASET_CHOICES,
                   help="evaluate on another dataset's whole test split with the same classes (default: the run's "
                   "own), e.g. cifar10-lossless for a cifar10 run")
    p.add_argument("--tta", choices=["flip"], help="test-time augmentation: average with the mirrored image")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON (same keys as summary.json)")
    add_overwrite_flag(p)
    p = sub.add_parser("bench", help="training and inference images/s side by side (models x loaders x "
                       "precisions), or time to accuracy")
    p.add_argument("--recipe", help="recipe whose settings are timed (default: the reference defaults); with "
                   "--time-to-accuracy the recipe trained (default: the one for this hardware)")
    p.add_argument("--models", help="comma-separated presets (default: --model, else the recipe's model)")
    p.add_argument("--amps", help="comma-separated precisions from: auto, bf16, fp16, off (default: --amp, "
                   "else off,bf16)")
    p.add_argument("--loaders", help="comma-separated loaders from: device, torchvision (default: --loader, "
                   "else both)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--windows", type=int, default=3, help="timed windows (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (they include compilation)")
    p.add_argument("--epoch-images", type=int, metavar="N", help="an epoch is the first N training images "
                   "(default: the whole training split)")
    p.add_argument("--full-epoch", action="store_true", help="also time one actual epoch per row (long on a CPU)")
    p.add_argument("--matmul-size", type=int, metavar="N", help="side of the square matmul timed for the "
                   "machine's GFLOP/s (default 1024 on a CPU, 8192 on a GPU)")
    p.add_argument("--time-to-accuracy", type=float, metavar="TOP1", help="train the recipe instead and report "
                   "when test top-1 first reached TOP1 (a fraction, e.g. 0.925)")
    p.add_argument("--profile", action="store_true", help="also print the top operators of a training step by "
                   "time share (torch.profiler), per row")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    add_overwrite_flag(p)
    add_setting_flags(p)  # --batch-size (default 128 without a recipe), --data-dir, --device, --compile, ...
    add_experiment_parsers(sub)  # ablate, report
    p = sub.add_parser("doctor", help="the environment, then a few training steps through every fast-path feature "
                       "(precisions, channels_last, compile, fused AdamW, device loader, DDP, checkpoints); exit 1 "
                       "when one that applies fails")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    add_overwrite_flag(p)
    p.add_argument("--skip", metavar="WORD[,WORD]", default="", help="do not run the checks whose name holds one of "
                   "these words (e.g. compile: compiling takes a minute on a CPU)")
    p = sub.add_parser("predict", help="top-k classes for image files (from a run or an exported model)")
    p.add_argument("target", metavar="RUN_DIR_OR_WEIGHTS", help="run directory, checkpoint, .safetensors, .onnx "
                   "or TorchScript file")
    p.add_argument("images", metavar="IMAGES", nargs="+", help="image files, folders (searched recursively) or "
                   "glob patterns")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tta", choices=["flip"], help="test-time augmentation: average with the mirrored image")
    p.add_argument("--device", default="auto")
    p.add_argument("--format", choices=PREDICT_FORMATS, help="what stdout shows: a table (default), JSON or CSV "
                   "(file,rank,class,index,probability)")
    p.add_argument("--json", metavar="PATH", nargs="?", const=DEPRECATED_SWITCH,
                   help="also write the predictions as JSON to PATH (as in eval and bench)")
    add_overwrite_flag(p)
    p.add_argument("--csv", action="store_true", help=argparse.SUPPRESS)  # old spelling of --format csv
    p = sub.add_parser("export", help="export a run's model as ONNX (fp32 or INT8), a torch.export program (pt2), "
                       "TorchScript (deprecated) or safetensors, config and preprocessing inside; or as a model "
                       "folder in the Hugging Face Hub layout")
    p.add_argument("target", metavar="RUN_DIR", help="finished run directory, checkpoint or isoconv .safetensors file")
    p.add_argument("--format", required=True, metavar="{" + ",".join(EXPORT_FORMATS) + "}",  # checked by export
                   help="onnx (torch.onnx dynamo exporter), pt2 (torch.export.save; torch.export.load runs it), "
                        "torchscript (deprecated: torch.jit is retired in favour of torch.export; use pt2), "
                        f"safetensors (weights + config), {FOLDER_FORMAT} (config.json, model.safetensors and a "
                        f"README.md model card, from a finished run)")
    p.add_argument("--output", metavar="FILE", help="output file (default: model.onnx, model.int8.onnx, model.pt2, "
                   f"model.torchscript.pt or model.safetensors next to the weights); the folder for --format "
                   f"{FOLDER_FORMAT} (default: RUN_DIR/hf-model)")
    p.add_argument("--out", dest="old_out", metavar="FILE", help=argparse.SUPPRESS)  # old spelling of --output
    add_overwrite_flag(p)
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="ONNX: fix the batch size to N (default: any batch size)")
    p.add_argument("--static-batch", action="store_true", help="ONNX: fix the batch size (to --batch-size, default 1)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="ONNX: any batch size (the default; kept for older command lines)")
    p.add_argument("--onnx-exporter", metavar="{" + ",".join(ONNX_EXPORTERS) + "}", default="dynamo",
                   help="ONNX: torch.onnx.export(dynamo=True) (default) or the legacy TorchScript-based exporter, "
                        "kept while torch ships it")
    p.add_argument("--int8", action="store_true", help="ONNX: static post-training INT8 quantization (onnxruntime "
                   "QDQ, per-channel weights) calibrated on training images of the run's dataset")
    p.add_argument("--quantize", choices=["int8"], help="same as --int8")
    p.add_argument("--data-dir", metavar="DIR", help="--int8: where the run's dataset is (default: the run's)")
    p.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES, metavar="N",
                   help=f"--int8: calibrate on the first N training images (default {CALIBRATION_IMAGES})")
    p = sub.add_parser("serve", help="a local web page to drop an image on and see the top-k classes (needs "
                       "pip install 'isoconv[serve]')")
    p.add_argument("target", metavar="MODEL", help="run directory, model folder, checkpoint, .safetensors, .onnx or "
                   "TorchScript file")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine "
                   f"only; 0.0.0.0 opens the page to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2 ** 20,
                   help="larger uploads are refused (HTTP 413)")
    return parser


def add_overwrite_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists (a run's own "
                   "files are never replaced)")


PREDICT_FORMATS = ("table", "json", "csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEPRECATED_SWITCH = "\0switch"  # `predict --json` without a path: the old spelling of --format json


def deprecated(old: str, new: str) -> None:
    print(f"isoconv: note: {old} is deprecated and will be removed; use {new}", file=sys.stderr)


BENCH_BATCH = 128  # without a recipe: a batch every machine fits


def cmd_bench(args) -> int:
    def split(value, flag):
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:
            raise UserError(f"{flag} needs at least one value, got {value!r}")
        return items

    overrides = settings_from_args(args)
    json_path = Path(args.json) if args.json else None
    if args.json:
        check_output_file(args.json, "--json", overwrite=args.overwrite)
    if args.time_to_accuracy is not None:
        for flag, value in (("--models", args.models), ("--amps", args.amps), ("--loaders", args.loaders),
                            ("--epoch-images", args.epoch_images), ("--full-epoch", args.full_epoch or None)):
            if value is not None:
                raise UserError(f"{flag} is for throughput runs; with --time-to-accuracy use the train flags "
                                f"(--model, --amp, --loader, --train-subset)")
        recipe = args.recipe or (None if args.model else default_recipe())
        time_to_accuracy(build_config(recipe, **overrides), args.time_to_accuracy, json_path=json_path)
        return 0

    if args.batch_size is None and args.recipe is None:
        overrides["batch_size"] = BENCH_BATCH
    if args.epoch_images is not None:
        overrides["train_subset"] = args.epoch_images
    if args.test_subset is None:  # throughput runs never evaluate: keep the test set's device copy small
        overrides["test_subset"] = overrides["batch_size"] or BENCH_BATCH
    cfg = build_config(args.recipe, **overrides)
    run_bench(cfg, models=split(args.models or cfg.model, "--models"),
              amps=split(args.amps or args.amp or "off,bf16", "--amps"),
              loaders=split(args.loaders or args.loader or "device,torchvision", "--loaders"),
              steps=args.steps, warmup=args.warmup, windows=args.windows, full_epoch=args.full_epoch,
              matmul_size=args.matmul_size, json_path=json_path, profile=args.profile)
    return 0


def cmd_doctor(args) -> int:
    if args.json:
        check_output_file(args.json, "--json", overwrite=args.overwrite)
    skip = [w.strip() for w in args.skip.split(",") if w.strip()]
    return run_doctor(args.device, Path(args.json) if args.json else None, skip)


def cmd_models(args) -> int:
    print(f"{'name':<24} {'family':<10} {'params':>12}  description")
    for name, preset in PRESETS.items():  # the closed-form count: no model is built, torch is not imported
        print(f"{name:<24} {preset.family:<10} {preset_params(name):>12,}  {preset.description}")
    print("\nshipped weights (`isoconv zoo`): " + (", ".join(e.name for e in zoo_entries()) or "none"))
    return 0


def cmd_zoo(args) -> int:
    """The trained models shipped in the package: `isoconv predict NAME IMAGE` and `isoconv.load(NAME)` use them."""
    print(f"{'name':<24} {'model':<12} {'top-1':>7}  {'test images':>11}  trained on")
    for e in zoo_entries():
        print(f"{e.name:<24} {e.model:<12} {100 * e.test_top1:>6.2f}%  {e.test_images:>11,}  {e.data}")
    for e in zoo_entries():
        print(f"\n{e.name}: {e.description}\n  weights: {e.file} (sha256 {e.sha256[:16]}...), commit {e.commit}\n"
              f"  trained with: {e.command}")
    return 0


def cmd_recipes(args) -> int:
    """One line per shipped recipe; `published` is the seed's own figure as it gives it (`~`: about, `>`: more than;
    `paper`: the original paper's figure the seed compared itself with), not ours, and which evaluation it is
    (final weights, last or best scheduled evaluation)."""
    print(f"{'name':<28} {'model':<24} {'epochs':>6}  {'published':<54} description")
    for name in list_recipes():
        r = load_recipe(name)
        published = figures_text(r.get("published")) or ("— (no number published)" if r.get("published") else "—")
        published = " ".join(filter(None, [published, figure_note(r.get("published"))]))
        print(f"{name:<28} {r.get('model', 'cm-vanilla'):<24} {r.get('epochs', 25):>6}  {published:<54} "
              f"{' '.join(str(r.get('description', '')).split())}")
    return 0


def default_recipe() -> str:
    return GPU_RECIPE if torch.cuda.is_available() else CPU_RECIPE


@contextmanager
def same_on_every_process():
    """Checks whose outcome is the same in every torchrun process (settings, paths): a UserError raised inside is
    printed by rank 0 only (see main)."""
    try:
        yield
    except UserError as e:
        e.same_on_every_process = True
        raise


def cmd_train(args) -> int:
    overrides = settings_from_args(args)
    if overrides.get("out"):  # `--out=~/runs/a` reaches us unexpanded
        overrides["out"] = str(Path(overrides["out"]).expanduser())
    if args.resume:
        return resume_run(RunDir(args.resume), args, overrides)
    recipe = args.recipe
    if recipe is None and overrides["model"] is None:
        recipe = default_recipe()
        print(f"no --recipe or --model given: training the default recipe {recipe!r} for this hardware "
              f"(`isoconv recipes` lists the others)")
    with same_on_every_process():  # before any data is read
        cfg = build_config(recipe, **overrides)
        ddp.check_batch_divides(cfg.batch_size, ddp.world_from_env().world_size)
        out = RUNS_FOLDER if cfg.out is None else cfg.out
        check_output_folder(out)
        if cfg.out is not None:
            check_run_folder(out)
    created = folders_to_create(out)
    try:
        publish_tracked(train(cfg))  # --track: summary, plots, run folder
    except BaseException:
        remove_empty_folders(created)  # a failed run leaves neither its folder nor the ones made on the way
        raise
    return 0


def resume_run(run: RunDir, args, overrides: dict) -> int:
    """Continue a run from its checkpoint, or, when it was killed before writing one, start it again from the
    beginning with the settings it saved."""
    given = {k: v for k, v in overrides.items() if v is not None}
    log = logging.getLogger(__name__)
    if args.recipe:
        raise UserError("--resume continues a run with its stored config; drop --recipe")
    if given.get("out") is not None and Path(given["out"]).resolve() != run.path.resolve():
        raise UserError(f"--resume {run} continues the run in its own folder; drop --out {given['out']} (to continue "
                        f"it elsewhere, copy the folder there and resume the copy)")
    if not run.path.is_dir():
        raise UserError(f"--resume {run}: no such run directory; pass the folder a run wrote (it holds "
                        f"{run.checkpoint.name})")
    if not run.has_checkpoint():
        stored = run.read_config()
        if stored is None:
            raise UserError(f"--resume {run}: the folder holds no checkpoint and no config.yaml; start a new run")
        log.info(f"{run} was stopped before its first checkpoint: starting it again with its saved settings")
        publish_tracked(train(build_config(None, **{**stored, **given, "out": str(run)})))
        return 0
    finished = run.read_summary()
    if finished is not None:
        if set(given) - RESUME_FREE_FIELDS:  # flags that would change the run: say whether they differ
            stored = run.read_config() or load_latest_checkpoint(run.checkpoint)["config"]
            check_resume_config(run, stored, build_config(None, **{**stored, **given}))
        log.info(f"{run} is finished ({finished.get('epochs')} epoch{'' if finished.get('epochs') == 1 else 's'}, "
                 f"test top-1 {finished.get('test_top1', 0):.4f}); nothing to resume. `isoconv eval {run}` evaluates "
                 f"it again; train a new run to change its settings")
        return 0
    state = load_latest_checkpoint(run.checkpoint)
    edits = config_file_edits(run, state["config"])
    if edits:
        log.info(f"applying the edit of {run.config}: " + "; ".join(f"{k}: {state['config'][k]!r} -> {v!r}"
                                                                     for k, v in edits.items()))
    publish_tracked(train(build_config(None, **{**state["config"], **edits, **given}), resume=run.path,
                          resume_state=state))
    return 0


def cmd_eval(args) -> int:
    if args.json:
        check_output_file(args.json, "--json", overwrite=args.overwrite)
    report = evaluate_target(Path(args.target), data_dir=args.data_dir, download=args.download,
                             test_subset=args.test_subset, tta=args.tta, device=args.device, dataset=args.dataset)
    print(report["report_text"])
    print(f"test top-1 {report['test_top1']:.4f}  top-5 {report['test_top5']:.4f}  on {report['test_images']} images")
    if args.json:
        data = {k: v for k, v in report.items() if k != "report_text"}
        atomic_write(args.json, json.dumps(data, indent=2))
    return 0


def cmd_predict(args) -> int:
    fmt, json_path = args.format, args.json
    if json_path == DEPRECATED_SWITCH:  # `--json` alone: print JSON, as before
        deprecated("predict --json without a path", "--format json (or --json PATH to write a file)")
        json_path, fmt = None, fmt or "json"
    if args.csv:
        deprecated("predict --csv", "--format csv")
        if fmt not in (None, "csv"):
            raise UserError(f"--csv contradicts --format {fmt}: choose one")
        fmt = "csv"
    if json_path:
        kind = describe_file(json_path) if Path(json_path).is_file() else None
        if kind not in (None, "a text file", "an empty file") or Path(json_path).suffix.lower() in IMAGE_SUFFIXES:
            raise UserError(f"--json {json_path} would overwrite {kind or 'an image'} with the predictions; --json takes "
                            f"the JSON file to write (use --format json to print JSON)")
        check_output_file(json_path, "--json", overwrite=args.overwrite)
    result = predict_files(args.target, args.images, top_k=args.top_k, batch_size=args.batch_size,
                           tta_flip=args.tta == "flip", device=args.device)
    text = {"json": format_json, "csv": format_csv}.get(fmt or "table", format_table)(result)
    if json_path:
        atomic_write(json_path, format_json(result) + "\n")
    if text:
        print(text)
    return 1 if result.skipped else 0


def cmd_export(args) -> int:
    if args.format not in EXPORT_FORMATS:
        raise UserError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {args.format!r}")
    if args.format == FOLDER_FORMAT:
        return export_model_folder(args)
    fixed = args.static_batch or args.batch_size is not None
    if args.dynamic_batch and fixed:
        raise UserError("--dynamic-batch contradicts --static-batch/--batch-size: choose one")
    batch_size = (args.batch_size if args.batch_size is not None else 1) if fixed else None
    output = args.output
    if args.old_out is not None:
        deprecated("export --out", "--output FILE")
        if output is not None and output != args.old_out:
            raise UserError(f"--out {args.old_out} contradicts --output {output}: pass --output only")
        output = args.old_out
    int8 = args.int8 or args.quantize == "int8"
    result = export_target(args.target, args.format, output, batch_size=batch_size, exporter=args.onnx_exporter,
                           int8=int8, data_dir=args.data_dir, calibration_images=args.calibration_images,
                           overwrite=args.overwrite)
    if args.format == "torchscript":  # after the export: a failure stays one line
        deprecated("export --format torchscript (torch.jit)", "--format pt2 (torch.export)")
    batch = "any batch size" if result.dynamic_batch else f"batch size {result.batch_size}"
    what = f"{args.format}, INT8" if result.int8 else args.format
    check = "" if args.format == "safetensors" else f"; max abs diff vs PyTorch {result.max_abs_diff:.1e}"
    print(f"wrote {result.path} ({what}, {batch}{check}{' from quantization' if result.int8 else ''})")
    if result.max_abs_diff > export.MATCH_TOLERANCE and not result.int8:
        print(f"isoconv: warning: the exported model differs from PyTorch by {result.max_abs_diff:.2e} "
              f"(more than {export.MATCH_TOLERANCE}); please report this", file=sys.stderr)
    return 0


def export_model_folder(args) -> int:
    if args.batch_size is not None or args.static_batch or args.dynamic_batch or args.old_out is not None:
        raise UserError(f"--batch-size, --static-batch, --dynamic-batch and --out are for file formats; --format "
                        f"{FOLDER_FORMAT} takes --output DIR")
    result = export_folder(args.target, args.output)
    print(f"wrote {result.path} (config.json, model.safetensors, README.md; reloaded weights match the run, max abs "
          f"diff {result.max_abs_diff:.1e})")
    return 0


def cmd_serve(args) -> int:
    serve(args.target, host=args.host, port=args.port, top_k=args.top_k, device=args.device,
          max_upload_mb=args.max_upload_mb)
    return 0


COMMANDS = {"models": cmd_models, "recipes": cmd_recipes, "zoo": cmd_zoo, "train": cmd_train, "eval": cmd_eval,
            "bench": cmd_bench, "predict": cmd_predict, "export": cmd_export, "ablate": cmd_ablate,
            "report": cmd_report, "tune": cmd_tune, "doctor": cmd_doctor, "serve": cmd_serve}


class _Console(logging.Handler):
    """isoconv's log records as the CLI prints them: results (training rows, reports) on stdout; progress notes
    of the data layer as `isoconv: ...` and warnings as `isoconv: warning: ...` on stderr. The streams are looked
    up at each record, so a redirected sys.stdout is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                print(f"isoconv: warning: {message}", file=sys.stderr, flush=True)
            elif record.name.startswith("isoconv.data"):
                print(f"isoconv: {message}", file=sys.stderr, flush=True)
            else:
                print(message, flush=True)
        except BrokenPipeError:
            raise
        except Exception:
            self.handleError(record)


def configure_logging() -> None:
    logger = logging.getLogger("isoconv")
    logger.setLevel(logging.INFO)
    logger.handlers = [h for h in logger.handlers if not isinstance(h, _Console)] + [_Console()]


def main(argv: Optional[list[str]] = None) -> int:
    # Even kernels with padding="same" pad one more pixel on one side, exactly as timm and the paper's code do;
    # torch warns about the extra copy this costs on every forward pass, which users cannot act on.
    warnings.filterwarnings("ignore", message="Using padding='same' with even kernel lengths")
    tune_allocator()  # glibc returns and re-faults large buffers every training step otherwise (up to 2x slower)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    configure_logging()
    if getattr(signal.getsignal(signal.SIGINT), "__name__", "") == "_interrupted_while_starting":
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C is handled below
    try:
        try:
            return COMMANDS[args.command](args)
        finally:
            sys.stdout.flush()  # a closed pipe shows here at the latest, inside the handler below
    except BrokenPipeError:
        return closed_pipe()
    except Interrupted as e:  # a graceful stop on SIGINT/SIGTERM after a checkpoint: not an error
        print(f"isoconv: {e}", file=sys.stderr)
        return e.exit_code
    except UserError as e:
        if args.debug:
            raise
        rank = ddp.world_from_env().rank if getattr(e, "same_on_every_process", False) else 0
        if rank == 0:  # under torchrun every process found the same problem: rank 0 says it
            print(f"isoconv: error: {e}", file=sys.stderr, flush=True)
        else:  # let rank 0 print and exit first: torchrun then stops this process before it says the same again
            time.sleep(PEER_EXIT_DELAY_S)
            print(f"isoconv: error: (process {rank}) {e}", file=sys.stderr, flush=True)  # only this one saw it
        return 2
    except KeyboardInterrupt:
        print(f"isoconv: interrupted{interrupted_hint(args)}", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno in NOT_WRITABLE and e.filename and not args.debug:
            where = Path(e.filename).parent if Path(e.filename).name.startswith(".") else Path(e.filename)
            reason = "read-only file system" if e.errno == errno.EROFS else "permission denied"
            print(f"isoconv: error: cannot write {where} ({reason}); make it writable, or copy the run folder to a "
                  f"writable place and pass the copy", file=sys.stderr)
            return 2
        if e.errno not in DISK_FULL or args.debug:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        folder = getattr(args, "resume", None) or getattr(args, "out", None)
        resume = ((f" (the run continues from its last checkpoint with `isoconv train --resume {folder}`)" if folder
                   else " (the run continues from its last checkpoint with `isoconv train --resume` and its folder)")
                  if args.command == "train" else "")
        print(f"isoconv: error: no space left on the device{where}; free some space, then run the command again"
              f"{resume}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:  # a user problem with a known fix
        if args.debug:
            raise
        print("isoconv: error: out of memory; lower --batch-size", file=sys.stderr)
        return 2


PEER_EXIT_DELAY_S = 10.0
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def interrupted_hint(args) -> str:
    """What to run after Ctrl-C stopped a command before any training checkpoint (a stop inside training is an
    Interrupted, with its own message): only a resumed run has one to continue from."""
    if args.command == "train" and getattr(args, "resume", None):
        return f"; continue with `isoconv train --resume {args.resume}`"
    return ""


def closed_pipe() -> int:
    """stdout's reader went away (`isoconv models | head -1`): stop quietly, as Unix tools do. Python's recipe:
    point stdout at devnull so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
