"""Ablation specs: a YAML file naming a base recipe and a grid or a list of variants.

    description: "what the sweep measures"
    base: cm-vanilla              # recipe every variant starts from (a variant may name its own)
    settings: {epochs: 50}        # TrainConfig keys applied to every variant
    seeds: 1                      # repetitions per variant (`isoconv ablate --seeds N` overrides)
    baseline: NAME                # variant that relative train time is measured against (default: the first)
    note: "printed under the results table"
    grid:                         # every combination, first key outermost ...
      dim: [128, 256]
      depth: [4, 8, 12]
    variants:                     # ... or an explicit list (not both)
      - name: CM-Vanilla-NoAug
        recipe: cm-vanilla-noaug  # optional; other keys are TrainConfig settings
        epochs: 10

A variant's settings are, in order: TrainConfig defaults <- its recipe (or `base`) <- `settings` <- its own keys
<- command-line overrides. Repetition k of a variant trains with seed = (its seed) + k.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import CONFIG_KEYS, TrainConfig, apply_overrides, load_recipe, shipped_or_file, suggest
from ..errors import ConfigError

SPEC_DIR = Path(__file__).resolve().parent.parent / "ablations"
SPEC_KEYS = ("description", "base", "settings", "seeds", "baseline", "note", "grid", "variants")
VARIANT_KEYS = ("name", "recipe")
# Settings `isoconv ablate` has a flag for (the rest are given as --set KEY=VALUE).
ABLATE_FLAGS = ("data_dir", "download", "device", "amp", "test_split", "tensorboard", "track", "tracking_uri")


@dataclass(frozen=True)
class Variant:
    name: str
    recipe: Optional[str]  # recipe name or file; None: TrainConfig defaults
    settings: dict  # the spec's common settings updated by the variant's own
    own: dict  # the variant's own settings (for a grid: its grid point)
    # Show the config's `published` figure only when it belongs to this variant (its own recipe or setting),
    # not when it is inherited from a sweep's base recipe.
    shows_published: bool = False


@dataclass
class AblationSpec:
    name: str
    path: Path
    text: str  # the YAML as read, copied into the sweep directory
    description: str
    note: str
    seeds: int
    baseline: str
    variants: list[Variant] = field(default_factory=list)
    grid_keys: tuple = ()

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ConfigError(f"spec {self.name} has no variant {name!r}{suggest(name, [v.name for v in self.variants])}")


# ----------------------------------------------------------------------------- finding specs

def list_specs() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def spec_path(name_or_file: str) -> Path:
    specs = list_specs()
    return shipped_or_file(name_or_file, SPEC_DIR, specs, file_kind="ablation spec", kind="ablation spec",
                           listing=f"shipped specs: {', '.join(specs)}")


# ----------------------------------------------------------------------------- parsing

def load_spec(name_or_file: str) -> AblationSpec:
    """Read and check a spec: every variant's settings resolve to a valid TrainConfig."""
    path = spec_path(str(name_or_file))
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"ablation spec {path}{where} is not valid YAML; fix the file") from None
    return parse_spec(data, path=path, text=text)


def parse_spec(data: Any, *, path: Path, text: str = "") -> AblationSpec:
    where = f"ablation spec {path}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping with `grid:` or `variants:`, got {type(data).__name__}")
    for key in data:
        if key not in SPEC_KEYS:
            raise ConfigError(f"unknown key {key!r} in {where}{suggest(str(key), SPEC_KEYS)}; "
                              f"allowed: {', '.join(SPEC_KEYS)}")
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"`settings` in {where} must be a mapping of TrainConfig keys, got {settings!r}")
    check_setting_keys(settings, f"`settings` of {where}")
    base = data.get("base")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"`base` in {where} must be a recipe name or file, got {base!r}")
    if ("grid" in data) == ("variants" in data):
        raise ConfigError(f"{where} must have exactly one of `grid:` (all combinations) or `variants:` (a list)")
    if "grid" in data:
        variants, grid_keys = grid_variants(data["grid"], base, settings, where)
    else:
        variants, grid_keys = list_variants(data["variants"], base, settings, where), ()
    seeds = data.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"`seeds` in {where} must be a positive integer, got {seeds!r}")
    baseline = data.get("baseline", variants[0].name)
    names = [v.name for v in variants]
    if baseline not in names:
        raise ConfigError(f"`baseline: {baseline}` in {where} names no variant{suggest(str(baseline), names)}")
    spec = AblationSpec(name=path.stem, path=path, text=text, description=str(data.get("description") or ""),
                        note=str(data.get("note") or ""), seeds=seeds, baseline=baseline, variants=variants,
                        grid_keys=grid_keys)
    for v in variants:
        variant_config(v, where=where)  # every setting must validate before anything runs
    return spec


