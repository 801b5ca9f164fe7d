"""Experiments: ablation sweeps over recipes (`isoconv ablate`), results tables, plots and reports."""
from ..lazy import lazy_exports
from .spec import AblationSpec, Variant, list_specs, load_spec

# loaded at the first use: the command line's parsers (experiments/cli.py) import no torch
__getattr__, __dir__ = lazy_exports(__name__, {"run_ablation": "isoconv.experiments.ablate",
                                               "write_report": "isoconv.experiments.report",
                                               "write_results": "isoconv.experiments.results"})

__all__ = ["AblationSpec", "Variant", "list_specs", "load_spec", "run_ablation", "write_report", "write_results"]
