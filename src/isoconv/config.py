"""Every training setting, declared once.

`TrainConfig` is filled, in order, from its defaults, a YAML recipe, then CLI flags. Each field's metadata
(`setting(...)`) carries its help, role and accepted values; the CLI flags (`isoconv.cli`), validation, the model
overrides, the resume and sweep comparisons and the ablation command line are all derived from it.
Model-shape fields left as None mean "whatever the model preset says".
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError

RECIPE_DIR = Path(__file__).parent / "recipes"

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
SCHEDULE_CHOICES = ("onecycle", "onecycle-frac", "cosine", "constant", "stlr", "onecycle-torch")
LOADER_CHOICES = ("device", "torchvision")
DATASET_CHOICES = ("cifar10", "cifar10-lossless", "cifar100", "tiny-imagenet", "folder")
LABEL_TYPE_CHOICES = ("fine", "coarse")
TEST_SPLIT_CHOICES = ("full", "half", "xl-half")
ERASE_MODES = ("const", "pixel")
MIX_MODES = ("batch", "elem")
INTERPOLATIONS = ("nearest", "bilinear")
FILL_MODES = ("constant", "nearest", "reflect")
ZOOM_MODES = ("image", "region", "region-xy")
INIT_CHOICES = ("trunc-normal", "torch", "glorot")
ACTIVATION_CHOICES = ("gelu", "relu", "silu", "leaky_relu")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
TRACK_CHOICES = ("mlflow",)


ROLES = ("model", "data", "optimisation", "augmentation", "engine", "runtime", "provenance")
# Roles whose settings never change what a run computes: they may differ between a run and its resumption, and
# they are never "varied" columns in a sweep's results.
RUNTIME_ROLES = ("runtime", "provenance")


def setting(default: Any = None, help: str = "", *, role: str, choices: Optional[tuple] = None,
            above: Optional[float] = None, least: Optional[float] = None, most: Optional[float] = None,
            model_kwarg: Optional[str] = None, flag: Optional[bool] = True, resume_may_change: bool = False,
            **extra: Any):
    """A TrainConfig field with what the CLI, validation and the rest derive from it.

    above/least/most: the value must be > above, >= least, <= most. model_kwarg: the model constructor's
    argument this setting overrides (None in the config means "the preset's value"). flag: True for `--name`,
    False for no flag, None for a bool that defaults to True and is turned off by `--no-name`.
    resume_may_change: a resumed run may be given another value (e.g. --pretrained: the checkpoint has the weights).
    """
    assert role in ROLES, role
    meta = dict(help=help, role=role, choices=choices, above=above, least=least, most=most,
                model_kwarg=model_kwarg, flag=flag, resume_may_change=resume_may_change, **extra)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # model
    model: str = setting("cm-vanilla", "model preset (see `isoconv models`)", role="model")
    dim: Optional[int] = setting(help="channels (width)", role="model", above=0, model_kwarg="dim")
    depth: Optional[int] = setting(help="blocks (ConvNeXt: blocks per stage)", role="model", above=0,
                                   model_kwarg="depth")
    kernel: Optional[int] = setting(help="depthwise kernel size", role="model", above=0, model_kwarg="kernel_size")
    patch: Optional[int] = setting(help="patch size", role="model", above=0, model_kwarg="patch_size")
    activation: Optional[str] = setting(help="activation", role="model", choices=ACTIVATION_CHOICES,
                                        model_kwarg="activation")
    skip_period: Optional[int] = setting(help="ConvMixer-XL inter-block skip groups (0 = none)", role="model",
                                         least=0, model_kwarg="skip_period")
    drop_path: Optional[float] = setting(help="ConvNeXt stochastic depth rate", role="model", least=0, most=1,
                                         model_kwarg="drop_path_rate")
    drop_path_mode: Optional[str] = setting(help="ConvNeXt stochastic depth per image (row, the default) or for the "
                                            "whole batch at once (batch, as the simple-convnext seed did)",
                                            role="model", choices=("row", "batch"), model_kwarg="drop_path_mode")
    head_dropout: Optional[float] = setting(help="dropout on the pooled features before the classifier (ConvMixer)",
                                            role="model", least=0, most=0.99,
                                            model_kwarg="drop_rate")
    init: Optional[str] = setting(help="weight init of convolutions and linear layers: trunc-normal(std 0.02) with zero "
                                  "bias, PyTorch's default, or Glorot-uniform with zero bias (Keras); default: the "
                                  "preset's (ConvNeXt trunc-normal, ConvMixer PyTorch's)", role="model",
                                  choices=INIT_CHOICES, model_kwarg="init")
    bn_eps: Optional[float] = setting(help="BatchNorm epsilon (PyTorch 1e-5, Keras 1e-3); default: the preset's",
                                      role="model", above=0, most=1, model_kwarg="bn_eps")
    bn_momentum: Optional[float] = setting(help="BatchNorm running-statistics momentum, PyTorch's convention "
                                           "(0.1; Keras momentum 0.99 is 0.01 here); default: the preset's",
                                           role="model", above=0, most=1, model_kwarg="bn_momentum")
    # data
    dataset: str = setting("cifar10", role="data", choices=DATASET_CHOICES)
    data_dir: Optional[str] = setting(
        help="folder holding the dataset (cifar-10-batches-py, cifar-100-python, tiny-imagenet-200; for --dataset "
             "folder the folder with train/ and val/); default $ISOCONV_DATA or ~/.cache/isoconv", role="runtime")
    download: bool = setting(True, "fail instead of downloading missing data", role="runtime", flag=None)
    train_subset: Optional[int] = setting(help="train on the first N training images", role="data", above=0)
    test_subset: Optional[int] = setting(help="evaluate on the first N test images", role="data", above=0)
    loader: str = setting("device", "batch source: device-resident batched augmentation, or torchvision's "
                          "DataLoader", role="data", choices=LOADER_CHOICES)
    workers: int = setting(2, "loader workers (torchvision loader)", role="runtime", least=0)
    label_type: str = setting("fine", "CIFAR-100 fine (100) or coarse (20) labels", role="data",
                              choices=LABEL_TYPE_CHOICES)
    image_size: Optional[int] = setting(help="resize images to this size once at decode time", role="data", above=0)
    val_split: Optional[float] = setting(help="hold out this fraction of the training images (fixed seed) and "
                                         "evaluate on it instead of the test set (a folder dataset without val/: "
                                         "that part is its test set)", role="data",
                                         above=0, below=1)
    skip_bad_images: bool = setting(False, "skip and count unreadable images instead of failing", role="runtime")
    pad_to: Optional[int] = setting(help="zero-pad every image (train and test) to this side, centred: what "
                                    "simple-convnext's CenterCrop(64) does to 32x32 CIFAR images", role="data",
                                    above=0)
    normalize: bool = setting(True, "feed raw [0, 1] pixels instead of normalizing with the training set's mean "
                              "and std (the simple-convnext seed did not normalize)", role="data", flag=None)
    test_split: str = setting("full", "full test set, a fixed 5k half, or the ConvMixer-XL study's own 5k half",
                              role="data", choices=TEST_SPLIT_CHOICES)
    # optimisation
    epochs: int = setting(25, role="optimisation", above=0)
    # Defaults that learn at any length (`isoconv train --model X --epochs 2`); the reproduction recipes set the
    # reference trainer's batch 512 and integer-knot schedule explicitly.
    batch_size: int = setting(128, "global batch: under torchrun each of W processes takes batch-size / W",
                              role="optimisation", least=2)
    lr_max: float = setting(0.01, "peak learning rate, for the global batch whatever the number of processes",
                            role="optimisation", above=0)
    schedule: str = setting("onecycle-frac", "learning-rate schedule: the reference one-cycle (integer knots), with "
                            "fractional knots, cosine, constant, slanted triangular, or torch's OneCycleLR "
                            "(with beta1 cycling)", role="optimisation", choices=SCHEDULE_CHOICES)
    warmup_epochs: float = setting(0.0, "linear warm-up (cosine schedule)", role="optimisation", least=0)
    wd: float = setting(0.01, "AdamW weight decay", role="optimisation", least=0)
    wd_norm_bias: bool = setting(True, "also decay norm weights and biases (off: timm's default, decay only "
                                 "weights with 2+ dimensions)", role="optimisation", flag=None)
    opt_eps: float = setting(1e-8, "AdamW epsilon", role="optimisation", above=0)
    clip_norm: Optional[float] = setting(help="clip the gradient norm to this value", role="optimisation", least=0)
    label_smoothing: float = setting(0.0, role="optimisation", least=0, below=1)
    head_l2: float = setting(0.0, "coupled L2 penalty: adds this times the sum of squared classifier weights to the "
                             "loss (Keras kernel_regularizer)", role="optimisation", least=0)
    pretrained: Optional[str] = setting(help="initial weights: an isoconv run/checkpoint, a timm or original-layout "
                                        "state dict (classifier replaced if needed)", role="optimisation",
                                        resume_may_change=True, metavar="PATH")
    # augmentation (reference convmixer-cifar10 defaults)
    no_aug: bool = setting(False, "normalize only", role="augmentation")
    scale: float = setting(0.75, "RandomResizedCrop lower scale bound (1 = no crop)", role="augmentation", above=0,
                           most=1)
    crop_ratio: float = setting(1.0, "RandomResizedCrop aspect ratios [1/R, R] (timm: 4/3)", role="augmentation",
                                least=1)
    translate: int = setting(0, "random translation up to N pixels (RandomCrop with zero padding N)",
                             role="augmentation", least=0)
    hflip: bool = setting(True, "random horizontal flip", role="augmentation", flag=None)
    vflip: bool = setting(False, "random vertical flip", role="augmentation")
    rotate: float = setting(0.0, "random rotation, uniform in [-D, D] degrees", role="augmentation", least=0,
                            most=180)
    zoom: float = setting(0.0, "random zoom in and out: scale uniform in [1-Z, 1+Z]", role="augmentation", least=0,
                          most=0.99)
    shift: float = setting(0.0, "random shift up to this fraction of the image side", role="augmentation", least=0,
                           most=1)
    affine_fill: float = setting(0.0, "gray level of pixels that rotation/zoom/shift uncover", role="augmentation",
                                 least=0, most=255)
    affine_interpolation: str = setting("nearest", "how rotation/zoom/shift sample pixels", role="augmentation",
                                        choices=INTERPOLATIONS)
    affine_fill_mode: str = setting("constant", "what rotation/zoom/shift put where they uncover the image: "
                                    "--affine-fill (torchvision), the nearest edge pixel or the reflection about the "
                                    "edge (Keras' fill modes)", role="augmentation", choices=FILL_MODES)
    zoom_mode: str = setting("image", "--zoom scales the image by U[1-Z, 1+Z] (torchvision RandomAffine), or the "
                             "sampled region (Keras: image scale 1/U[1-Z, 1+Z]), the same on both axes (RandomZoom) "
                             "or independently in x and y (ImageDataGenerator)", role="augmentation",
                             choices=ZOOM_MODES)
    fractional_shift: bool = setting(False, "--shift by fractions of a pixel (Keras) instead of whole pixels "
                                     "(torchvision)", role="augmentation")
    ra_n: int = setting(1, "RandAugment ops per image (0 = off)", role="augmentation", least=0)
    ra_m: int = setting(8, "RandAugment magnitude, 0..30", role="augmentation", least=0, most=30)
    jitter: float = setting(0.1, "ColorJitter brightness/contrast/saturation", role="augmentation", least=0)
    reprob: float = setting(0.25, "RandomErasing probability", role="augmentation", least=0, most=1)
    erase_mode: str = setting("const", "RandomErasing fill: zeros, or per-pixel normal noise (timm's pixel mode)",
                              role="augmentation", choices=ERASE_MODES)
    erase_after_mix: bool = setting(False, "erase after Mixup/CutMix, on the mixed batch (timm's order)",
                                    role="augmentation")
    erase_max_area: float = setting(0.33, "RandomErasing largest area fraction", role="augmentation", above=0.02,
                                    most=1)
    mixup: float = setting(0.0, "Mixup alpha (0 = off)", role="augmentation", least=0, stage="mix")
    cutmix: float = setting(0.0, "CutMix alpha (0 = off)", role="augmentation", least=0, stage="mix")
    mix_prob: float = setting(1.0, "probability of mixing a batch", role="augmentation", least=0, most=1, stage="mix")
    mix_switch_prob: float = setting(0.5, "probability of CutMix when both are on", role="augmentation", least=0,
                                     most=1, stage="mix")
    mix_mode: str = setting("batch", "Mixup/CutMix: one draw per batch, or per image (timm's elem mode)",
                            role="augmentation", choices=MIX_MODES, stage="mix")
    # engine
    amp: str = setting("auto", "autocast precision (auto: bf16/fp16 on GPUs; on CPUs with bf16 instructions the "
                       "faster of fp32 and bf16, measured once and cached; else fp32)", role="engine",
                       choices=AMP_CHOICES)
    cuda_amp: Optional[str] = setting(help="precision on a CUDA device when --amp is auto: recipes that reproduce a "
                                      "published run pin its precision (fp16, or off for fp32)", role="engine",
                                      choices=("bf16", "fp16", "off"))
    channels_last: bool = setting(True, "channels-last memory format", role="engine", both=True)
    compile: bool = setting(False, "torch.compile the model (compile time reported separately)", role="runtime")
    sync_bn: bool = setting(False, "BatchNorm statistics over the global batch under torchrun/DDP (no effect alone)",
                            role="engine")
    seed: int = setting(0, role="engine")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", role="runtime")
    eval_every: int = setting(1, "evaluate every N epochs (always after the last)", role="engine", above=0)
    eval_start: Optional[int] = setting(help="first epoch evaluated on the --eval-every schedule (default N); the "
                                        "summary gives the best and the last scheduled evaluation besides the "
                                        "final weights' (simple-convnext evaluated after epochs 1, 11, ..., 91)",
                                        role="engine", above=0)
    ckpt_every_steps: int = setting(0, "also checkpoint every N steps inside an epoch (0 = only at epoch ends)",
                                    role="runtime", least=0)
    keep_every: int = setting(0, "also keep the checkpoint of every N-th epoch as RUN/epoch-NNN.pt (0 = only the "
                              "latest)", role="runtime", least=0)
    ckpt_every_minutes: float = setting(10.0, "also checkpoint inside an epoch when this many minutes passed since "
                                        "the last checkpoint (0 = off), so a long epoch loses minutes, not an epoch",
                                        role="runtime", least=0)
    skip_nonfinite: bool = setting(False, "skip (and count) steps whose loss is not finite instead of stopping",
                                   role="engine")
    tensorboard: bool = setting(False, "also log every scalar to RUN_DIR/tensorboard", role="runtime")
    track: Optional[str] = setting(help="also track the run (settings, per-epoch metrics, summary, plots, run folder) "
                                   "in MLflow", role="runtime", choices=TRACK_CHOICES)
    tracking_uri: Optional[str] = setting(help="MLflow tracking server or store for --track (default: a local "
                                          "mlruns/ folder)", role="runtime", metavar="URI")
    out: Optional[str] = setting(help="run directory (default runs/<timestamp>-<model>)", role="runtime")
    compile_mode: str = setting("default", "torch.compile mode with --compile: default, reduce-overhead (CUDA "
                                "graphs on a GPU) or max-autotune (longer compile, tuned kernels)", role="runtime",
                                choices=COMPILE_MODES)
    time_budget: Optional[float] = setting(help="stop cleanly (checkpoint written, resumable) at the first epoch end "
                                           "from which one more epoch would pass this many seconds since training "
                                           "started", role="runtime", above=0, metavar="SECONDS")
    # provenance (not training settings)
    recipe: Optional[str] = setting(role="provenance", flag=False)
    description: str = setting("", role="provenance", flag=False)
    note: str = setting("", role="provenance", flag=False)  # how a recipe differs from its source, and why
    published: dict = setting({}, role="provenance", flag=False)

    def model_overrides(self) -> dict[str, Any]:
        """Model-constructor keyword overrides that were explicitly set."""
        return {f.metadata["model_kwarg"]: getattr(self, f.name) for f in fields(self)
                if f.metadata["model_kwarg"] and getattr(self, f.name) is not None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        for f in fields(self):
            check_value(f, getattr(self, f.name))
        return self


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_value(f: dataclasses.Field, v: Any) -> None:
    """The checks a field's metadata declares; the message names the flag and the accepted values."""
    m, flag = f.metadata, flag_name(f.name)
    if v is None:
        if "Optional" in str(f.type):
            return
        raise ConfigError(f"{flag} needs a value ({_TYPE_WORDS[_value_kind(f)]}), got nothing (null)")
    check_type(f, v)
    if m["choices"] and v not in m["choices"]:
        raise ConfigError(f"{flag} must be one of {', '.join(m['choices'])}, got {v!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    if v != v or v in (float("inf"), float("-inf")):
        raise ConfigError(f"{flag} must be finite, got {v}")
    above, least, most, below = m["above"], m["least"], m["most"], m.get("below")
    if least is not None and most is not None and not least <= v <= most:
        span = f"{least:g}..{most:g}" if "int" in str(f.type) else f"[{least:g}, {most:g}]"
        raise ConfigError(f"{flag} must be in {span}, got {v}")
    if above is not None and most is not None and not above < v <= most:
        raise ConfigError(f"{flag} must be in ({above:g}, {most:g}], got {v}")
    if least is not None and below is not None and not least <= v < below:
        raise ConfigError(f"{flag} must be in [{least:g}, {below:g}), got {v}")
    if above is not None and below is not None and not above < v < below:
        raise ConfigError(f"{flag} must be a fraction in ({above:g}, {below:g}), got {v}")
    if v <= 0 and (above == 0 or (least is not None and least > 0)):
        raise ConfigError(f"{flag} must be positive, got {v}")
    if least == 0 and v < 0:
        raise ConfigError(f"{flag} must be >= 0, got {v}")
    if least is not None and least > 0 and v < least:
        extra = " (BatchNorm needs two images)" if f.name == "batch_size" else ""
        raise ConfigError(f"{flag} must be at least {least:g}{extra}, got {v}")


_TYPE_WORDS = {int: "a whole number", float: "a number", str: "a text", bool: "true or false",
               dict: "a mapping"}
# the largest value torch, numpy and Python's random all take as a seed
SEED_MAX = 2 ** 32 - 1


def _value_kind(f: dataclasses.Field) -> type:
    hint = str(f.type)
    return next((t for name, t in (("bool", bool), ("int", int), ("float", float), ("dict", dict)) if name in hint),
                str)


def check_type(f: dataclasses.Field, v: Any) -> None:
    """A value of the field's declared type, whatever it came from (a recipe, --set, a flag, a saved config):
    YAML reads `1e12` and `"0.05"` as text, and `true` is not a number of epochs."""
    kind, flag = _value_kind(f), flag_name(f.name)
    ok = {bool: lambda: isinstance(v, bool),
          int: lambda: isinstance(v, int) and not isinstance(v, bool),
          float: lambda: isinstance(v, (int, float)) and not isinstance(v, bool),
          dict: lambda: isinstance(v, dict),
          str: lambda: isinstance(v, str)}[kind]()
    if not ok:
        hint = ""
        if isinstance(v, str) and kind in (int, float):
            try:
                number = float(v)
                if kind is float or number.is_integer():
                    hint = f"; YAML reads {v} as text: write {int(number) if kind is int else number!r} without quotes"
            except (ValueError, OverflowError):
                pass
        raise ConfigError(f"{flag} must be {_TYPE_WORDS[kind]}, got {v!r} ({type(v).__name__}){hint}")
    if f.name == "seed" and not 0 <= v <= SEED_MAX:
        raise ConfigError(f"{flag} must be in 0..{SEED_MAX}, got {v}")


SETTINGS: dict[str, dataclasses.Field] = {f.name: f for f in fields(TrainConfig)}
RUNTIME_FIELDS = frozenset(n for n, f in SETTINGS.items() if f.metadata["role"] in RUNTIME_ROLES)
RESUME_FREE_FIELDS = RUNTIME_FIELDS | {n for n, f in SETTINGS.items() if f.metadata["resume_may_change"]}
MODEL_KWARGS = {n: f.metadata["model_kwarg"] for n, f in SETTINGS.items() if f.metadata["model_kwarg"]}
# the keyword arguments of the augmentation pipelines (BatchAugment, torchvision_train_transform)
TRANSFORM_FIELDS = tuple(n for n, f in SETTINGS.items()
                         if f.metadata["role"] == "augmentation" and f.metadata.get("stage") != "mix")


def config_differences(old: dict, new: dict, ignore=RESUME_FREE_FIELDS) -> list[str]:
    """`key: old -> new` for every setting (outside `ignore`) whose value differs; missing keys take defaults."""
    defaults = TrainConfig().to_dict()
    keys = sorted((set(old) | set(new)) - set(ignore))
    pairs = {k: (old.get(k, defaults.get(k)), new.get(k, defaults.get(k))) for k in keys}
    # "auto" asks the machine to choose: it agrees with whatever a run chose (runs record the choice)
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in pairs.items() if a != b and "auto" not in (a, b)]


