"""Experiments: ablation sweeps over recipes (`isoconv ablate`), results tables, plots and reports.

Submodules load on first use, so the training loop can import `experiments.tensorboard` without pulling in the
rest (and matplotlib/tensorboard are imported only by the functions that need them).
"""
import importlib

_EXPORTS = {"run_ablation": "ablate", "write_report": "report", "write_results": "results",
            "AblationSpec": "spec", "Variant": "spec", "list_specs": "spec", "load_spec": "spec"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
