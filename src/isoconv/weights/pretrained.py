"""`--pretrained PATH`: initial weights from isoconv, timm or the original ConvMixer/ConvNeXt code.

Recognised layouts (tensor names; the values are the same tensors in every layout):

* isoconv ConvMixer = timm ``ConvMixer``: ``stem.0``, ``blocks.N.0.fn.0``, ``blocks.N.1``, ``head``.
* the paper's flat ConvMixer ``nn.Sequential``: ``0`` (patch conv), ``2`` (BN), ``3+i.*`` (block i),
  the last ``Linear`` (head) after pooling and flatten; the ConvMixer-XL study's ``CM`` checkpoints (its Vanilla
  rows and CM-XL-NoSkip) use it too.
* the ConvMixer-XL study's grouped ``CM-XL`` checkpoints (CM-XL, CM-XL-Skip): group g at ``3+g``, its block j at
  ``3+g.0.fn.j.*``; they fit a model whose ``skip_period`` is the number of groups (a note says so otherwise).
* isoconv ConvNeXt: ``stem``, ``stages.N.downsample``, ``stages.N.blocks.M.{conv_dw,norm,fc1,fc2,gamma}``,
  ``head_norm``, ``head``.
* timm ``ConvNeXt``: as isoconv but ``mlp.fc1``/``mlp.fc2`` and ``head.norm``/``head.fc`` (1x1-conv MLPs of
  ``conv_mlp=True`` are reshaped to Linear weights).
* facebookresearch ConvNeXt: ``downsample_layers.0`` (stem), ``downsample_layers.N``,
  ``stages.N.M.{dwconv,norm,pwconv1,pwconv2,gamma}``, ``norm``, ``head``.
* the simple-convnext seed: ``downsample_layers.N`` as above, ``stage_layers.N.blocks.M.block.{0,2,3,5}``,
  ``gamma`` of shape (C, 1, 1), ``cls.0`` (norm), ``cls.1`` (head); its saved file ``{'model_state': ...}`` too.

The seeds' own layouts are converted by `models/seed_layouts.py`.

The classifier is replaced (left at its fresh initialisation) when the class count differs; any other
difference is an error naming a mismatching tensor and the architecture the file holds.
"""
from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..config import TrainConfig, apply_overrides
from ..errors import UserError
from ..rundir import CHECKPOINT_NAME
from ..models import ConvMixer, ConvNeXt, build_model
from ..models.seed_layouts import SEED_STATE_KEYS, simple_convnext_names, xl_skip_period, xl_study_names
from . import checkpoint as checkpoint_module
from .files import model_format, read_safetensors, strip_wrapper_prefixes

log = logging.getLogger(__name__)

HEAD_KEYS = ("head.weight", "head.bias")
STATE_DICT_KEYS = ("model", "state_dict", *SEED_STATE_KEYS, "model_ema", "state_dict_ema", "module")
Rules = list[tuple[str, str]]

# (pattern, replacement) pairs; the first matching pattern renames a key, keys matching none keep their name.
TIMM_CONVNEXT: Rules = [
    (r"^(stages\.\d+\.blocks\.\d+\.)mlp\.(fc[12]\.)", r"\1\2"),
    (r"^head\.norm\.", "head_norm."),
    (r"^head\.fc\.", "head."),
]
ORIGINAL_DOWNSAMPLING: Rules = [
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
]
FACEBOOK_CONVNEXT: Rules = ORIGINAL_DOWNSAMPLING + [
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.(norm\.|gamma$)", r"stages.\1.blocks.\2.\3"),
    (r"^norm\.", "head_norm."),
]
@dataclass(frozen=True)
class Layout:
    name: str
    family: str  # "convmixer" or "convnext"
    rename: Callable[[dict[str, torch.Tensor]], dict[str, str]]  # source key -> model key


@dataclass
class PretrainedReport:
    """Which tensors came from the file and how. Names in `loaded`/`reinitialised` are the model's, in
    `ignored` the file's; `converted` holds (file name, model name) pairs (renamed and/or reshaped)."""

    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    converted: list[tuple[str, str]] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"pretrained weights from {self.source} ({self.layout}): {len(self.loaded)} tensors loaded, "
               f"{len(self.converted)} converted, {len(self.reinitialised)} re-initialised, "
               f"{len(self.ignored)} ignored"]
        if self.loaded:
            out.append("  loaded: " + ", ".join(compress_names(self.loaded)))
        if self.converted:
            out.append("  converted: " + ", ".join(compress_names([f"{a} -> {b}" for a, b in self.converted])))
        if self.reinitialised:
            out.append("  re-initialised: " + ", ".join(compress_names(self.reinitialised)))
        if self.ignored:
            out.append("  ignored (in the file, not used): " + ", ".join(compress_names(self.ignored)))
        out.extend(f"  note: {n}" for n in self.notes)
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