CONFIG_KEYS = tuple(SETTINGS)


def _value_type(f: dataclasses.Field):
    hint = str(f.type)
    return next((t for name, t in (("int", int), ("float", float), ("str", str)) if name in hint), str)


def add_setting_flags(parser: argparse.ArgumentParser, names: Optional[tuple[str, ...]] = None) -> None:
    """One flag per setting (or per setting in `names`), in argparse groups by role. Every flag defaults to None
    (not given), so a recipe's value is only overridden by what the user typed."""
    groups = {}
    for f in SETTINGS.values():
        m = f.metadata
        if m["flag"] is False or (names is not None and f.name not in names):
            continue
        group = groups.get(m["role"]) or groups.setdefault(m["role"], parser.add_argument_group(m["role"]))
        help_text = m["help"] or None
        if m.get("both"):
            group.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif m["flag"] is None:
            group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const", const=False,
                               help=help_text)
        elif isinstance(f.default, bool):
            group.add_argument(flag_name(f.name), action="store_const", const=True, help=help_text)
        else:
            group.add_argument(flag_name(f.name), type=_value_type(f), choices=m["choices"], help=help_text,
                               metavar=m.get("metavar"))


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a parser made by add_setting_flags read (None: not given)."""
    return {name: getattr(args, name) for name in SETTINGS if hasattr(args, name)}


def setting_tokens(name: str, value: Any, has_flag=lambda name: True) -> list[str]:
    """The command-line tokens that set `name` to `value`: its flag where it has one (`has_flag(name)`),
    else `--set name=value` (YAML)."""
    f = SETTINGS[name]
    if has_flag(name) and f.metadata["flag"] is not False:
        if f.metadata["flag"] is None and value is False:
            return ["--no-" + name.replace("_", "-")]
        if isinstance(f.default, bool) and value is True and not f.metadata.get("both"):
            return [flag_name(name)]
        if not isinstance(value, (bool, dict, list)) and value is not None:
            return [flag_name(name), str(value)]
    return ["--set", f"{name}={yaml_value(value)}"]


def yaml_value(value: Any) -> str:
    """A value as YAML reads it back: plain strings stay plain, the rest is JSON (a subset of YAML)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], source: str) -> TrainConfig:
    """Return a copy of cfg with overrides applied; unknown keys are an error naming the source."""
    for key in overrides:
        if key not in CONFIG_KEYS:
            raise ConfigError(f"unknown setting {key!r} in {source}{suggest(key, CONFIG_KEYS)}")
    # YAML 1.1 reads a bare `off` as False: give choice settings that accept "off" the word back
    overrides = {k: "off" if v is False and "off" in (SETTINGS[k].metadata["choices"] or ()) else v
                 for k, v in overrides.items()}
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
