"""Named model presets: ``create_model("cm-vanilla", **overrides)``.

A preset is a thin constructor registered with ``@register_model``; the decorator records its
family and default keyword arguments, and the returned function merges overrides into those
defaults, checks that the family accepts every override, and builds the model.

Overrides are constructor keyword arguments of the family's class (``ConvMixer`` or
``ConvNeXt``). An override whose value is ``None`` is ignored ("whatever the preset says").
The shipped presets are data in ``presets.py`` (read without torch by `isoconv models`), registered at the end.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ..config import MODEL_KWARGS, TrainConfig
from ..errors import ConfigError
from .convmixer import ConvMixer
from .convnext import ConvNeXt
from .presets import PRESETS

__all__ = ["register_model", "create_model", "list_models", "model_info", "count_params", "FAMILIES"]

# Family name -> model class; the class's constructor arguments are the accepted overrides.
FAMILIES: dict[str, type[nn.Module]] = {"convmixer": ConvMixer, "convnext": ConvNeXt}


@dataclass(frozen=True)
class _Entry:
    name: str
    family: str
    description: str
    defaults: Mapping[str, Any]
    accepts: Optional[frozenset]  # None: any keyword (the constructor takes **kwargs)
    fn: Callable[..., nn.Module] = field(repr=False)


_REGISTRY: dict[str, _Entry] = {}
_PARAM_CACHE: dict[str, int] = {}


def _accepted_kwargs(fn: Callable[..., Any]) -> Optional[frozenset]:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_model(
    name: str,
    *,
    family: str = "custom",
    defaults: Optional[Mapping[str, Any]] = None,
    description: Optional[str] = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a thin model constructor under ``name``.

    The decorated function is called with the preset ``defaults`` updated by the caller's
    overrides and must return the model. For a known ``family`` ("convmixer", "convnext") the
    overrides must be constructor arguments of that family's class; otherwise they must be
    accepted by the decorated function itself. ``description`` defaults to the docstring's
    first line. Returns the wrapped constructor, so ``cm_vanilla(dim=128)`` works directly.
    """
    key = _normalise(name)
    if key != name:
        raise ConfigError(f"model names are lower-case with hyphens, got {name!r} (use {key!r})")

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ConfigError(f"model {name!r} is already registered")
        accepts = _accepted_kwargs(FAMILIES[family]) if family in FAMILIES else _accepted_kwargs(fn)
        accepts = accepts - {"self"} if accepts is not None else None
        doc = description or (inspect.getdoc(fn) or "").split("\n")[0]
        preset = dict(defaults or {})

        @functools.wraps(fn)
        def constructor(**overrides: Any) -> nn.Module:
            overrides = {k: v for k, v in overrides.items() if v is not None}
            if accepts is not None:
                bad = sorted(set(overrides) - accepts)
                if bad:
                    raise ConfigError(
                        f"model {name!r} ({family}) does not accept {', '.join(repr(b) for b in bad)}; "
                        f"it accepts: {', '.join(sorted(accepts))}"
                    )
            return fn(**{**copy.deepcopy(preset), **overrides})

        _REGISTRY[name] = _Entry(name, family, doc, preset, accepts, constructor)
        return constructor

    return decorator


def _lookup(name: str) -> _Entry:
    if not isinstance(name, str):
        raise ConfigError(f"model name must be a string, got {name!r}")
    entry = _REGISTRY.get(_normalise(name))
    if entry is None:
        close = difflib.get_close_matches(_normalise(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}; `isoconv models` lists them")
    return entry


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build preset ``name``; ``overrides`` are constructor kwargs (``None`` values are ignored)."""
    return _lookup(name).fn(**overrides)


def build_model(cfg: TrainConfig, num_classes: int, image_size: Optional[int]) -> nn.Module:
    """cfg's model preset with cfg's explicit shape overrides, for this many classes and this image size."""
    info = model_info(cfg.model)
    for name, value in cfg.model_overrides().items():
        if info["accepts"] is not None and name not in info["accepts"]:
            setting = next(f for f, kwarg in MODEL_KWARGS.items() if kwarg == name)
            raise ConfigError(f"--{setting.replace('_', '-')} does not apply to model {info['name']!r} "
                              f"({info['family']}); drop it or pick a model that has it (`isoconv models`)")
    return create_model(cfg.model, num_classes=num_classes, image_size=image_size, **cfg.model_overrides())


def with_preset_shape(cfg: TrainConfig) -> TrainConfig:
    """cfg with every model setting left None ("the preset's value") replaced by the preset's value."""
    try:
        defaults = model_info(cfg.model)["defaults"]
    except ConfigError:
        return cfg
    filled = {name: defaults[kwarg] for name, kwarg in MODEL_KWARGS.items()
              if getattr(cfg, name) is None and kwarg in defaults}
    return dataclasses.replace(cfg, **filled)


def list_models() -> list[str]:
    """Registered model names, in registration order (ConvMixers first, then ConvNeXts)."""
    return list(_REGISTRY)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all of them, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_info(name: str) -> dict[str, Any]:
    """Name, family, description, default kwargs, accepted override keys and parameter count.

    The parameter count is for the defaults; it is computed on the meta device (no memory,
    no init cost) and cached.
    """
    entry = _lookup(name)
    if entry.name not in _PARAM_CACHE:
        with torch.device("meta"):
            _PARAM_CACHE[entry.name] = count_params(entry.fn())
    return {
        "name": entry.name,
        "family": entry.family,
        "description": entry.description,
        "defaults": copy.deepcopy(dict(entry.defaults)),
        "accepts": sorted(entry.accepts) if entry.accepts is not None else None,
        "params": _PARAM_CACHE[entry.name],
    }


# ---------------------------------------------------------------------------------------------
# The shipped presets (presets.py holds them as data, for `isoconv models` without torch).

for _preset in PRESETS.values():
    register_model(_preset.name, family=_preset.family, defaults=_preset.defaults,
                   description=_preset.description)(functools.partial(FAMILIES[_preset.family]))
