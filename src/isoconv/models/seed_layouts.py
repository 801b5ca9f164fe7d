"""Convert the seed projects' saved weights into isoconv state dicts (pure functions, no I/O).

* ConvMixer-XL study (datacrisis/ConvMixerXL), saved as ``{'model_state_dict': nn.DataParallel(model).state_dict(),
  'optimizer_state_dict': ...}``, so every key starts with ``module.``:

  - ``CM`` (the Vanilla rows and CM-XL-NoSkip): the paper's flat ``nn.Sequential``: ``0`` patch conv, ``2`` BN,
    ``3+i`` block i (``.0.fn.0`` depthwise conv, ``.0.fn.2`` BN, ``.1`` pointwise conv, ``.3`` BN), then pooling,
    flatten and ``3+depth+2`` the Linear head.
  - ``CM-XL`` (CM-XL and CM-XL-Skip): the same stem and head, but ``3+g`` is group g, an
    ``nn.Sequential(Residual(nn.Sequential(*blocks)))``; block j of group g is ``3+g.0.fn.j.*`` with the block's
    own names after it, and the head is ``3+skip_period+2``.  Group g block j is isoconv block
    ``g * blocks_per_group + j``; the isoconv model must be built with ``skip_period`` = the number of groups
    (:func:`xl_skip_period`).

* simple-convnext (filipbasara0/simple-convnext), saved as ``{'model_state': model.state_dict(),
  'optimizer_state': ...}``: ``downsample_layers.0`` stem, ``downsample_layers.N`` (N >= 1) LN + 2x2 conv,
  ``stage_layers.N.blocks.M.block.{0,2,3,5}`` (dwconv, LN, fc1, fc2) and ``.gamma`` of shape (C, 1, 1),
  ``cls.0`` head norm, ``cls.1`` head.

The tensors are not copied; only renamed (and gamma reshaped to isoconv's (C,)). The ``*_names`` functions give the
renaming alone (file name -> isoconv name, for a state dict without the ``module.`` prefix); `weights/pretrained.py`
uses them for ``--pretrained``, the ``*_to_isoconv`` functions apply them.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional

from torch import Tensor

__all__ = [
    "seed_state_dict",
    "strip_module_prefix",
    "is_xl_study_layout",
    "is_xl_nested_layout",
    "xl_skip_period",
    "xl_study_names",
    "xl_study_to_isoconv",
    "is_simple_convnext_layout",
    "simple_convnext_names",
    "simple_convnext_to_isoconv",
]

StateDict = dict[str, Tensor]

SEED_STATE_KEYS = ("model_state_dict", "model_state")  # XL study, simple-convnext

_XL_NESTED = re.compile(r"^(\d+)\.0\.fn\.(\d+)\.(.+)$")  # group g, block j, the block's own name
_XL_GROUP_REST = re.compile(r"^0\.fn\.(\d+)\.(.+)$")  # a group's key after its index: block j, its own name
_XL_NESTED_MARK = re.compile(r"^\d+\.0\.fn\.\d+\.0\.fn\.0\.weight$")
_FLAT_BLOCK_MARK = re.compile(r"^\d+\.0\.fn\.0\.weight$")
_SIMPLE_MARK = re.compile(r"^stage_layers\.\d+\.blocks\.\d+\.block\.")

_SIMPLE_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r) for p, r in [
        (r"^downsample_layers\.0\.", "stem."),
        (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
        (r"^stage_layers\.(\d+)\.blocks\.(\d+)\.block\.0\.", r"stages.\1.blocks.\2.conv_dw."),
        (r"^stage_layers\.(\d+)\.blocks\.(\d+)\.block\.2\.", r"stages.\1.blocks.\2.norm."),
        (r"^stage_layers\.(\d+)\.blocks\.(\d+)\.block\.3\.", r"stages.\1.blocks.\2.fc1."),
        (r"^stage_layers\.(\d+)\.blocks\.(\d+)\.block\.5\.", r"stages.\1.blocks.\2.fc2."),
        (r"^stage_layers\.(\d+)\.blocks\.(\d+)\.gamma$", r"stages.\1.blocks.\2.gamma"),
        (r"^cls\.0\.", "head_norm."),
        (r"^cls\.1\.", "head."),
    ]
]


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def seed_state_dict(obj: Any) -> StateDict:
    """The model state dict inside a seed's saved file: the object itself if it is a tensor dict, else its
    ``model_state_dict`` (XL study) or ``model_state`` (simple-convnext) entry."""
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in SEED_STATE_KEYS:
            if _is_tensor_dict(obj.get(key)):
                return dict(obj[key])
    raise ValueError(f"no model state dict found (looked at the top level and under {', '.join(SEED_STATE_KEYS)})")


def strip_module_prefix(state: Mapping[str, Tensor]) -> StateDict:
    """Drop the ``module.`` that nn.DataParallel / DistributedDataParallel put before every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


# ----------------------------------------------------------------------------- ConvMixer-XL study

def is_xl_nested_layout(state: Mapping[str, Tensor]) -> bool:
    """True for the study's ``CM-XL`` (grouped) layout, with or without the ``module.`` prefix."""
    return any(_XL_NESTED_MARK.match(k) for k in strip_module_prefix(state))