INDEX_PATTERNS = [  # (pattern, replacement) that star a block or stage index
    (re.compile(r"(^|\s)\d+(?=\.)"), r"\1*"),  # the leading index of flat nn.Sequential keys ("3.0.fn.0.weight")
    (re.compile(r"\b(blocks|stages|stage_layers|downsample_layers)\.\d+"), r"\1.*"),
    (re.compile(r"\b(stages\.\*)\.\d+\.(dwconv|norm|pwconv|gamma)"), r"\1.*.\2"),  # facebookresearch blocks
]


def compress_names(names: list[str]) -> list[str]:
    """Collapse names that differ only in block/stage indices, keeping the order of first appearance:
    blocks.0.1.weight .. blocks.7.1.weight -> 'blocks.*.1.weight (x8)'."""
    groups: dict[str, list[str]] = {}
    for name in names:
        pattern = name
        for regex, repl in INDEX_PATTERNS:
            pattern = regex.sub(repl, pattern)
        groups.setdefault(pattern, []).append(name)
    return [members[0] if len(members) == 1 else f"{pattern} (x{len(members)})"
            for pattern, members in groups.items()]


# ----------------------------------------------------------------------------- reading the file

def read_weights(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]], str]:
    """(state dict, isoconv TrainConfig dict or None, format: run, checkpoint or safetensors)."""
    path = Path(path)
    fmt = model_format(path)
    if fmt in ("onnx", "torchscript"):
        raise UserError(f"--pretrained {path}: an exported {fmt} model cannot seed training; pass its run directory "
                        f"or a .safetensors / .pt file")
    if fmt == "safetensors":
        state, meta = read_safetensors(path)
        return strip_wrapper_prefixes(state), (meta.config if meta else None), fmt
    file = path / CHECKPOINT_NAME if fmt == "run" else path
    obj = load_torch_file(file)
    state = strip_wrapper_prefixes(find_state_dict(obj, file))
    config = obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
    return state, config, fmt


def load_torch_file(path: Path) -> Any:
    """A torch.save file (isoconv's checksummed checkpoints included), loaded with weights_only=True."""
    magic = getattr(checkpoint_module, "MAGIC", None)
    with open(path, "rb") as f:
        head = f.read(64)
    if magic and head.startswith(magic):
        return checkpoint_module.load_checkpoint(path)
    checkpoint_module.check_weights_file(path, "a weights file", "pass a run folder, an isoconv checkpoint, a "
                                         ".safetensors file or a torch.save state dict")
    try:
        return checkpoint_module.torch_load(path)
    except pickle.UnpicklingError as e:
        match = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if match:  # a pickled class or function (a whole module, an optimizer...), refused by weights_only
            raise UserError(f"refusing to load {path}: it holds a {match.group(1)} object, not only tensors and "
                            f"plain data; save its state_dict() with torch.save and pass that file") from None
        raise UserError(f"cannot read {path} as a PyTorch weights file (not a torch.save file, or corrupt)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UserError(f"cannot read {path} as a PyTorch weights file ({type(e).__name__}); the file is truncated "
                        f"or not a torch.save file") from None


def is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if is_tensor_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if is_tensor_dict(obj.get(key)):
                return obj[key]
    raise UserError(f"{path} holds no state dict of tensors (looked at the top level and under "
                    f"{', '.join(STATE_DICT_KEYS)}); save model.state_dict() and pass that file")


# ----------------------------------------------------------------------------- layouts

def rule_renamer(rules: Rules) -> Callable[[dict[str, torch.Tensor]], dict[str, str]]:
    compiled = [(re.compile(p), r) for p, r in rules]

    def rename(state: dict[str, torch.Tensor]) -> dict[str, str]:
        out = {}
        for key in state:
            for pattern, repl in compiled:
                new, n = pattern.subn(repl, key, count=1)
                if n:
                    out[key] = new
                    break
            else:
                out[key] = key
        return out

    return rename


def seed_renamer(names: Callable[[dict[str, torch.Tensor]], dict[str, str]],
                 layout: str) -> Callable[[dict[str, torch.Tensor]], dict[str, str]]:
    """A seed_layouts names function whose ValueError (a key the layout cannot hold) becomes a UserError."""
    def rename(state: dict[str, torch.Tensor]) -> dict[str, str]:
        try:
            return names(state)
        except ValueError as e:
            raise UserError(f"--pretrained: the weights look like the {layout} but do not fit it: {e}") from None

    return rename


