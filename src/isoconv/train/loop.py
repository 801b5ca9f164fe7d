"""The training loop: one function a reader can hold in their head.

train(cfg) -> summary dict. Data stays on the device as uint8; each epoch draws batches by
permutation from a dedicated generator and augments them as batched tensor ops.
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from ..augment import BatchAugment, MixupCutmix, normalize, soft_target_cross_entropy
from ..augment.reference import torchvision_train_transform
from ..config import TrainConfig
from ..data import load_dataset, resolve_data_root
from ..data.loaders import DeviceLoader, TorchvisionLoader
from ..errors import ConfigError, UserError
from ..eval.metrics import classification_report, confusion_matrix, per_class_metrics, summary_metrics, topk_correct
from ..models import count_params, create_model
from .checkpoint import load_checkpoint, save_checkpoint
from .schedule import lr_at

# Settings that may differ between a run and its resumption without changing what is computed.
RUNTIME_KEYS = {"device", "workers", "data_dir", "download", "out", "description", "published", "pretrained",
                "ckpt_every_steps", "tensorboard", "skip_bad_images", "compile"}


# ----------------------------------------------------------------------------- devices and precision

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for but no CUDA GPU is visible; use --device cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions; without them bf16 autocast is much slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for full fp32."""
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device (fp16 with a grad scaler); use --amp bf16 or off on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def amp_name(dtype: Optional[torch.dtype]) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ----------------------------------------------------------------------------- run directory

def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model}"


def config_differences(old: dict, new: dict) -> list[str]:
    keys = sorted((set(old) | set(new)) - RUNTIME_KEYS)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


# ----------------------------------------------------------------------------- building blocks

def build_model(cfg: TrainConfig, num_classes: int, image_size: Optional[int]) -> torch.nn.Module:
    return create_model(cfg.model, num_classes=num_classes, image_size=image_size, **cfg.model_overrides())


def load_data(cfg: TrainConfig, device: torch.device, train: bool = True):
    """(train, test) datasets, test on the device; train is None when train=False.

    The training set moves to the device only for the device loader; the torchvision loader reads it on the CPU.
    """
    root = resolve_data_root(cfg.data_dir)
    test = load_dataset(cfg.dataset, root, "test", download=cfg.download).subset(cfg.test_subset).to(device)
    if not train:
        return None, test
    train_ds = load_dataset(cfg.dataset, root, "train", download=cfg.download).subset(cfg.train_subset)
    return (train_ds.to(device) if cfg.loader == "device" else train_ds), test


def build_loader(cfg: TrainConfig, train, generator: torch.Generator, device: torch.device):
    aug = dict(image_size=train.image_size, mean=train.mean, std=train.std, scale=cfg.scale,
               translate=cfg.translate, hflip=cfg.hflip, ra_n=cfg.ra_n, ra_m=cfg.ra_m, jitter=cfg.jitter,
               reprob=cfg.reprob, no_aug=cfg.no_aug)
    if cfg.loader == "torchvision":
        return TorchvisionLoader(train, cfg.batch_size, torchvision_train_transform(**aug), generator, device,
                                 workers=cfg.workers)
    return DeviceLoader(train, cfg.batch_size, BatchAugment(**aug), generator)