def check_setting_keys(settings: dict, where: str) -> None:
    for key in settings:
        if key not in CONFIG_KEYS:
            raise ConfigError(f"unknown setting {key!r} in {where}{suggest(str(key), CONFIG_KEYS)}")
        if key == "out":
            raise ConfigError(f"`out` in {where} is not a setting of a sweep's runs (each gets its own folder); "
                              f"pass `isoconv ablate --out DIR` for the sweep folder")


def grid_variants(grid: Any, base: Optional[str], settings: dict, where: str) -> tuple[list[Variant], tuple]:
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"`grid` in {where} must map settings to lists of values, e.g. `depth: [4, 8]`")
    check_setting_keys(grid, f"`grid` of {where}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"`grid.{key}` in {where} must be a non-empty list of values, got {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"`grid.{key}` in {where} repeats a value: {values!r}")
    keys = tuple(grid)
    variants = []
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        name = ",".join(f"{k}={format_value(v)}" for k, v in point.items())
        variants.append(Variant(name=name, recipe=base, settings={**settings, **point}, own=point,
                                shows_published="published" in settings))
    return variants, keys


def list_variants(items: Any, base: Optional[str], settings: dict, where: str) -> list[Variant]:
    if not isinstance(items, list) or not items:
        raise ConfigError(f"`variants` in {where} must be a non-empty list of mappings, each with a `name`")
    variants, dirs = [], {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise ConfigError(f"variant {i + 1} in {where} must be a mapping with a `name`, got {item!r}")
        name = item["name"].strip()
        own = {k: v for k, v in item.items() if k not in VARIANT_KEYS}
        check_setting_keys(own, f"variant {name!r} of {where}")
        d = variant_dirname(name)
        if d in dirs:
            raise ConfigError(f"variants {dirs[d]!r} and {name!r} in {where} need distinct names")
        dirs[d] = name
        variants.append(Variant(name=name, recipe=item.get("recipe", base), settings={**settings, **own}, own=own,
                                shows_published="recipe" in item or "published" in own or "published" in settings))
    return variants


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "-".join(format_value(x) for x in v)
    return str(v)


def variant_dirname(name: str) -> str:
    """A folder name for a variant: characters other than letters, digits and ._=,+- become '_'."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name).strip(".") or "variant"


# ----------------------------------------------------------------------------- configs

def variant_config(variant: Variant, overrides: Optional[dict] = None, where: str = "ablation spec") -> TrainConfig:
    """The variant's TrainConfig (seed not yet offset): defaults <- recipe <- settings <- overrides.

    Unlike `build_config`, an explicit null in the spec is kept (e.g. `clip_norm: null` switches clipping off).
    """
    cfg = TrainConfig()
    if variant.recipe:
        cfg = apply_overrides(cfg, load_recipe(variant.recipe), f"recipe {variant.recipe}")
    cfg = apply_overrides(cfg, variant.settings, f"variant {variant.name!r} of {where}")
    cfg = apply_overrides(cfg, dict(overrides or {}), "the command-line overrides")
    try:
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"variant {variant.name!r} of {where}: {e}") from None


def run_config(variant: Variant, repetition: int, run_dir: Path, overrides: Optional[dict] = None) -> TrainConfig:
    """The config of repetition `repetition` (0-based): seed = variant seed + repetition, out = run_dir."""
    cfg = variant_config(variant, overrides)
    return dataclasses.replace(cfg, seed=cfg.seed + repetition, out=str(run_dir))
