"""k-NN evaluation (and the mode's report) equals a directly written scikit-learn computation
on the same arrays."""

import dataclasses

import matplotlib.pyplot as plt
import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.metrics import r2_score
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import make_pipeline

from astroclip_jax import settings as settings_lib
from astroclip_jax.errors import DataError
from astroclip_jax.evaluation import knn, runner
from configs import spender


def _table(n=600, seed=1):
    """Embeddings whose first directions carry redshift and mass, with some galaxies unlabelled."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.0, 0.6, n)
    mass = 9.0 + 3.0 * z + rng.normal(0, 0.3, n)
    latent = np.stack([5.0 * z, mass - 9.0, np.full(n, 2.0)], axis=1)

    def embedding(noise):
        x = np.concatenate([latent, rng.normal(0, noise, (n, 13))], axis=1)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    has_props = rng.random(n) > 0.2
    z_hp = np.where(has_props, z, np.nan)
    log_mstar = np.where(has_props, mass, np.nan)
    log_mstar[np.flatnonzero(has_props)[:3]] = np.nan  # a known galaxy lacking one property
    return {
        "image_embedding": embedding(0.2), "spectrum_embedding": embedding(0.05),
        "image_features": rng.normal(size=(n, 40)).astype(np.float32) + z[:, None],
        "spectrum_features": rng.normal(size=(n, 24)).astype(np.float32) + mass[:, None],
        "image_inputs": rng.normal(size=(n, 8, 8, 3)).astype(np.float32) + z[:, None, None, None],
        "spectrum_inputs": rng.normal(size=(n, 90)).astype(np.float32) + mass[:, None],
        "has_props": has_props, "z_hp": z_hp.astype(np.float32),
        "log_mstar": log_mstar.astype(np.float32), "redshift": z.astype(np.float32),
    }


def _direct_scores(arrays, holdout, fraction, seed, pca_components):
    """Independent pipeline: select, shuffle, hold out the tail, fit/predict, score.
    Returns (scores[method][target], query rows)."""
    ok = (arrays["has_props"] & np.isfinite(arrays["z_hp"]) & np.isfinite(arrays["log_mstar"]))
    rows = np.arange(len(ok))[ok]
    perm = np.random.default_rng(seed).permutation(len(rows))
    n_query = min(holdout, int(fraction * len(rows)))
    fit, query = rows[perm[: len(rows) - n_query]], rows[perm[len(rows) - n_query:]]

    pairs = {
        "image": ("image_embedding", "image_embedding"),
        "spectrum": ("spectrum_embedding", "spectrum_embedding"),
        "cross_modal": ("spectrum_embedding", "image_embedding"),
        "cross_modal_reverse": ("image_embedding", "spectrum_embedding"),
        "frozen_image_features": ("image_features", "image_features"),
        "frozen_spectrum_features": ("spectrum_features", "spectrum_features"),
    }
    scores = {method: {} for method in (*pairs, "pca_image_inputs", "pca_spectrum_inputs")}
    for target, column in (("redshift", "z_hp"), ("log_mstar", "log_mstar")):
        y = arrays[column].astype(np.float64)
        for method, (a, b) in pairs.items():
            reg = KNeighborsRegressor(n_neighbors=16, weights="distance")
            reg.fit(arrays[a][fit], y[fit])
            scores[method][target] = r2_score(y[query], reg.predict(arrays[b][query]))
        for method, key in (("pca_image_inputs", "image_inputs"),
                            ("pca_spectrum_inputs", "spectrum_inputs")):
            x = arrays[key].reshape(len(y), -1)
            pipe = make_pipeline(PCA(n_components=pca_components, random_state=seed),
                                 KNeighborsRegressor(n_neighbors=16, weights="distance"))
            scores[method][target] = r2_score(y[query], pipe.fit(x[fit], y[fit]).predict(x[query]))
    return scores, query


def _assert_scores_equal(got, want):
    for method, per_target in want.items():
        for target, expected in per_target.items():
            np.testing.assert_allclose(got[method][target], expected, rtol=1e-10, atol=1e-12,
                                       err_msg=f"{method} {target}")


def test_scores_equal_direct_sklearn():
    arrays = _table()
    holdout, fraction, seed = 5000, 0.2, 3
    scores, _, split = knn.evaluate(arrays, n_neighbors=16, holdout=holdout, fraction=fraction,
                                    seed=seed, pca_components=10)
    want, query = _direct_scores(arrays, holdout, fraction, seed, pca_components=10)
    np.testing.assert_array_equal(split["query_rows"], query)
    _assert_scores_equal(scores, want)
    # The spectrum embedding carries less noise, so it must predict better (sanity of the setup).
    assert scores["spectrum"]["redshift"] > scores["image"]["redshift"] > 0.5


def _inputs(arrays, **eval_fields):
    settings = settings_lib.resolve(spender.get_config("smoke")).eval
    return runner.EvalInputs(arrays=arrays, meta={"split": "test", "synthetic": True},
                             settings=dataclasses.replace(settings, **eval_fields),
                             examples=None)


def test_report_scores_the_eval_settings_protocol():
    arrays = _table()
    result = knn.report(_inputs(arrays, knn_neighbors=16, knn_holdout=50,
                                knn_holdout_fraction=0.2, seed=5))
    # The mode's PCA baselines use the module's number of components.
    want, query = _direct_scores(arrays, 50, 0.2, 5, pca_components=knn.PCA_COMPONENTS)
    _assert_scores_equal(result.report["r2"], want)
    n_props = int(np.sum(arrays["has_props"] & np.isfinite(arrays["log_mstar"])))
    assert result.report["n_with_properties"] == n_props
    assert result.report["n_query"] == len(query) == 50  # capped by knn_holdout
    assert result.report["n_fit"] == n_props - 50
    assert result.report["ours_on_synthetic_data"] is True
    assert list(result.figures) == ["figure8.png"] and result.lines == [result.report["table"]]
    assert "real-data reference" in result.report["table"]
    plt.close(result.figures["figure8.png"])


def test_report_refuses_too_few_galaxies_with_properties():
    arrays = _table(n=60)
    arrays["has_props"][10:] = False  # at most 10 labelled galaxies, fewer than 2 x 16
    with pytest.raises(DataError, match="galaxies of split 'test' have properties"):
        knn.report(_inputs(arrays))


def test_holdout_caps_at_fixed_number():
    fit, query = knn.holdout_split(100_000, 5000, 0.2, 0)
    assert len(query) == 5000 and len(fit) == 95_000
    assert len(np.intersect1d(fit, query)) == 0
    fit, query = knn.holdout_split(1000, 5000, 0.2, 0)
    assert len(query) == 200


def test_table_labels_reference_values_for_synthetic():
    scores = {"image": {"redshift": 0.5, "log_mstar": 0.4}}
    text = knn.format_table(scores, synthetic=True)
    assert "real-data reference" in text and "0.650" in text and "0.710" in text