def build_optimizer(cfg: TrainConfig, model, device: torch.device, amp_dtype):
    """AdamW on all parameters (lr is set every step by the schedule) and the fp16 grad scaler."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=cfg.wd, eps=cfg.opt_eps)
    return optimizer, torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def build_mix(cfg: TrainConfig, num_classes: int) -> MixupCutmix:
    mixup, cutmix = (0.0, 0.0) if cfg.no_aug else (cfg.mixup, cfg.cutmix)
    return MixupCutmix(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=cfg.mix_prob, switch_prob=cfg.mix_switch_prob,
                       label_smoothing=cfg.label_smoothing, num_classes=num_classes)


@torch.no_grad()
def predict_logits(model, images: torch.Tensor, mean, std, *, device, amp_dtype, channels_last: bool,
                   batch_size: int = 500, tta_flip: bool = False) -> torch.Tensor:
    """Float32 logits (or, with tta_flip, log of the mean of plain and flipped softmax) for uint8 images."""
    model.eval()
    outs = []
    for s in range(0, len(images), batch_size):
        x = normalize(images[s:s + batch_size].to(device), mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x).float()
            if tta_flip:
                probs = (logits.softmax(1) + model(x.flip(3)).float().softmax(1)) / 2
                logits = probs.clamp_min(1e-12).log()
        outs.append(logits)
    return torch.cat(outs)


def evaluate(model, ds, *, device, amp_dtype, channels_last: bool, tta_flip: bool = False) -> dict[str, Any]:
    logits = predict_logits(model, ds.images, ds.mean, ds.std, device=device, amp_dtype=amp_dtype,
                            channels_last=channels_last, tta_flip=tta_flip)
    labels = ds.labels.to(logits.device)
    correct = topk_correct(logits, labels, ks=(1, 5))
    n = len(labels)
    return {"test_loss": F.cross_entropy(logits, labels).item(), "test_top1": correct[1] / n,
            "test_top5": correct[5] / n, "preds": logits.argmax(1).cpu(), "labels": labels.cpu()}


def test_report(result: dict, classes: list[str]) -> tuple[dict[str, Any], str]:
    """The summary.json fields for a test result, and the human-readable classification report."""
    cm = confusion_matrix(result["preds"], result["labels"], len(classes))
    fields = {"test_top1": result["test_top1"], "test_top5": result["test_top5"], "test_loss": result["test_loss"],
              "test_images": len(result["labels"]), "classes": classes,
              **{k: v for k, v in summary_metrics(cm).items() if k not in ("accuracy", "support")},
              "per_class": per_class_metrics(cm, classes), "confusion_matrix": cm.tolist()}
    return fields, classification_report(cm, classes)


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainingSetup:
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    generator: torch.Generator  # data order and augmentation
    train_ds: Any
    test_ds: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    loader: Any
    mix: MixupCutmix


def build_training(cfg: TrainConfig) -> TrainingSetup:
    """Seeded device, data, model, optimiser and batch source for cfg, as train() and the benchmark use them."""
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    with torch.device("meta"):  # shape errors before any data is read or downloaded
        build_model(cfg, num_classes=10, image_size=None)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    train_ds, test_ds = load_data(cfg, device)
    model = build_model(cfg, train_ds.num_classes, train_ds.image_size).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scaler = build_optimizer(cfg, model, device, amp_dtype)
    return TrainingSetup(device, amp_dtype, gen, train_ds, test_ds, model, optimizer, scaler,
                         build_loader(cfg, train_ds, gen, device), build_mix(cfg, train_ds.num_classes))


def train_step(model, optimizer, scaler, mix: MixupCutmix, x, y, cfg: TrainConfig, gen, device, amp_dtype):
    """One optimisation step on an augmented batch; returns (loss, logits), both still on the device."""
    if mix.enabled:
        x, targets = mix(x, y, gen)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp_dtype):
        logits = model(x)
        if mix.enabled:
            loss = soft_target_cross_entropy(logits.float(), targets)
        else:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.clip_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach()


def data_meta(ds) -> dict[str, Any]:
    """What inference needs to preprocess images and name classes like training did."""
    return {"classes": list(ds.classes), "mean": list(ds.mean), "std": list(ds.std), "image_size": ds.image_size,
            "dataset": ds.name}


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    state = {"data": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    gen.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def format_row(m: dict[str, Any]) -> str:
    return (f"{m['epoch']:>5d} {m['lr']:>9.2e} {m['train_loss']:>10.4f} {m['train_acc']:>9.4f} "
            f"{m['test_loss']:>9.4f} {m['test_top1']:>9.4f} {m['test_top5']:>9.4f} "
            f"{m['epoch_seconds']:>8.1f} {m['images_per_second']:>8.0f}")


HEADER = (f"{'epoch':>5} {'lr':>9} {'train_loss':>10} {'train_acc':>9} {'test_loss':>9} {'test_top1':>9} "
          f"{'test_top5':>9} {'seconds':>8} {'img/s':>8}")


def train(cfg: TrainConfig, *, resume: Optional[Path] = None, log=print,
          stop_after: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Train (or resume) a run and return its summary; everything is also written to the run directory.

    stop_after=N stops after epoch N with a checkpoint but no summary (the run stays resumable).
    """
    start_state = None
    if resume is not None:
        run_dir = Path(resume)
        start_state = load_checkpoint(run_dir / "last.pt")
        diffs = config_differences(start_state["config"], cfg.to_dict())
        if diffs:
            raise ConfigError(f"cannot resume {run_dir} with a different config ({'; '.join(diffs)}); "
                              f"drop those flags or start a new run")
    else:
        run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        if (run_dir / "last.pt").exists():
            raise UserError(f"run directory {run_dir} already holds a run; use --resume {run_dir} or another --out")

    setup = build_training(cfg)
    device, amp_dtype, gen = setup.device, setup.amp_dtype, setup.generator
    train_ds, test_ds, model = setup.train_ds, setup.test_ds, setup.model
    optimizer, scaler, loader, mix = setup.optimizer, setup.scaler, setup.loader, setup.mix
    params = count_params(model)

    start_epoch, history, train_seconds = 0, [], 0.0
    if start_state is not None:
        model.load_state_dict(start_state["model"])
        optimizer.load_state_dict(start_state["optimizer"])
        scaler.load_state_dict(start_state["scaler"])
        set_rng_state(start_state["rng"], gen)
        start_epoch = start_state["epoch"]
        train_seconds = start_state["train_seconds"]
        history = read_metrics(run_dir / "metrics.jsonl")[:start_epoch]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_metrics(run_dir / "metrics.jsonl", history)

    log(f"run {run_dir}: {cfg.model} ({params:,} params) on {device} {amp_name(amp_dtype)}, {cfg.dataset} "
        f"{len(train_ds)} train / {len(test_ds)} test, {cfg.epochs} epochs x {len(loader)} steps of "
        f"{cfg.batch_size}, {cfg.loader} loader")
    if resume is not None:
        log(f"resuming after epoch {start_epoch}")
    log(HEADER)
    for row in history:
        log(format_row(row))

    result = None
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    for epoch in range(start_epoch, end_epoch):
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        t0 = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not sys.stderr.isatty(),
                   unit="batch")
        for i, (x, y) in enumerate(bar):
            lr = lr_at(epoch + (i + 1) / len(loader), schedule=cfg.schedule, lr_max=cfg.lr_max,
                       epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, logits = train_step(model, optimizer, scaler, mix, x, y, cfg, gen, device, amp_dtype)
            loss_sum += loss * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if not bar.disable and i % 10 == 0:
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                img_s=f"{seen / max(elapsed, 1e-9):.0f}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds

        last = epoch + 1 == cfg.epochs
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
               "test_loss": None, "test_top1": None, "test_top5": None,
               "epoch_seconds": epoch_seconds, "images_per_second": seen / epoch_seconds}
        if last or (epoch + 1) % cfg.eval_every == 0:
            result = evaluate(model, test_ds, device=device, amp_dtype=amp_dtype, channels_last=cfg.channels_last)
            row.update({k: result[k] for k in ("test_loss", "test_top1", "test_top5")})
        if not math.isfinite(row["train_loss"]):
            raise UserError(f"training diverged in epoch {epoch + 1} (loss {row['train_loss']}) at lr {lr:.3g}; "
                            f"lower --lr-max or add --clip-norm 1.0")
        history.append(row)
        append_metrics(run_dir / "metrics.jsonl", row)  # before the checkpoint: resume truncates extra rows
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": epoch + 1, "rng": rng_state(gen),
                         "train_seconds": train_seconds, "config": cfg.to_dict(), "params": params,
                         "data": data_meta(test_ds)},
                        run_dir / "last.pt")
        log(format_row({k: (float("nan") if v is None else v) for k, v in row.items()}))

    if end_epoch < cfg.epochs:
        log(f"stopped after epoch {end_epoch}; continue with `isoconv train --resume {run_dir}`")
        return None
    if result is None:  # resumed a run that had already finished: evaluate the final weights
        result = evaluate(model, test_ds, device=device, amp_dtype=amp_dtype, channels_last=cfg.channels_last)
    fields, report = test_report(result, test_ds.classes)
    summary = {"run_dir": str(run_dir), "model": cfg.model, "recipe": cfg.recipe, "dataset": cfg.dataset,
               "epochs": cfg.epochs, "params": params, "train_seconds": train_seconds, "device": str(device),
               "amp": amp_name(amp_dtype), "torch": torch.__version__, **fields}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "report.txt").write_text(report)
    log("")
    log(report)
    log(f"test top-1 {summary['test_top1']:.4f}  top-5 {summary['test_top5']:.4f}  "
        f"({train_seconds / 60:.1f} min of training); written to {run_dir}")
    return summary


# ----------------------------------------------------------------------------- metrics file

def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