XL_GROUPED = "ConvMixer-XL study's grouped (CM-XL) layout"
FLAT_CONVMIXER = "original flat nn.Sequential ConvMixer layout"
LAYOUTS: list[tuple[str, Layout]] = [  # (a key pattern that identifies the layout, layout)
    (r"^stage_layers\.\d+\.blocks\.\d+\.block\.", Layout("simple-convnext layout", "convnext",
                                                        seed_renamer(simple_convnext_names, "simple-convnext layout"))),
    (r"^stages\.\d+\.\d+\.dwconv\.", Layout("original facebookresearch ConvNeXt layout", "convnext",
                                           rule_renamer(FACEBOOK_CONVNEXT))),
    (r"^stages\.\d+\.blocks\.\d+\.mlp\.fc1\.", Layout("timm ConvNeXt layout", "convnext",
                                                     rule_renamer(TIMM_CONVNEXT))),
    (r"^stages\.\d+\.blocks\.\d+\.fc1\.", Layout("isoconv ConvNeXt layout", "convnext", rule_renamer([]))),
    (r"^blocks\.\d+\.0\.fn\.0\.weight$", Layout("isoconv/timm ConvMixer layout", "convmixer", rule_renamer([]))),
    (r"^\d+\.0\.fn\.\d+\.0\.fn\.0\.weight$", Layout(XL_GROUPED, "convmixer",
                                                    seed_renamer(xl_study_names, XL_GROUPED))),
    (r"^\d+\.0\.fn\.0\.weight$", Layout(FLAT_CONVMIXER, "convmixer", seed_renamer(xl_study_names, FLAT_CONVMIXER))),
]
SUPPORTED = ("isoconv runs/checkpoints/.safetensors, timm ConvMixer and ConvNeXt state dicts, the original flat "
             "ConvMixer nn.Sequential, the ConvMixer-XL study's grouped CM-XL layout, the original facebookresearch "
             "ConvNeXt and the simple-convnext layout")


def detect_layout(state: dict[str, torch.Tensor], source: str) -> Layout:
    for pattern, layout in LAYOUTS:
        if any(re.match(pattern, k) for k in state):
            return layout
    first = ", ".join(list(state)[:4])
    raise UserError(f"--pretrained {source}: unrecognised weight names (first: {first}); supported are {SUPPORTED}")


def model_family(model: nn.Module) -> str:
    if isinstance(model, ConvMixer):
        return "convmixer"
    if isinstance(model, ConvNeXt):
        return "convnext"
    raise UserError(f"--pretrained supports ConvMixer and ConvNeXt models, not {type(model).__name__}")


def architecture(family: str, shapes: dict[str, tuple[int, ...]]) -> str:
    """A one-line description of the architecture a set of (isoconv-named) tensor shapes implies."""
    def count(pattern: str) -> int:
        return sum(1 for k in shapes if re.match(pattern, k))

    if "stem.0.weight" not in shapes:
        return "an unknown architecture (no stem weights)"
    stem = shapes["stem.0.weight"]
    if family == "convmixer":
        dw = shapes.get("blocks.0.0.fn.0.weight", (0,))
        depth = count(r"^blocks\.\d+\.0\.fn\.0\.weight$")
        return f"ConvMixer dim {stem[0]}, depth {depth}, kernel {dw[-1]}, patch {stem[-1]}"
    stages = sorted({int(m.group(1)) for k in shapes for m in [re.match(r"^stages\.(\d+)\.blocks\.", k)] if m})
    depths = [count(rf"^stages\.{s}\.blocks\.\d+\.conv_dw\.weight$") for s in stages]
    dims = [shapes.get(f"stages.{s}.blocks.0.conv_dw.weight", (0,))[0] for s in stages]
    kernel = shapes.get("stages.0.blocks.0.conv_dw.weight", (0,))[-1]
    return f"ConvNeXt depths {depths}, dims {dims}, patch {stem[-1]}, kernel {kernel}"


# ----------------------------------------------------------------------------- matching

def squeezed(shape) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def load_pretrained_into(model: nn.Module, path: Union[str, Path]) -> PretrainedReport:
    """Copy the weights in `path` into `model` (in place) and return (and log) what was done with each tensor."""
    state, source_config, kind = read_weights(path)
    family = model_family(model)
    layout = detect_layout(state, str(path))
    layout_name = f"isoconv {kind}, {layout.name}" if source_config else layout.name
    if layout.family != family:
        raise UserError(f"--pretrained {path} holds {layout.family} weights ({layout.name}) but the model is a "
                        f"{family}; choose a {layout.family} preset (`isoconv models`) or other weights")
    names = layout.rename(state)
    converted = {new: (old, state[old]) for old, new in names.items()}
    target = model.state_dict()
    report = PretrainedReport(str(path), layout_name)
    new_state = match_tensors(target, converted, report, family, str(path))
    model.load_state_dict(new_state, strict=True)
    report.notes.extend(parameter_free_differences(model, source_config))
    report.notes.extend(group_skip_difference(model, layout, state))
    for line in report.lines():
        log.info(line)
    return report


