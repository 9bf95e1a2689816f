"""Our MoCo v2 train step (training/moco.py, as benchmarks/moco_step.py times it) against the
PyTorch MoCo v2 step of that benchmark (ssl-legacysurvey moco2_module.py's order) run in float64:
the same converted weights, views, queue and shuffle-BN permutation give the same loss at every
step, so the momentum update, training-mode BatchNorm, SGD with weight decay and the enqueue
agree. One BN group: with groups of 4 rows float32 rounding grows step by step on both sides
(torch float32 parts from torch float64 as much as ours does; see the benchmark's docstring)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import moco_step  # noqa: E402


def test_moco_step_losses_match_torch_float64_over_three_steps(tmp_path):
    spec_path = moco_step._write_size_inputs(str(tmp_path), "test", batch=16, bn_groups=1, steps=2)
    with open(spec_path) as f:
        both = json.load(f)
    ref = moco_step.run_torch(both["spec"], both["files"], 2, "cpu", dtype=torch.float64)
    ours = moco_step.run_jax(both["spec"], both["files"], 2, augment=False)
    assert len(ours["losses"]) == 3
    assert len(set(np.round(ref["losses"], 3))) == 3  # the steps change the model
    np.testing.assert_allclose(ours["losses"], ref["losses"], rtol=1e-5)
