"""The one source of truth for every training setting.

`TrainConfig` is filled, in order, from its defaults, a YAML recipe, then CLI flags.
Model-shape fields left as None mean "whatever the model preset says".
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError

RECIPE_DIR = Path(__file__).parent / "recipes"

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
SCHEDULE_CHOICES = ("onecycle", "onecycle-frac", "cosine")
LOADER_CHOICES = ("device", "torchvision")
DATASET_CHOICES = ("cifar10", "cifar100", "tiny-imagenet", "folder")
LABEL_TYPE_CHOICES = ("fine", "coarse")
TEST_SPLIT_CHOICES = ("full", "half")


@dataclass
class TrainConfig:
    # model
    model: str = "cm-vanilla"
    dim: Optional[int] = None
    depth: Optional[int] = None
    kernel: Optional[int] = None
    patch: Optional[int] = None
    activation: Optional[str] = None
    skip_period: Optional[int] = None
    drop_path: Optional[float] = None
    # data
    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    download: bool = True
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    loader: str = "device"
    workers: int = 2
    label_type: str = "fine"  # CIFAR-100: fine (100) or coarse (20 superclasses)
    image_size: Optional[int] = None  # resize at decode time (None: the dataset's native size)
    val_split: Optional[float] = None  # folder datasets without val/: hold out this fraction (fixed seed)
    skip_bad_images: bool = False  # skip and count unreadable images instead of failing
    test_split: str = "full"  # full test set, or "half" (the seed's 5k half-split)
    # optimisation
    epochs: int = 25
    batch_size: int = 512  # global: under torchrun each of W processes takes batch_size / W per step
    lr_max: float = 0.01  # for the global batch, whatever the number of processes (never rescaled)
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0
    wd: float = 0.01
    opt_eps: float = 1e-8
    clip_norm: Optional[float] = None
    label_smoothing: float = 0.0
    pretrained: Optional[str] = None  # initial weights (timm, original layouts or isoconv); classifier replaced if needed
    # augmentation (reference convmixer-cifar10 defaults)
    no_aug: bool = False
    scale: float = 0.75
    translate: int = 0
    hflip: bool = True
    ra_n: int = 1
    ra_m: int = 8
    jitter: float = 0.1
    reprob: float = 0.25
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    # engine
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (compile time reported separately)
    sync_bn: bool = False  # BatchNorm statistics over the global batch under torchrun/DDP (no effect alone)
    seed: int = 0
    device: str = "auto"
    eval_every: int = 1
    ckpt_every_steps: int = 0  # also checkpoint every N steps inside an epoch (0 = only at epoch ends)
    skip_nonfinite: bool = False  # skip (and count) steps with a non-finite loss instead of stopping
    tensorboard: bool = False  # also log every scalar to RUN_DIR/tensorboard
    out: Optional[str] = None
    # provenance (not training settings)
    recipe: Optional[str] = None
    description: str = ""
    published: dict = field(default_factory=dict)

    def model_overrides(self) -> dict[str, Any]:
        """Model-constructor keyword overrides that were explicitly set."""
        names = {"dim": "dim", "depth": "depth", "kernel": "kernel_size", "patch": "patch_size",
                 "activation": "activation", "skip_period": "skip_period", "drop_path": "drop_path_rate"}
        return {kw: getattr(self, f) for f, kw in names.items() if getattr(self, f) is not None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        def positive(name):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {v}")
        for name in ("epochs", "batch_size", "lr_max", "eval_every", "train_subset", "test_subset",
                     "dim", "depth", "kernel", "patch", "image_size"):
            positive(name)
        for name in ("wd", "label_smoothing", "jitter", "reprob", "mixup", "cutmix", "mix_prob", "workers",
                     "warmup_epochs", "ra_n", "ra_m", "translate", "skip_period", "drop_path", "clip_norm",
                     "ckpt_every_steps"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        for name in ("reprob", "mix_prob", "mix_switch_prob", "label_smoothing", "drop_path"):
            v = getattr(self, name)
            if v is not None and v > 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
        if self.batch_size < 2:
            raise ConfigError(f"--batch-size must be at least 2 (BatchNorm needs two images), got {self.batch_size}")
        if not 0 < self.scale <= 1:
            raise ConfigError(f"--scale must be in (0, 1], got {self.scale}")
        if self.ra_m > 30:
            raise ConfigError(f"--ra-m must be in 0..30 (torchvision RandAugment scale), got {self.ra_m}")
        if self.val_split is not None and not 0 < self.val_split < 1:
            raise ConfigError(f"--val-split must be a fraction in (0, 1), got {self.val_split}")
        for name, choices in (("amp", AMP_CHOICES), ("schedule", SCHEDULE_CHOICES), ("loader", LOADER_CHOICES),
                              ("dataset", DATASET_CHOICES), ("label_type", LABEL_TYPE_CHOICES),
                              ("test_split", TEST_SPLIT_CHOICES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"--{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        return self


CONFIG_KEYS = tuple(f.name for f in fields(TrainConfig))


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], source: str) -> TrainConfig:
    """Return a copy of cfg with overrides applied; unknown keys are an error naming the source."""
    for key in overrides:
        if key not in CONFIG_KEYS:
            raise ConfigError(f"unknown setting {key!r} in {source}{suggest(key, CONFIG_KEYS)}")
    return dataclasses.replace(cfg, **overrides)


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def shipped_or_file(name_or_file: str, folder: Path, shipped: list[str], *, file_kind: str, kind: str,
                    listing: str) -> Path:
    """A YAML file path (anything ending in .yaml/.yml, or an existing file) or the name of one shipped in
    `folder`; otherwise a ConfigError naming the closest shipped names."""
    p = Path(name_or_file)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"{file_kind} {p} does not exist; pass a YAML file or one of: {', '.join(shipped)}")
        return p
    p = folder / f"{name_or_file}.yaml"
    if not p.is_file():
        raise ConfigError(f"unknown {kind} {name_or_file!r}{suggest(name_or_file, shipped)}; {listing}")
    return p


def recipe_path(name_or_file: str) -> Path:
    return shipped_or_file(name_or_file, RECIPE_DIR, list_recipes(), file_kind="recipe file", kind="recipe",
                           listing="`isoconv recipes` lists them")


def load_recipe(name_or_file: str) -> dict[str, Any]:
    path = recipe_path(name_or_file)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"recipe {path}{where} is not valid YAML; fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of settings, got {type(data).__name__}")
    data.setdefault("recipe", path.stem)
    return data


def build_config(recipe: Optional[str] = None, /, **overrides) -> TrainConfig:
    """Defaults <- recipe <- overrides (None values in overrides are ignored)."""
    cfg = TrainConfig()
    if recipe:
        cfg = apply_overrides(cfg, load_recipe(recipe), f"recipe {recipe}")
    cfg = apply_overrides(cfg, {k: v for k, v in overrides.items() if v is not None}, "overrides")
    return cfg.validate()
