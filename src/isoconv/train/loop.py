"""The training loop: one function a reader can hold in their head.

train(cfg) -> summary dict. Data stays on the device as uint8; each epoch draws batches by
permutation from a dedicated generator and augments them as batched tensor ops.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
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
from ..experiments.tensorboard import open_tensorboard
from ..models import count_params, create_model
from . import distributed as ddp
from .checkpoint import load_latest_checkpoint, save_checkpoint
from .distributed import SINGLE, Dist
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


def load_data(cfg: TrainConfig, device: torch.device, train: bool = True, norm=None):
    """(train, test) datasets, test on the device; train is None when train=False.

    The training set moves to the device only for the device loader; the torchvision loader reads it on the CPU.
    The test set is normalized with the training split's statistics, or with `norm` = (mean, std) (a trained
    model's) when train=False. --test-split half keeps a fixed random half of it before --test-subset.
    """
    from ..data import seeded_half

    root = resolve_data_root(cfg.data_dir)
    opts = dict(download=cfg.download, label_type=cfg.label_type, image_size=cfg.image_size,
                val_split=cfg.val_split, skip_bad_images=cfg.skip_bad_images)
    train_ds = None
    if train:
        train_ds = load_dataset(cfg.dataset, root, "train", **opts)
        norm = (train_ds.mean, train_ds.std)
        train_ds = train_ds.subset(cfg.train_subset)
    test = load_dataset(cfg.dataset, root, "test", norm=norm, **opts)
    if cfg.test_split == "half":
        test = seeded_half(test)
    test = test.subset(cfg.test_subset).to(device)
    if not train:
        return None, test
    return (train_ds.to(device) if cfg.loader == "device" else train_ds), test


def build_loader(cfg: TrainConfig, train, generator: torch.Generator, device: torch.device, dist: Dist = SINGLE):
    aug = dict(image_size=train.image_size, mean=train.mean, std=train.std, scale=cfg.scale,
               translate=cfg.translate, hflip=cfg.hflip, ra_n=cfg.ra_n, ra_m=cfg.ra_m, jitter=cfg.jitter,
               reprob=cfg.reprob, no_aug=cfg.no_aug)
    if cfg.loader == "torchvision":
        return TorchvisionLoader(train, cfg.batch_size, torchvision_train_transform(**aug), generator, device,
                                 workers=cfg.workers, rank=dist.rank, world_size=dist.world_size)
    return DeviceLoader(train, cfg.batch_size, BatchAugment(**aug), generator, world_size=dist.world_size)


def build_optimizer(cfg: TrainConfig, model, device: torch.device, amp_dtype):
    """AdamW on all parameters (lr is set every step by the schedule) and the fp16 grad scaler."""
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel for all parameters on a GPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=cfg.wd, eps=cfg.opt_eps, **fused)
    return optimizer, torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


CXX_COMPILERS = ("g++", "clang++", "c++", "cl")


def compile_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile(model), sharing its parameters; $ISOCONV_COMPILE_BACKEND overrides the backend (the tests use
    "eager", which skips code generation)."""
    backend = os.environ.get("ISOCONV_COMPILE_BACKEND", "inductor")
    if backend == "inductor" and device.type == "cpu" and not any(
            shutil.which(c) for c in (os.environ.get("CXX", ""), *CXX_COMPILERS) if c):
        raise ConfigError("--compile on a CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop "
                          "--compile")
    try:
        return torch.compile(model, backend=backend)
    except RuntimeError as e:  # platforms and Pythons this torch cannot compile on, unknown backends
        raise ConfigError(f"--compile is not available here ({str(e).splitlines()[0]}); drop --compile") from None


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


EVAL_BATCH = 500


