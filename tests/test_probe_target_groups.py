"""Targets that only some galaxies have (a second catalogue joined: metallicity, age, sSFR for
part of the rows) are scored on every held-out row that has them, and the others on all rows:
each kNN score equals scikit-learn's fitted and scored on exactly those rows."""

import dataclasses

import numpy as np
from sklearn.metrics import r2_score
from sklearn.neighbors import KNeighborsRegressor

from astroclip_jax import settings as settings_lib
from astroclip_jax.evaluation import knn, probe
from configs import spender


def _settings():
    run = settings_lib.resolve(spender.get_config("smoke"), "probe")
    groups = dataclasses.replace(
        run.probe, feature_sets=("image",), regression_targets=("a", "b", "c"),
        classification_targets=(), supervised=(), fractions=(1.0,), curve_features=(),
        seeds=(0,))
    return groups, dataclasses.replace(run.eval, knn_holdout=200, knn_holdout_fraction=0.25)


def _arrays(n=600, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    a = x[:, 0] + 0.1 * rng.normal(size=n)
    b = np.where(rng.uniform(size=n) < 0.6, x[:, 1] ** 2 + 0.1 * rng.normal(size=n), np.nan)
    c = np.where(np.isfinite(b), x[:, 2], np.nan)  # same rows as b: one group with b
    has_props = rng.uniform(size=n) < 0.95
    return {"image_embedding": x, "a": a, "b": b, "c": c, "has_props": has_props,
            "index": np.arange(n), "targetid": np.arange(n) + 1000}


def test_each_target_is_scored_on_the_rows_that_have_it():
    group_probe, eval_settings = _settings()
    arrays = _arrays()
    result = probe.evaluate(arrays, group_probe, eval_settings, log=lambda *_: None)
    rows = np.flatnonzero(arrays["has_props"])  # every row with props has `a`
    fit_pos, query_pos = knn.holdout_split(len(rows), 200, 0.25, eval_settings.seed)
    assert [sorted(g["targets"]) for g in result["target_groups"]] == [["a"], ["b", "c"]]
    for target in ("a", "b", "c"):
        y = arrays[target]
        fit = rows[fit_pos][np.isfinite(y[rows[fit_pos]])]
        query = rows[query_pos][np.isfinite(y[rows[query_pos]])]
        x = arrays["image_embedding"]
        want = r2_score(y[query], KNeighborsRegressor(16, weights="distance").fit(
            x[fit], y[fit]).predict(x[query]))
        (got,) = [e for e in result["entries"] if e["target"] == target
                  and e["method"] == "knn16"]
        assert got["n_labelled"] == len(fit)
        np.testing.assert_allclose(got["mean"], want, rtol=1e-6)
    # The held-out rows are one split for all targets: those of `a` contain those of `b`.
    assert result["n_query"] == len(query_pos)


def test_a_target_nobody_has_is_one_line():
    group_probe, eval_settings = _settings()
    arrays = _arrays()
    arrays["b"][:] = np.nan
    arrays["c"][:] = np.nan
    lines = []
    result = probe.evaluate(arrays, group_probe, eval_settings, log=lines.append)
    assert [g["targets"] for g in result["target_groups"]] == [["a"]]
    assert any("['b', 'c']" in line and "not scored" in line for line in lines)
