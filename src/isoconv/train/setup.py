"""From a TrainConfig to the objects a run trains with: device, data, model, optimiser, batches and the step."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from ..augment import BatchAugment, MixThenErase, MixupCutmix
from ..config import TRANSFORM_FIELDS, TrainConfig
from ..data import load_data, normalization, resolve_data_root
from ..data.dataset import ImageDataset
from ..data.provenance import verify_data
from ..data.loaders import DeviceLoader, TorchvisionLoader
from ..errors import ConfigError
from ..lazy import lazy_function
from ..models import build_model, with_preset_shape
from ..runtime import PRECISION_AMP, PRECISIONS, compile_model, configure_device, resolve_device, resolve_precision
from ..weights import load_pretrained_into
from . import distributed as ddp
from .distributed import SINGLE, Dist
from .precision import choose_precision
from .step import TrainStep

# torchvision loads only for --loader torchvision
torchvision_train_transform = lazy_function("isoconv.augment.reference", "torchvision_train_transform")


@dataclass
class Training:
    """Everything a run trains with. `model` holds the parameters; `step.model` is what steps call (compiled
    and/or DDP-wrapped) and `eval_model` what evaluation calls."""

    cfg: TrainConfig
    device: torch.device
    precision: str  # fp32, bf16 or fp16
    generator: torch.Generator  # data order, augmentation and mixing
    train_ds: Any
    test_ds: Any
    model: torch.nn.Module
    eval_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: Any
    step: TrainStep
    data_provenance: dict  # is the data the official release? (isoconv.data.provenance.verify_data)
    dist: Dist = SINGLE


def transform_settings(cfg: TrainConfig, train) -> dict[str, Any]:
    """The keyword arguments of both augmentation pipelines (BatchAugment, torchvision_train_transform)."""
    return dict(image_size=train.image_size, mean=train.mean, std=train.std,
                **{name: getattr(cfg, name) for name in TRANSFORM_FIELDS})


def build_loader(cfg: TrainConfig, train, generator: torch.Generator, device: torch.device, dist: Dist = SINGLE):
    aug = transform_settings(cfg, train)
    if cfg.loader == "torchvision":
        return TorchvisionLoader(train, cfg.batch_size, torchvision_train_transform(**aug), generator, device,
                                 workers=cfg.workers, rank=dist.rank, world_size=dist.world_size)
    return DeviceLoader(train, cfg.batch_size, BatchAugment(**aug), generator, world_size=dist.world_size)


def build_optimizer(cfg: TrainConfig, model, device: torch.device, precision: str):
    """AdamW on all parameters (lr is set every step by the schedule) and the fp16 grad scaler."""
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel for all parameters on a GPU
    params = list(model.parameters())
    if not cfg.wd_norm_bias:  # norm weights and biases are the parameters with fewer than 2 dimensions
        params = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=cfg.wd, eps=cfg.opt_eps, **fused)
    return optimizer, torch.amp.GradScaler(device.type, enabled=PRECISIONS[precision] == torch.float16)


def build_mix(cfg: TrainConfig, train) -> MixupCutmix:
    """Mixup/CutMix, followed by RandomErasing of the mixed batch with --erase-after-mix."""
    mixup, cutmix = (0.0, 0.0) if cfg.no_aug else (cfg.mixup, cfg.cutmix)
    mix = MixupCutmix(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=cfg.mix_prob, switch_prob=cfg.mix_switch_prob,
                      label_smoothing=cfg.label_smoothing, num_classes=train.num_classes, mix_mode=cfg.mix_mode)
    if not cfg.erase_after_mix or cfg.no_aug:
        return mix
    return MixThenErase(mix, BatchAugment(**transform_settings(cfg, train)).erase_stage)


def head_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The classifier's weight matrix, which --head-l2 penalises."""
    head = getattr(model, "head", None)
    weight = getattr(head, "weight", None)
    if weight is None:
        raise ConfigError(f"--head-l2 needs a model with a linear classifier `head`; {type(model).__name__} has none")
    return [weight]


def as_run(cfg: TrainConfig, device: torch.device, precision: str) -> TrainConfig:
    """cfg as it runs, for config.yaml and the checkpoint: the preset's shape filled in, the absolute data folder,
    and the device and precision that `auto` chose."""
    return replace(with_preset_shape(cfg), data_dir=str(resolve_data_root(cfg.data_dir).absolute()),
                   device=str(device), amp=PRECISION_AMP[precision])


def build_training(cfg: TrainConfig, resuming: bool = False, dist: Dist = SINGLE,
                   data: Optional[tuple[ImageDataset, ImageDataset]] = None) -> Training:
    """Seeded device, data, model, optimiser, batches and step for cfg, as train() and the benchmark use them.

    When resuming, the checkpoint supplies the weights, so --pretrained is not read again. Under torchrun (`dist`)
    each process uses its own device, local rank 0 loads (and caches) the data first, and the model is wrapped in
    DistributedDataParallel (with --sync-bn, its BatchNorm layers share statistics across processes). `data`: the
    (train, test) datasets to use instead of loading cfg's."""
    device = dist.device if dist.enabled else resolve_device(cfg.device)
    resolve_precision(cfg.amp, device, cfg.cuda_amp)  # an impossible precision fails before any data is read
    configure_device(device)
    with torch.device("meta"):  # shape errors before any data is read or downloaded
        build_model(cfg, num_classes=10, image_size=None)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    if data is not None:  # (train, test) datasets already in memory (`isoconv doctor`): nothing is read
        train_ds, test_ds = (normalization(ds, cfg).to(device) for ds in data)
        provenance = {"dataset": train_ds.name, "official": None, "reason": "in-memory data"}
    else:
        with ddp.main_process_first(dist):
            train_ds, test_ds = load_data(cfg, device)
            provenance = verify_data(cfg.dataset, resolve_data_root(cfg.data_dir))
    model = build_model(cfg, train_ds.num_classes, train_ds.image_size).to(device)
    if cfg.pretrained and not resuming:
        load_pretrained_into(model, cfg.pretrained)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision, why = choose_precision(cfg, model, device, batch=cfg.batch_size // dist.world_size,
                                      image_size=train_ds.image_size, num_classes=train_ds.num_classes, dist=dist)
    if why and dist.is_main:
        logging.getLogger(__name__).info(f"precision: {why}")
    cfg = as_run(cfg, device, precision)  # from here on cfg is the run as it runs (config.yaml, checkpoints)
    if dist.enabled and cfg.sync_bn:
        model = ddp.convert_sync_batchnorm(model, device)
    optimizer, scaler = build_optimizer(cfg, model, device, precision)
    step_model = ddp.wrap_ddp(model, dist) if dist.enabled else model
    step_model = compile_model(step_model, device, cfg.compile_mode) if cfg.compile else step_model
    eval_model = ((compile_model(model, device, cfg.compile_mode) if cfg.compile else model) if dist.enabled
                  else step_model)
    step = TrainStep(step_model, optimizer, scaler, build_mix(cfg, train_ds), gen, device=device,
                     precision=precision, channels_last=cfg.channels_last, clip_norm=cfg.clip_norm,
                     label_smoothing=cfg.label_smoothing, skip_nonfinite=cfg.skip_nonfinite, compiled=cfg.compile,
                     l2=cfg.head_l2, l2_weights=head_weights(model) if cfg.head_l2 else [])
    return Training(cfg, device, precision, gen, train_ds, test_ds, model, eval_model, optimizer, scaler,
                    build_loader(cfg, train_ds, gen, device, dist), step, provenance, dist)
