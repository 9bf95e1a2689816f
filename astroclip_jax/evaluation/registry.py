"""Every evaluation mode by name: `--mode=<name>` runs `evaluation/runner.py` with the evaluator
found here (`module:function`, imported only when chosen, so `main.py` can list the modes
without importing any evaluator). An evaluator is `evaluate(EvalInputs) -> EvalResult`; a new
evaluation is one function and one line here."""

from __future__ import annotations

import importlib
from typing import Callable

EVALUATORS = {
    "eval_knn": "astroclip_jax.evaluation.knn:report",  # zero-shot table, Figure 8
    "search": "astroclip_jax.evaluation.search:report_from_index",  # retrieval, Figures 6-7
    "cluster": "astroclip_jax.evaluation.cluster:report",  # UMAP, DBSCAN, k-Means, Figures 9-14
    "probe": "astroclip_jax.evaluation.probe:report",  # probes at 1/10/100 %, supervised bounds
}


def evaluator(mode: str) -> Callable:
    """The evaluate function of an evaluation mode."""
    module, function = EVALUATORS[mode].split(":")
    return getattr(importlib.import_module(module), function)
