"""The `isoconv` command line: models, recipes, train, eval."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from .config import (AMP_CHOICES, DATASET_CHOICES, LABEL_TYPE_CHOICES, LOADER_CHOICES, SCHEDULE_CHOICES,
                     TEST_SPLIT_CHOICES, build_config, list_recipes, load_recipe)
from .errors import UserError

CPU_RECIPE = "cpu-quick"
GPU_RECIPE = "convmixer-cifar10-25ep"


def add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="model preset (see `isoconv models`)")
    g.add_argument("--activation", choices=["gelu", "relu", "silu", "leaky_relu"])
    g.add_argument("--dim", type=int)
    g.add_argument("--depth", type=int)
    g.add_argument("--patch", type=int, help="patch size")
    g.add_argument("--kernel", type=int, help="depthwise kernel size")
    g.add_argument("--skip-period", type=int, help="ConvMixer-XL inter-block skip groups (0 = none)")
    g.add_argument("--drop-path", type=float, help="ConvNeXt stochastic depth rate")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASET_CHOICES)
    g.add_argument("--data-dir", help="folder holding the dataset (cifar-10-batches-py, cifar-100-python, "
                   "tiny-imagenet-200; for --dataset folder the folder with train/ and val/); "
                   "default $ISOCONV_DATA or ~/.cache/isoconv")
    g.add_argument("--label-type", choices=LABEL_TYPE_CHOICES, help="CIFAR-100 fine (100) or coarse (20) labels")
    g.add_argument("--image-size", type=int, help="resize images to this size once at decode time")
    g.add_argument("--val-split", type=float, help="folder dataset without val/: hold out this fraction")
    g.add_argument("--skip-bad-images", action="store_const", const=True,
                   help="skip and count unreadable images instead of failing")
    g.add_argument("--test-split", choices=TEST_SPLIT_CHOICES, help="full test set or the seed's 5k half")
    g.add_argument("--no-download", dest="download", action="store_const", const=False,
                   help="fail instead of downloading missing data")
    g.add_argument("--train-subset", type=int, help="train on the first N training images")
    g.add_argument("--test-subset", type=int, help="evaluate on the first N test images")
    g.add_argument("--loader", choices=LOADER_CHOICES)
    g.add_argument("--workers", type=int, help="loader workers (torchvision loader)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr-max", type=float)
    g.add_argument("--schedule", choices=SCHEDULE_CHOICES)
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up (cosine schedule)")
    g.add_argument("--wd", type=float, help="AdamW weight decay")
    g.add_argument("--opt-eps", type=float, help="AdamW epsilon")
    g.add_argument("--clip-norm", type=float, help="clip the gradient norm to this value")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--pretrained", metavar="PATH", help="initial weights: an isoconv run/checkpoint, a timm or "
                   "original-layout state dict")

    g = p.add_argument_group("augmentation")
    g.add_argument("--no-aug", action="store_const", const=True, help="normalize only")
    g.add_argument("--scale", type=float, help="RandomResizedCrop lower scale bound (1 = no crop)")
    g.add_argument("--translate", type=int, help="random translation up to N pixels (RandomCrop with zero padding N)")
    g.add_argument("--no-hflip", dest="hflip", action="store_const", const=False)
    g.add_argument("--ra-n", type=int, help="RandAugment ops per image (0 = off)")
    g.add_argument("--ra-m", type=int, help="RandAugment magnitude, 0..30")
    g.add_argument("--jitter", type=float, help="ColorJitter brightness/contrast/saturation")
    g.add_argument("--reprob", type=float, help="RandomErasing probability")
    g.add_argument("--mixup", type=float, help="Mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, help="CutMix alpha (0 = off)")
    g.add_argument("--mix-prob", type=float, help="probability of mixing a batch")
    g.add_argument("--mix-switch-prob", type=float, help="probability of CutMix when both are on")

    g = p.add_argument_group("engine")
    g.add_argument("--amp", choices=AMP_CHOICES, help="autocast precision (auto: bf16 where the hardware has it)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_const", const=True, help="SyncBatchNorm under torchrun/DDP")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--eval-every", type=int, help="evaluate every N epochs (always after the last)")
    g.add_argument("--ckpt-every-steps", type=int, help="also checkpoint every N steps inside an epoch")
    g.add_argument("--skip-nonfinite", action="store_const", const=True,
                   help="skip (and count) steps whose loss is not finite instead of stopping")
    g.add_argument("--tensorboard", action="store_const", const=True, help="also log scalars for TensorBoard")
    g.add_argument("--out", help="run directory (default runs/<timestamp>-<model>)")


TRAIN_FIELDS = ("model", "activation", "dim", "depth", "patch", "kernel", "skip_period", "drop_path", "dataset",
                "data_dir", "download", "train_subset", "test_subset", "loader", "workers", "label_type",
                "image_size", "val_split", "skip_bad_images", "test_split", "epochs", "batch_size",
                "lr_max", "schedule", "warmup_epochs", "wd", "opt_eps", "clip_norm", "label_smoothing", "pretrained",
                "no_aug", "scale", "translate", "hflip", "ra_n", "ra_m", "jitter", "reprob", "mixup", "cutmix",
                "mix_prob", "mix_switch_prob", "amp", "channels_last", "compile", "sync_bn", "seed", "device",
                "eval_every", "ckpt_every_steps", "skip_nonfinite", "tensorboard", "out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isoconv", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command")

    sub.add_parser("models", help="list model presets with parameter counts")
    sub.add_parser("recipes", help="list shipped recipes")

    p = sub.add_parser("train", help="train a model (no arguments: the default recipe for this hardware)")
    p.add_argument("--recipe", help="recipe name (see `isoconv recipes`) or a YAML file")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR where it stopped")
    add_train_flags(p)

    p = sub.add_parser("eval", help="evaluate a run directory or checkpoint on the test set")
    p.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--data-dir")
    p.add_argument("--no-download", dest="download", action="store_false", default=True)
    p.add_argument("--test-subset", type=int)
    p.add_argument("--tta", choices=["flip"], help="test-time augmentation: average with the mirrored image")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON (same keys as summary.json)")
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
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    add_train_flags(p)  # --batch-size (default 128 without a recipe), --data-dir, --device, --compile, ...
    from .experiments.cli import add_experiment_parsers
    add_experiment_parsers(sub)  # ablate, report
    p = sub.add_parser("predict", help="top-k classes for image files (from a run or an exported model)")
    p.add_argument("target", metavar="RUN_DIR_OR_WEIGHTS", help="run directory, checkpoint, .safetensors, .onnx "
                   "or TorchScript file")
    p.add_argument("images", metavar="IMAGES", nargs="+", help="image files, folders (searched recursively) or "
                   "glob patterns")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tta", choices=["flip"], help="test-time augmentation: average with the mirrored image")
    p.add_argument("--device", default="auto")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fmt.add_argument("--csv", action="store_true", help="print CSV (file,rank,class,index,probability)")
    p = sub.add_parser("export", help="export a run's model as ONNX, TorchScript or safetensors (config inside)")
    p.add_argument("target", metavar="RUN_DIR", help="run directory, checkpoint or isoconv .safetensors file")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "safetensors"])
    p.add_argument("--out", metavar="FILE", help="output file (default: model.onnx, model.torchscript.pt or "
                   "model.safetensors next to the weights)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="ONNX: fix the batch size to N (default: any batch size)")
    p.add_argument("--static-batch", action="store_true", help="ONNX: fix the batch size (to --batch-size, default 1)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="ONNX: any batch size (the default; kept for older command lines)")
    return parser


def cmd_bench(args) -> int:
    from .bench import run_bench, time_to_accuracy

    def split(value, flag):
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:
            raise UserError(f"{flag} needs at least one value, got {value!r}")
        return items

    overrides = {f: getattr(args, f) for f in TRAIN_FIELDS}
    json_path = Path(args.json) if args.json else None
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
        overrides["batch_size"] = 128
    if args.epoch_images is not None:
        overrides["train_subset"] = args.epoch_images
    if args.test_subset is None:  # the test set is not used; keep its copy small
        overrides["test_subset"] = overrides["batch_size"] or 128
    cfg = build_config(args.recipe, **overrides)
    run_bench(cfg, models=split(args.models or cfg.model, "--models"),
              amps=split(args.amps or args.amp or "off,bf16", "--amps"),
              loaders=split(args.loaders or args.loader or "device,torchvision", "--loaders"),
              steps=args.steps, warmup=args.warmup, windows=args.windows, full_epoch=args.full_epoch,
              matmul_size=args.matmul_size, json_path=json_path)
    return 0


def cmd_models(args) -> int:
    from .models import list_models, model_info

    print(f"{'name':<24} {'family':<10} {'params':>12}  description")
    for name in list_models():
        info = model_info(name)
        print(f"{name:<24} {info['family']:<10} {info['params']:>12,}  {info['description']}")
    return 0


def cmd_recipes(args) -> int:
    print(f"{'name':<28} {'model':<24} {'epochs':>6}  description")
    for name in list_recipes():
        r = load_recipe(name)
        print(f"{name:<28} {r.get('model', 'cm-vanilla'):<24} {r.get('epochs', 25):>6}  {r.get('description', '')}")
    return 0


def default_recipe() -> str:
    import torch

    return GPU_RECIPE if torch.cuda.is_available() else CPU_RECIPE


def cmd_train(args) -> int:
    from .train.checkpoint import load_latest_checkpoint
    from .train.loop import train

    overrides = {f: getattr(args, f) for f in TRAIN_FIELDS}
    if args.resume:
        if args.recipe:
            raise UserError("--resume continues a run with its stored config; drop --recipe")
        if not Path(args.resume).is_dir():
            raise UserError(f"--resume {args.resume}: no such run directory; pass the folder a run wrote "
                            f"(it holds last.pt)")
        state = load_latest_checkpoint(Path(args.resume) / "last.pt")
        cfg = build_config(None, **{**state["config"], **{k: v for k, v in overrides.items() if v is not None}})
        train(cfg, resume=Path(args.resume), resume_state=state)
        return 0
    recipe = args.recipe
    if recipe is None and overrides["model"] is None:
        recipe = default_recipe()
        print(f"no --recipe or --model given: training the default recipe {recipe!r} for this hardware "
              f"(`isoconv recipes` lists the others)")
    train(build_config(recipe, **overrides))
    return 0


def cmd_eval(args) -> int:
    from .eval.run import evaluate_target

    report = evaluate_target(Path(args.target), data_dir=args.data_dir, download=args.download,
                             test_subset=args.test_subset, tta=args.tta, device=args.device)
    print(report["report_text"])
    print(f"test top-1 {report['test_top1']:.4f}  top-5 {report['test_top5']:.4f}  on {report['test_images']} images")
    if args.json:
        data = {k: v for k, v in report.items() if k != "report_text"}
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


def cmd_predict(args) -> int:
    from .interop.predict import format_csv, format_json, format_table, predict_files

    result = predict_files(args.target, args.images, top_k=args.top_k, batch_size=args.batch_size,
                           tta_flip=args.tta == "flip", device=args.device)
    text = format_json(result) if args.json else format_csv(result) if args.csv else format_table(result)
    if text:
        print(text)
    return 1 if result.skipped else 0


def cmd_export(args) -> int:
    from .interop.export import MATCH_TOLERANCE, export_target

    fixed = args.static_batch or args.batch_size is not None
    if args.dynamic_batch and fixed:
        raise UserError("--dynamic-batch contradicts --static-batch/--batch-size: choose one")
    batch_size = (args.batch_size if args.batch_size is not None else 1) if fixed else None
    result = export_target(args.target, args.format, args.out, batch_size=batch_size)
    batch = "any batch size" if result.dynamic_batch else f"batch size {result.batch_size}"
    check = "" if args.format == "safetensors" else f"; max abs diff vs PyTorch {result.max_abs_diff:.1e}"
    print(f"wrote {result.path} ({args.format}, {batch}{check})")
    if result.max_abs_diff > MATCH_TOLERANCE:
        print(f"isoconv: warning: the exported model differs from PyTorch by {result.max_abs_diff:.2e} "
              f"(more than {MATCH_TOLERANCE}); please report this", file=sys.stderr)
    return 0


def cmd_ablate(args) -> int:
    from .experiments.cli import cmd_ablate as run

    return run(args)


def cmd_report(args) -> int:
    from .experiments.cli import cmd_report as run

    return run(args)


COMMANDS = {"models": cmd_models, "recipes": cmd_recipes, "train": cmd_train, "eval": cmd_eval, "bench": cmd_bench,
            "predict": cmd_predict, "export": cmd_export, "ablate": cmd_ablate, "report": cmd_report}


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        if hasattr(e, "exit_code"):  # a graceful stop on SIGINT/SIGTERM: not an error
            print(f"isoconv: {e}", file=sys.stderr)
            return e.exit_code
        if args.debug:
            raise
        print(f"isoconv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("isoconv: interrupted; continue with `isoconv train --resume RUN_DIR`", file=sys.stderr)
        return 130
    except Exception as e:  # out-of-memory is a user problem with a known fix
        if type(e).__name__ == "OutOfMemoryError" and not args.debug:
            print("isoconv: error: out of memory; lower --batch-size", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
