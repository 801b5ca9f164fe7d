"""Experiments: ablation sweeps over recipes (`isoconv ablate`), results tables, plots and reports."""
from .ablate import run_ablation
from .report import write_report
from .results import write_results
from .spec import AblationSpec, Variant, list_specs, load_spec

__all__ = ["AblationSpec", "Variant", "list_specs", "load_spec", "run_ablation", "write_report", "write_results"]