def match_tensors(target: dict[str, torch.Tensor], converted: dict[str, tuple[str, torch.Tensor]],
                  report: PretrainedReport, family: str, source: str) -> dict[str, torch.Tensor]:
    """The model's new state dict; fills the report; raises UserError when the architectures differ."""
    head_keys = [k for k in HEAD_KEYS if k in target]  # none when the model's head is an Identity
    replace_head = any(k not in converted or converted[k][1].shape != target[k].shape for k in head_keys)
    problems: list[str] = []
    new_state = {}
    for key, current in target.items():
        if key in head_keys and replace_head:
            new_state[key] = current
            report.reinitialised.append(key)
            if key in converted:
                report.ignored.append(converted[key][0])
            continue
        if key not in converted:
            if key.endswith("num_batches_tracked"):  # a counter some exports leave out
                new_state[key] = current
                report.reinitialised.append(key)
            else:
                problems.append(f"{key} is missing from the file")
            continue
        old, tensor = converted[key]
        if tensor.shape != current.shape and squeezed(tensor.shape) != squeezed(current.shape):
            problems.append(f"{key} is {tuple(tensor.shape)} in the file but {tuple(current.shape)} in the model")
            continue
        new_state[key] = tensor.reshape(current.shape).to(current.dtype)
        if old == key and tensor.shape == current.shape:
            report.loaded.append(key)
        else:
            report.converted.append((old, key))
    extra = [k for k in converted if k not in target]
    report.ignored.extend(converted[k][0] for k in extra if k in HEAD_KEYS)
    extra = [k for k in extra if k not in HEAD_KEYS]
    problems.extend(f"{converted[k][0]} has no place in the model" for k in extra)
    if problems:
        file_arch = architecture(family, {k: tuple(t.shape) for k, (_, t) in converted.items()})
        model_arch = architecture(family, {k: tuple(t.shape) for k, t in target.items()})
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"--pretrained {source} does not fit the model: {problems[0]}{more}; the file holds "
                        f"{file_arch}, the model is {model_arch}; pick the matching --model/--dim/--depth/--kernel/"
                        f"--patch")
    if replace_head:
        classes = converted["head.weight"][1].shape[0] if "head.weight" in converted else None
        ours = target["head.weight"].shape[0] if "head.weight" in target else 0
        report.notes.append(f"classifier replaced: the file has {classes} classes, the model {ours}" if classes
                            else f"classifier initialised fresh: the file has none ({ours} classes here)")
    return new_state


def group_skip_difference(model: nn.Module, layout: Layout, state: dict[str, torch.Tensor]) -> list[str]:
    """The XL study's files say by their layout whether the net had group skips (grouped: one per group, flat:
    none); a model built otherwise loads the same tensors but computes another function."""
    if layout.name not in (XL_GROUPED, FLAT_CONVMIXER) or not hasattr(model, "config"):
        return []
    theirs, ours = xl_skip_period(state), model.config.get("skip_period", 0)
    if theirs == ours:
        return []
    how = f"{theirs} inter-block skip groups" if theirs else "no inter-block skips"
    return [f"the weights come from a ConvMixer with {how} (skip_period {theirs}), this model uses skip_period "
            f"{ours}: pass --skip-period {theirs} for the network the weights were trained as"]


def foreign_layout(path: Union[str, Path]) -> Optional[str]:
    """The layout name of a weights file without isoconv metadata that --pretrained reads, else None."""
    try:
        state, config, _ = read_weights(path)
        return None if config else detect_layout(state, str(path)).name
    except UserError:
        return None


def parameter_free_differences(model: nn.Module, source_config: Optional[dict[str, Any]]) -> list[str]:
    """Settings that change the function but not the tensors (activation, ConvMixer-XL skips) of an isoconv source."""
    if not source_config or not hasattr(model, "config"):
        return []
    try:
        cfg = apply_overrides(TrainConfig(), source_config, "pretrained config")
        with torch.device("meta"):
            theirs = build_model(cfg, num_classes=1, image_size=None).config
    except UserError:
        return []
    return [f"the weights were trained with {k} {theirs[k]!r}, this model uses {model.config[k]!r}"
            for k in ("activation", "skip_period") if k in theirs and theirs[k] != model.config.get(k)]