def evaluate(model, ds, *, device, amp_dtype, channels_last: bool, tta_flip: bool = False,
             dist: Dist = SINGLE) -> dict[str, Any]:
    """Test metrics. Under torchrun each process predicts whole EVAL_BATCH chunks of a contiguous part of the test
    set (the same chunks a single process predicts, so the same logits) and all of them gather every logit."""
    images = ds.images
    if dist.enabled:
        chunks = ddp.shard_bounds(-(-len(images) // EVAL_BATCH), dist.world_size, dist.rank)
        images = images[chunks[0] * EVAL_BATCH:chunks[1] * EVAL_BATCH]
    if len(images):
        logits = predict_logits(model, images, ds.mean, ds.std, device=device, amp_dtype=amp_dtype,
                                channels_last=channels_last, batch_size=EVAL_BATCH, tta_flip=tta_flip)
    else:  # more processes than chunks
        logits = torch.empty((0, len(ds.classes)), device=device)
    logits = ddp.all_gather_rows(dist, logits)
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
    step_model: Optional[torch.nn.Module] = None  # what steps call: torch.compile(model) or model (DDP-wrapped)
    eval_model: Optional[torch.nn.Module] = None  # what evaluation calls: step_model in a single process
    dist: Dist = SINGLE

    def __post_init__(self):
        if self.step_model is None:
            self.step_model = self.model
        if self.eval_model is None:
            self.eval_model = self.step_model


def build_training(cfg: TrainConfig, resuming: bool = False, dist: Dist = SINGLE) -> TrainingSetup:
    """Seeded device, data, model, optimiser and batch source for cfg, as train() and the benchmark use them.

    When resuming, the checkpoint supplies the weights, so --pretrained is not read again. Under torchrun (`dist`)
    each process uses its own device, local rank 0 loads (and caches) the data first, and the model is wrapped in
    DistributedDataParallel (with --sync-bn, its BatchNorm layers share statistics across processes)."""
    device = dist.device if dist.enabled else resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    with torch.device("meta"):  # shape errors before any data is read or downloaded
        build_model(cfg, num_classes=10, image_size=None)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    with ddp.main_process_first(dist):
        train_ds, test_ds = load_data(cfg, device)
    model = build_model(cfg, train_ds.num_classes, train_ds.image_size).to(device)
    if cfg.pretrained and not resuming:
        from ..interop.pretrained import load_pretrained_into  # here: interop imports this module
        load_pretrained_into(model, cfg.pretrained, log=print)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.enabled and cfg.sync_bn:
        model = ddp.convert_sync_batchnorm(model, device)
    optimizer, scaler = build_optimizer(cfg, model, device, amp_dtype)
    step_model = ddp.wrap_ddp(model, dist) if dist.enabled else model
    step_model = compile_model(step_model, device) if cfg.compile else step_model
    eval_model = (compile_model(model, device) if cfg.compile else model) if dist.enabled else step_model
    return TrainingSetup(device, amp_dtype, gen, train_ds, test_ds, model, optimizer, scaler,
                         build_loader(cfg, train_ds, gen, device, dist), build_mix(cfg, train_ds.num_classes),
                         step_model=step_model, eval_model=eval_model, dist=dist)


def train_step(model, optimizer, scaler, mix: MixupCutmix, x, y, cfg: TrainConfig, gen, device, amp_dtype,
               skip_nonfinite: bool = False, targets=None, loss_weight: float = 1.0, all_finite=None):
    """One optimisation step on an augmented batch; returns (loss, logits), both still on the device.

    With skip_nonfinite, a step whose loss is not finite makes no update and returns (None, None)
    (this costs one device sync per step, so it is off by default).
    Under DDP the caller passes this process's slice with its soft `targets` (already mixed, or None), the weight
    that turns DDP's gradient average into the global-batch mean, and `all_finite` (agreement across processes).
    """
    if targets is None and mix.enabled:
        x, targets = mix(x, y, gen)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp_dtype):
        logits = model(x)
        if targets is not None:
            loss = soft_target_cross_entropy(logits.float(), targets)
        else:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    if skip_nonfinite and not (all_finite(loss) if all_finite else torch.isfinite(loss).item()):
        return None, None
    scaler.scale(loss * loss_weight if loss_weight != 1.0 else loss).backward()
    if cfg.clip_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach()


class CompileTimer:
    """A training step for a torch.compile'd model. The first call compiles, so its extra time over the second
    call is the compile time (`compile_seconds`; the whole first step when there is no second); a compiler
    failure becomes a ConfigError."""

    def __init__(self, step, device: torch.device):
        self.step, self.device = step, device
        self.times: list[float] = []

    @property
    def compile_seconds(self) -> Optional[float]:
        if not self.times:
            return None
        return max(0.0, self.times[0] - (self.times[1] if len(self.times) > 1 else 0.0))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, *args, **kwargs):
        timed = len(self.times) < 2
        if timed:
            self._sync()
            t0 = time.perf_counter()
        try:
            out = self.step(*args, **kwargs)
        except Exception as e:
            if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                first_line = (str(e).strip().splitlines() or [""])[0]
                raise ConfigError(f"torch.compile failed on this model ({type(e).__name__}: {first_line}); "
                                  f"drop --compile") from e
            raise
        if timed:
            self._sync()
            self.times.append(time.perf_counter() - t0)
        return out


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