def is_xl_study_layout(state: Mapping[str, Tensor]) -> bool:
    """True for either of the study's layouts (flat ``CM`` or grouped ``CM-XL``)."""
    keys = strip_module_prefix(state)
    return any(_XL_NESTED_MARK.match(k) or _FLAT_BLOCK_MARK.match(k) for k in keys)


def _xl_groups(state: StateDict) -> dict[int, set[int]]:
    """Group index (position in the outer Sequential) -> block indices inside it, for the grouped layout."""
    groups: dict[int, set[int]] = {}
    for key in state:
        m = _XL_NESTED.match(key)
        if m and _XL_NESTED_MARK.match(key):
            groups.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return groups


def xl_skip_period(state: Mapping[str, Tensor]) -> int:
    """The ``skip_period`` (number of groups) an isoconv ConvMixer needs for these weights; 0 for the flat layout."""
    return len(_xl_groups(strip_module_prefix(state)))


def xl_study_names(state: Mapping[str, Tensor]) -> dict[str, str]:
    """File name -> isoconv ConvMixer name for either of the study's layouts (flat ``CM`` or grouped ``CM-XL``);
    the keys carry no ``module.`` prefix. ValueError for anything else."""
    groups = _xl_groups(dict(state))
    if groups:
        return _xl_nested_names(state, groups)
    if not any(_FLAT_BLOCK_MARK.match(k) for k in state):
        raise ValueError(f"not a ConvMixer-XL study layout (first keys: {', '.join(list(state)[:3])})")
    blocks = {int(k.split(".")[0]) for k in state if _FLAT_BLOCK_MARK.match(k)}
    return _sequential_names(state, max(blocks) + 3,  # after the last block: pooling, flatten, Linear
                             lambda i, rest: f"blocks.{i - 3}.{rest}" if i in blocks else None, "flat ConvMixer")


def _xl_nested_names(state: Mapping[str, Tensor], groups: dict[int, set[int]]) -> dict[str, str]:
    order = sorted(groups)
    if order != list(range(3, 3 + len(order))):
        raise ValueError(f"ConvMixer-XL groups must sit at positions 3.. in the Sequential, found {order}")
    sizes = {len(blocks) for blocks in groups.values()}
    per_group = len(next(iter(groups.values())))
    if len(sizes) != 1 or any(blocks != set(range(per_group)) for blocks in groups.values()):
        raise ValueError(f"ConvMixer-XL groups hold unequal or gapped block sets: "
                         f"{ {g: sorted(b) for g, b in groups.items()} }")

    def block(i: int, rest: str) -> Optional[str]:  # rest of group i's keys: 0.fn.<j>.<the block's own name>
        m = _XL_GROUP_REST.match(rest)
        return f"blocks.{(i - 3) * per_group + int(m.group(1))}.{m.group(2)}" if m and i in groups else None

    return _sequential_names(state, 3 + len(order) + 2, block, "ConvMixer-XL")


def _sequential_names(state: Mapping[str, Tensor], head: int, block: Callable[[int, str], Optional[str]],
                      kind: str) -> dict[str, str]:
    """The study's nn.Sequential: 0 patch conv, 2 BN, blocks (named by `block(index, rest)`), `head` the Linear."""
    out: dict[str, str] = {}
    for key in state:
        index, _, rest = key.partition(".")
        i = int(index) if index.isdigit() else -1
        name = f"stem.{key}" if i in (0, 2) else f"head.{rest}" if i == head else block(i, rest)
        if name is None:
            raise ValueError(f"unexpected key {key!r} in a {kind} state dict")
        out[key] = name
    return out


def xl_study_to_isoconv(obj: Any) -> StateDict:
    """A ConvMixer-XL study checkpoint (the saved dict or its state dict, flat ``CM`` or grouped ``CM-XL``) ->
    isoconv ConvMixer state dict."""
    state = strip_module_prefix(seed_state_dict(obj))
    return {new: state[old] for old, new in xl_study_names(state).items()}


# ----------------------------------------------------------------------------- simple-convnext

def is_simple_convnext_layout(state: Mapping[str, Tensor]) -> bool:
    return any(_SIMPLE_MARK.match(k) for k in strip_module_prefix(state))


def simple_convnext_names(state: Mapping[str, Tensor]) -> dict[str, str]:
    """File name -> isoconv ConvNeXt name for simple-convnext's state dict (no ``module.`` prefix); ValueError for
    anything else. Its ``gamma`` is (C, 1, 1), isoconv's (C,): the caller reshapes."""
    if not is_simple_convnext_layout(state):
        raise ValueError(f"not a simple-convnext layout (first keys: {', '.join(list(state)[:3])})")
    out: dict[str, str] = {}
    for key in state:
        for pattern, repl in _SIMPLE_RULES:
            new, n = pattern.subn(repl, key, count=1)
            if n:
                out[key] = new
                break
        else:
            raise ValueError(f"unexpected key {key!r} in a simple-convnext state dict")
    return out


def simple_convnext_to_isoconv(obj: Any) -> StateDict:
    """simple-convnext's saved ``{'model_state': ..., 'optimizer_state': ...}`` (or the bare state dict) ->
    isoconv ConvNeXt state dict.  gamma (C, 1, 1) becomes (C,)."""
    state = strip_module_prefix(seed_state_dict(obj))
    return {new: state[old].reshape(-1) if new.endswith(".gamma") else state[old]
            for old, new in simple_convnext_names(state).items()}
