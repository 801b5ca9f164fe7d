"""Tuning specs (`isoconv tune SPEC`): a base recipe, a search space over TrainConfig settings, the objective,
the number of trials, the sampler and the pruner.

    description: "what is tuned"
    base: cpu-quick               # recipe every trial starts from (a file or a shipped name)
    settings: {epochs: 5}         # TrainConfig keys applied to every trial
    space:                        # TrainConfig keys -> a range or a list
      lr_max: {log: [1.0e-4, 1.0e-1]}
      wd: {log: [1.0e-4, 1.0e-1]}
      batch_size: {choice: [64, 128]}
      depth: {int: [4, 12]}
      scale: {float: [0.5, 1.0]}
    trials: 20
    objective: val_top1           # val_top1 (default) or test_top1 (needs `tune_on_test: true`)
    budget_seconds: 600           # optional: each trial stops at this many seconds (top-1 at a time budget)
    val_split: 0.1                # fraction of the training images held out for the trials (default 0.1)
    pruner: asha                  # asha (successive halving, default), median or none
    min_epochs: 1                 # epochs every trial trains before it can be pruned
    sampler: tpe                  # tpe (default), random, qmc, or grid (every `choice` combination)
    seed: 0                       # the sampler's seed

Trials are scored on the validation split; `objective: test_top1` tunes on the test set and is refused unless the
spec also says `tune_on_test: true`. A trial's settings are: TrainConfig defaults <- the base recipe <-
`settings` <- the sampled point <- command-line overrides, as for an ablation variant (`spec.variant_config`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import CONFIG_KEYS, shipped_or_file, suggest
from ..errors import ConfigError
from .spec import Variant, check_setting_keys, variant_config

TUNE_DIR = Path(__file__).resolve().parent.parent / "tuning"

TUNE_KEYS = ("description", "base", "settings", "space", "trials", "objective", "tune_on_test", "budget_seconds",
             "val_split", "pruner", "min_epochs", "sampler", "seed")
KINDS = ("log", "float", "int", "choice")
OBJECTIVES = ("val_top1", "test_top1")
PRUNERS = ("asha", "median", "none")
SAMPLERS = ("tpe", "random", "qmc", "grid")
DEFAULT_VAL_SPLIT = 0.1
# settings a trial may not vary: where it writes, and the held-out split that scores it
NOT_TUNABLE = ("out", "val_split", "test_split", "test_subset")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # one of KINDS
    low: Any = None
    high: Any = None
    choices: tuple = ()

    def describe(self) -> dict:
        return {self.kind: list(self.choices) if self.kind == "choice" else [self.low, self.high]}


@dataclass
class TuneSpec:
    name: str
    path: Path
    text: str
    description: str
    base: Optional[str]
    settings: dict
    space: dict = field(default_factory=dict)  # name -> Param, in the spec's order
    trials: int = 20
    objective: str = "val_top1"
    tune_on_test: bool = False
    budget_seconds: Optional[float] = None
    val_split: float = DEFAULT_VAL_SPLIT
    pruner: str = "asha"
    min_epochs: int = 1
    sampler: str = "tpe"
    seed: int = 0

    @property
    def on_test(self) -> bool:
        return self.objective == "test_top1"

    def space_record(self) -> dict:
        """The search space as plain data (stored with the study, so a rerun with another space is refused)."""
        return {name: p.describe() for name, p in self.space.items()}


def list_tune_specs() -> list[str]:
    return sorted(p.stem for p in TUNE_DIR.glob("*.yaml"))


def load_tune_spec(name_or_file: str) -> TuneSpec:
    shipped = list_tune_specs()
    path = shipped_or_file(str(name_or_file), TUNE_DIR, shipped, file_kind="tuning spec", kind="tuning spec",
                           listing=f"shipped tuning specs: {', '.join(shipped)}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"tuning spec {path}{f' line {mark.line + 1}' if mark else ''} is not valid YAML; "
                          f"fix the file") from None
    return parse_tune_spec(data, path=path, text=text)


def parse_tune_spec(data: Any, *, path: Path, text: str = "") -> TuneSpec:
    where = f"tuning spec {path}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping with `base:` and `space:`, got {type(data).__name__}")
    for key in data:
        if key not in TUNE_KEYS:
            raise ConfigError(f"unknown key {key!r} in {where}{suggest(str(key), TUNE_KEYS)}; "
                              f"allowed: {', '.join(TUNE_KEYS)}")
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"`settings` in {where} must be a mapping of TrainConfig keys, got {settings!r}")
    check_setting_keys(settings, f"`settings` of {where}")
    base = data.get("base")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"`base` in {where} must be a recipe name or file, got {base!r}")
    space = parse_space(data.get("space"), where)
    spec = TuneSpec(name=path.stem, path=path, text=text, description=str(data.get("description") or ""),
                    base=base, settings=dict(settings), space=space)
    spec.trials = whole(data.get("trials", spec.trials), "trials", where, least=1)
    spec.min_epochs = whole(data.get("min_epochs", spec.min_epochs), "min_epochs", where, least=1)
    spec.seed = whole(data.get("seed", spec.seed), "seed", where, least=0)
    spec.objective = one_of(data.get("objective", spec.objective), "objective", OBJECTIVES, where)
    spec.pruner = one_of(data.get("pruner", spec.pruner), "pruner", PRUNERS, where)
    spec.sampler = one_of(data.get("sampler", spec.sampler), "sampler", SAMPLERS, where)
    tune_on_test = data.get("tune_on_test", False)
    if not isinstance(tune_on_test, bool):
        raise ConfigError(f"`tune_on_test` in {where} must be true or false, got {tune_on_test!r}")
    spec.tune_on_test = tune_on_test
    if spec.on_test and not tune_on_test:
        raise ConfigError(f"{where} tunes on the test set (`objective: test_top1`), which makes its test figure "
                          f"optimistic; use `objective: val_top1`, or add `tune_on_test: true` to do it anyway")
    if "val_split" in data:
        spec.val_split = fraction(data["val_split"], "val_split", where)
    budget = data.get("budget_seconds")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise ConfigError(f"`budget_seconds` in {where} must be a positive number of seconds, got {budget!r}")
    spec.budget_seconds = budget
    if spec.sampler == "grid" and any(p.kind != "choice" for p in space.values()):
        ranged = [n for n, p in space.items() if p.kind != "choice"]
        raise ConfigError(f"`sampler: grid` in {where} needs every parameter as a `choice` list; "
                          f"{', '.join(ranged)} {'is a range' if len(ranged) == 1 else 'are ranges'}")
    for corner in ("low", "high"):  # every range end and every choice must make a valid config
        trial_config(spec, {n: getattr(p, corner) for n, p in space.items() if p.kind != "choice"})
    for name, p in space.items():
        for value in p.choices:
            trial_config(spec, {name: value})
    return spec


def parse_space(space: Any, where: str) -> dict:
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"`space` in {where} must map settings to ranges, e.g. `lr_max: {{log: [1.0e-4, 0.1]}}`")
    out = {}
    for name, rule in space.items():
        key = str(name)
        if key not in CONFIG_KEYS:
            raise ConfigError(f"unknown parameter {key!r} in `space` of {where}{suggest(key, CONFIG_KEYS)}; "
                              f"parameters are TrainConfig settings (`isoconv train --help`)")
        if key in NOT_TUNABLE:
            raise ConfigError(f"`{key}` in `space` of {where} cannot be tuned (it decides where trials write or "
                              f"what scores them)")
        out[key] = parse_param(key, rule, f"`space.{key}` in {where}")
    return out


def parse_param(name: str, rule: Any, where: str) -> Param:
    if not isinstance(rule, dict) or len(rule) != 1 or next(iter(rule)) not in KINDS:
        raise ConfigError(f"{where} must be one of {{log: [LOW, HIGH]}}, {{float: [LOW, HIGH]}}, "
                          f"{{int: [LOW, HIGH]}} or {{choice: [A, B, ...]}}, got {rule!r}")
    kind, values = next(iter(rule.items()))
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: `choice` needs a non-empty list of values, got {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{where}: `choice` repeats a value: {values!r}")
        return Param(name, kind, choices=tuple(values))
    number = int if kind == "int" else (int, float)
    if (not isinstance(values, list) or len(values) != 2
            or not all(isinstance(v, number) and not isinstance(v, bool) for v in values)):
        raise ConfigError(f"{where}: `{kind}` needs [LOW, HIGH] ({'whole numbers' if kind == 'int' else 'numbers'}), "
                          f"got {values!r}")
    low, high = values
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{where}: the range [{low}, {high}] must be finite")
    if low >= high:
        raise ConfigError(f"{where}: the range [{low}, {high}] is {'empty' if low == high else 'inverted'}; "
                          f"give [LOW, HIGH] with LOW < HIGH")
    if kind == "log" and low <= 0:
        raise ConfigError(f"{where}: a log range must lie above 0, got [{low}, {high}]; raise LOW (e.g. "
                          f"{high / 1000:g}) or use `float:`")
    return Param(name, kind, low=float(low) if kind != "int" else low, high=float(high) if kind != "int" else high)


def whole(value: Any, key: str, where: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"`{key}` in {where} must be a whole number >= {least}, got {value!r}")
    return value


def fraction(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"`{key}` in {where} must be a fraction between 0 and 1 (exclusive), got {value!r}")
    return float(value)


def one_of(value: Any, key: str, choices: tuple, where: str) -> str:
    if value not in choices:
        raise ConfigError(f"`{key}` in {where} must be one of {', '.join(choices)}, got {value!r}"
                          f"{suggest(str(value), choices)}")
    return value


def trial_config(spec: TuneSpec, params: dict, overrides: Optional[dict] = None, *, final: bool = False):
    """The TrainConfig of a trial at `params` (scored on the held-out split unless the spec tunes on test), or,
    with final=True, of the retraining of the best point on the whole training set (scored on the test set)."""
    settings = {**spec.settings, **params}
    if spec.budget_seconds is not None and not final:
        settings.setdefault("time_budget", spec.budget_seconds)
    if not spec.on_test:
        settings["val_split"] = None if final else spec.val_split
    variant = Variant(name="trial" if not final else "best", recipe=spec.base, settings=settings, own=dict(params))
    return variant_config(variant, overrides, where=f"tuning spec {spec.path}")