class TrainingInterrupted(UserError):
    """SIGINT/SIGTERM arrived; the run was checkpointed and can be resumed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """While active, the first SIGINT/SIGTERM only sets a flag (the loop checkpoints and stops after the
    current step); a second one interrupts at once, unless repeat_interrupts=False (under torchrun, where a
    terminal's Ctrl-C reaches a worker twice, directly and forwarded by torchrun, which kills workers that have
    not exited 30 s later anyway)."""

    def __init__(self, repeat_interrupts: bool = True):
        self.signum: Optional[int] = None
        self.repeat_interrupts = repeat_interrupts
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        if not self.repeat_interrupts:
            return
        for sig, handler in self._previous.items():  # a second signal acts immediately
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


_PAUSE_COUNTS: dict[str, int] = {}  # occurrences of each event in this process, for pause_for_tests


def pause_for_tests(event: str) -> None:
    """Crash tests set ISOCONV_TEST_PAUSE=event[@n] to freeze the n-th occurrence of an event (e.g. `step@5`,
    `checkpoint-write@2`) long enough to SIGKILL the process at exactly that point."""
    spec = os.environ.get("ISOCONV_TEST_PAUSE")
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name != event:
        return
    _PAUSE_COUNTS[event] = _PAUSE_COUNTS.get(event, 0) + 1
    if _PAUSE_COUNTS[event] == int(nth or 1):
        print(f"ISOCONV_TEST_PAUSED {spec} rank={os.environ.get('RANK', 0)} pid={os.getpid()}", flush=True)
        time.sleep(float(os.environ.get("ISOCONV_TEST_PAUSE_SECONDS", "600")))


def nonfinite_message(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int, run_dir: Path) -> str:
    lr = lr_at(epoch + (step + 1) / steps_per_epoch, schedule=cfg.schedule, lr_max=cfg.lr_max, epochs=cfg.epochs,
               warmup_epochs=cfg.warmup_epochs)
    kept = (f"the last good checkpoint {run_dir / 'last.pt'} is kept" if (run_dir / "last.pt").exists()
            else "no checkpoint had been written yet")
    return (f"the loss became non-finite in epoch {epoch + 1} at step {step + 1} of {steps_per_epoch} "
            f"(global step {epoch * steps_per_epoch + step + 1}, lr {lr:.3g}); {kept}; lower --lr-max, add "
            f"--clip-norm 1.0, or pass --skip-nonfinite to skip such steps")


def train(cfg: TrainConfig, *, resume: Optional[Path] = None, log=print,
          stop_after: Optional[int] = None, resume_state: Optional[dict] = None) -> Optional[dict[str, Any]]:
    """Train (or resume) a run and return its summary; everything is also written to the run directory.

    stop_after=N stops after epoch N with a checkpoint but no summary (the run stays resumable).
    resume_state: the checkpoint of `resume` when the caller has already loaded it (it is not read again).
    Under torchrun every process calls this (DDP); only rank 0 logs and writes files, the others return None.
    """
    ddp.check_batch_divides(cfg.batch_size, ddp.world_from_env().world_size)
    start_state = None
    if resume is not None:
        run_dir = Path(resume)
        start_state = resume_state or load_latest_checkpoint(run_dir / "last.pt")
        diffs = config_differences(start_state["config"], cfg.to_dict())
        if diffs:
            raise ConfigError(f"cannot resume {run_dir} with a different config ({'; '.join(diffs)}); "
                              f"drop those flags or start a new run")
    else:
        run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        if (run_dir / "last.pt").exists() or (run_dir / "last.prev.pt").exists():
            raise UserError(f"run directory {run_dir} already holds a run; use --resume {run_dir} or another --out")

    with ddp.process_group(cfg.device) as dist:
        try:
            return _setup_and_train(cfg, dist, run_dir, start_state, resume, log if dist.is_main else quiet,
                                    stop_after)
        except Exception as e:
            if dist.enabled and not isinstance(e, UserError) and ddp.is_collective_failure(e):
                hint = (f"continue from its last checkpoint with `-m isoconv train --resume {run_dir}`"
                        if (run_dir / "last.pt").exists() else "no checkpoint had been written; start it again")
                raise UserError(ddp.lost_contact_message(dist, e, hint)) from e
            raise


def quiet(*_) -> None:
    pass


def _setup_and_train(cfg, dist: Dist, run_dir: Path, start_state, resume, log, stop_after):
    setup = build_training(cfg, resuming=start_state is not None, dist=dist)
    created_dir = not run_dir.exists()
    try:
        return _train(cfg, setup, run_dir, start_state, log, stop_after)
    except BaseException as e:
        if dist.is_main and resume is None and not (run_dir / "last.pt").exists():
            remove_unfinished_run(run_dir, created_dir)
        if type(e).__name__ == "OutOfMemoryError":
            raise UserError(f"out of memory at batch size {cfg.batch_size}; lower --batch-size") from e
        raise


def remove_unfinished_run(run_dir: Path, created_dir: bool) -> None:
    """A run that never wrote a checkpoint leaves nothing behind for later commands to misread."""
    if created_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in ("config.yaml", "metrics.jsonl"):
        (run_dir / name).unlink(missing_ok=True)


def _train(cfg, setup: TrainingSetup, run_dir: Path, start_state, log, stop_after):
    device, amp_dtype, gen = setup.device, setup.amp_dtype, setup.generator
    train_ds, test_ds, model = setup.train_ds, setup.test_ds, setup.model
    optimizer, scaler, loader, mix = setup.optimizer, setup.scaler, setup.loader, setup.mix
    params = count_params(model)
    steps_per_epoch = len(loader)
    step_model = setup.step_model  # the compiled model with --compile (same parameters as `model`)
    eval_model, dist = setup.eval_model, setup.dist
    run_step = CompileTimer(train_step, device) if cfg.compile else train_step

    start_epoch, start_step, epoch_state, history, train_seconds = 0, 0, None, [], 0.0
    if start_state is not None:
        model.load_state_dict(start_state["model"])
        optimizer.load_state_dict(start_state["optimizer"])
        scaler.load_state_dict(start_state["scaler"])
        set_rng_state(start_state["rng"], gen)
        start_epoch = start_state["epoch"]
        start_step = start_state.get("step", 0)
        epoch_state = start_state.get("epoch_state")
        train_seconds = start_state["train_seconds"]
        history = read_metrics(run_dir / "metrics.jsonl")[:start_epoch]
    if dist.rank > 0:  # per-process stochastic depth; rank 0 keeps the single-process stream
        torch.manual_seed(ddp.decorrelated_seed(cfg.seed, dist.rank, start_epoch, start_step))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_metrics(run_dir / "metrics.jsonl", history)
    tb = open_tensorboard(run_dir, start_epoch=len(history), enabled=cfg.tensorboard and dist.is_main)

    log(f"run {run_dir}: {cfg.model} ({params:,} params) on {device} {amp_name(amp_dtype)}, {cfg.dataset} "
        f"{len(train_ds)} train / {len(test_ds)} test, {cfg.epochs} epochs x {steps_per_epoch} steps of "
        f"{cfg.batch_size}, {cfg.loader} loader")
    if dist.enabled:
        log(f"DDP: {dist.world_size} processes ({dist.backend}) x {cfg.batch_size // dist.world_size} images = "
            f"global batch {cfg.batch_size}; lr_max {cfg.lr_max} applies to the global batch; "
            f"BatchNorm {'synchronized across processes' if cfg.sync_bn else 'per process (no --sync-bn)'}")
    elif cfg.sync_bn:
        log("--sync-bn has no effect in a single process")
    if start_state is not None:
        log(f"resuming after epoch {start_epoch}" + (f" step {start_step}" if start_step else ""))
    log(HEADER)
    for row in history:
        log(format_row(row))

    def checkpoint(epoch_done: int, step: int, state: Optional[dict], seconds: float) -> None:
        if not dist.is_main:
            return
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": epoch_done, "step": step, "epoch_state": state,
                         "rng": rng_state(gen), "train_seconds": seconds, "config": cfg.to_dict(),
                         "params": params, "data": data_meta(test_ds)},
                        run_dir / "last.pt", _hook=pause_for_tests if os.environ.get("ISOCONV_TEST_PAUSE") else None)

    result = None
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    with StopSignals(repeat_interrupts=not dist.enabled) as stop:
        for epoch in range(start_epoch, end_epoch):
            model.train()
            if epoch_state is not None:  # resuming mid-epoch: same order, same partial sums
                order, first = epoch_state["order"], start_step
                loss_sum = epoch_state["loss_sum"].to(device)
                correct = epoch_state["correct"].to(device)
                seen, skipped, seconds_before = epoch_state["seen"], epoch_state["skipped"], epoch_state["seconds"]
                if dist.rank > 0:  # the checkpoint holds the sums over all processes: counted once, by rank 0
                    loss_sum, correct, seen = torch.zeros_like(loss_sum), torch.zeros_like(correct), 0
            else:
                order, first = loader.epoch_order(), 0
                loss_sum = torch.zeros((), device=device)
                correct = torch.zeros((), device=device, dtype=torch.long)
                seen, skipped, seconds_before = 0, 0, 0.0
            epoch_state, seen_at_start = None, seen
            first_bad = torch.full((), -1, device=device, dtype=torch.long)  # checked without a sync per step
            t0 = time.perf_counter()

            def check_finite() -> None:
                bad = int(ddp.first_step_over_ranks(dist, first_bad).item())
                if bad >= 0:
                    raise UserError(nonfinite_message(cfg, epoch, bad, steps_per_epoch, run_dir))

            def epoch_totals() -> tuple[torch.Tensor, torch.Tensor, int]:
                """loss sum, correct count and images seen so far, over all processes."""
                if not dist.enabled:
                    return loss_sum, correct, seen
                t = ddp.sum_over_ranks(dist, torch.stack([loss_sum.double(), correct.double(),
                                                          torch.tensor(float(seen), device=device).double()]))
                return t[0].float(), t[1].round().long(), int(t[2].item())

            def partial_state(step: int) -> dict[str, Any]:
                total_loss, total_correct, total_seen = epoch_totals()
                return {"order": order, "loss_sum": total_loss.cpu(), "correct": total_correct.cpu(),
                        "seen": total_seen, "skipped": skipped, "seconds": seconds_before + time.perf_counter() - t0}

            bar = tqdm(loader.batches(order, first), total=steps_per_epoch, initial=first,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=not sys.stderr.isatty() or not dist.is_main, unit="batch")
            for i, (x, y) in enumerate(bar, start=first):
                lr = lr_at(epoch + (i + 1) / steps_per_epoch, schedule=cfg.schedule, lr_max=cfg.lr_max,
                           epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                shard = {}
                if dist.enabled:  # this process's slice of the global batch (mixed first when mixing)
                    x, y, targets, weight = ddp.split_batch(dist, x, y, loader.slices[i][1] - loader.slices[i][0],
                                                            is_global=loader.yields_global_batches, mix=mix, gen=gen)
                    shard = dict(targets=targets, loss_weight=weight, all_finite=ddp.all_finite_over_ranks(dist))
                loss, logits = run_step(step_model, optimizer, scaler, mix, x, y, cfg, gen, device, amp_dtype,
                                          skip_nonfinite=cfg.skip_nonfinite, **shard)
                if loss is None:  # --skip-nonfinite: the update was skipped
                    skipped += 1
                else:
                    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i, first_bad)
                    loss_sum += loss * len(y)
                    correct += (logits.argmax(1) == y).sum()
                    seen += len(y)
                pause_for_tests("step")
                done = i + 1
                checkpoint_due = bool(cfg.ckpt_every_steps and done % cfg.ckpt_every_steps == 0)
                signum = stop.signum
                if dist.enabled:  # all processes must stop at the same step: they agree every few steps
                    poll = done < steps_per_epoch and (checkpoint_due or done % ddp.STOP_POLL_STEPS == 0)
                    signum = ddp.agreed_signal(dist, stop.signum) if poll else None
                if done < steps_per_epoch and (signum is not None or checkpoint_due):
                    check_finite()
                    checkpoint(epoch, done, partial_state(done), train_seconds)
                    if signum is not None:
                        bar.close()
                        ddp.barrier(dist)  # rank 0 has written the checkpoint before anyone exits
                        raise interrupted(signum, run_dir, epoch, done)
                if not bar.disable and i % 10 == 0 and seen:
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                    img_s=f"{(seen - seen_at_start) / max(elapsed, 1e-9):.0f}")
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            check_finite()
            loss_sum, correct, seen = epoch_totals()
            epoch_seconds = seconds_before + time.perf_counter() - t0
            train_seconds += epoch_seconds
            if seen == 0:
                raise UserError(f"every step of epoch {epoch + 1} had a non-finite loss (all skipped); "
                                f"lower --lr-max or add --clip-norm 1.0")

            last = epoch + 1 == cfg.epochs
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum.item() / seen,
                   "train_acc": correct.item() / seen, "test_loss": None, "test_top1": None, "test_top5": None,
                   "epoch_seconds": epoch_seconds, "images_per_second": seen / epoch_seconds,
                   "skipped_steps": skipped}
            if last or (epoch + 1) % cfg.eval_every == 0:
                ddp.broadcast_buffers(dist, model)
                result = evaluate(eval_model, test_ds, device=device, amp_dtype=amp_dtype,
                                  channels_last=cfg.channels_last, dist=dist)
                row.update({k: result[k] for k in ("test_loss", "test_top1", "test_top5")})
            history.append(row)
            if dist.is_main:
                append_metrics(run_dir / "metrics.jsonl", row)  # before the checkpoint: resume truncates extra rows
            tb.log_epoch(row)
            checkpoint(epoch + 1, 0, None, train_seconds)
            log(format_row({k: (float("nan") if v is None else v) for k, v in row.items()}))
            if cfg.compile and epoch == start_epoch and run_step.compile_seconds is not None:
                log(f"torch.compile: {run_step.compile_seconds:.1f} s (extra time of the first step, included in "
                    f"epoch {epoch + 1}'s seconds)")
            signum = ddp.agreed_signal(dist, stop.signum)  # also waits for rank 0's checkpoint
            if signum is not None:
                raise interrupted(signum, run_dir, epoch + 1, 0)

    tb.close()
    if end_epoch < cfg.epochs:
        log(f"stopped after epoch {end_epoch}; continue with `isoconv train --resume {run_dir}`")
        return None
    if result is None:  # resumed a run that had already finished: evaluate the final weights
        ddp.broadcast_buffers(dist, model)
        result = evaluate(eval_model, test_ds, device=device, amp_dtype=amp_dtype, channels_last=cfg.channels_last,
                          dist=dist)
    if not dist.is_main:
        return None
    fields, report = test_report(result, test_ds.classes)
    summary = {"run_dir": str(run_dir), "model": cfg.model, "recipe": cfg.recipe, "dataset": cfg.dataset,
               "epochs": cfg.epochs, "params": params, "train_seconds": train_seconds, "device": str(device),
               "amp": amp_name(amp_dtype), "torch": torch.__version__,
               "skipped_steps": sum(r.get("skipped_steps", 0) for r in history),
               "compile_seconds": run_step.compile_seconds if cfg.compile else None,
               **({"processes": dist.world_size, "batch_per_process": cfg.batch_size // dist.world_size}
                  if dist.enabled else {}), **fields}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "report.txt").write_text(report)
    log("")
    log(report)
    log(f"test top-1 {summary['test_top1']:.4f}  top-5 {summary['test_top5']:.4f}  "
        f"({train_seconds / 60:.1f} min of training); written to {run_dir}")
    return summary


def interrupted(signum: int, run_dir: Path, epoch_done: int, step: int) -> TrainingInterrupted:
    where = f"epoch {epoch_done + 1} step {step}" if step else f"the end of epoch {epoch_done}"
    return TrainingInterrupted(f"stopped by {signal.Signals(signum).name} at {where}; the checkpoint is saved — "
                               f"continue with `isoconv train --resume {run_dir}`", signum)


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
