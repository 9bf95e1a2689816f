"""k-NN evaluation equals a directly written scikit-learn computation on the same arrays."""

import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import r2_score
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import make_pipeline

from astroclip_jax.evaluation import knn


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


def test_scores_equal_direct_sklearn():
    arrays = _table()
    holdout, fraction, seed = 5000, 0.2, 3
    scores, _, split = knn.evaluate(arrays, n_neighbors=16, holdout=holdout, fraction=fraction,
                                    seed=seed, pca_components=10)

    # Independent pipeline: select, shuffle, hold out the tail, fit/predict, score.
    ok = (arrays["has_props"] & np.isfinite(arrays["z_hp"]) & np.isfinite(arrays["log_mstar"]))
    rows = np.arange(len(ok))[ok]
    perm = np.random.default_rng(seed).permutation(len(rows))
    n_query = min(holdout, int(fraction * len(rows)))
    fit, query = rows[perm[: len(rows) - n_query]], rows[perm[len(rows) - n_query:]]
    np.testing.assert_array_equal(split["query_rows"], query)

    pairs = {
        "image": ("image_embedding", "image_embedding"),
        "spectrum": ("spectrum_embedding", "spectrum_embedding"),
        "cross_modal": ("spectrum_embedding", "image_embedding"),
        "cross_modal_reverse": ("image_embedding", "spectrum_embedding"),
        "frozen_image_features": ("image_features", "image_features"),
        "frozen_spectrum_features": ("spectrum_features", "spectrum_features"),
    }
    for target, column in (("redshift", "z_hp"), ("log_mstar", "log_mstar")):
        y = arrays[column].astype(np.float64)
        for method, (a, b) in pairs.items():
            reg = KNeighborsRegressor(n_neighbors=16, weights="distance")
            reg.fit(arrays[a][fit], y[fit])
            expected = r2_score(y[query], reg.predict(arrays[b][query]))
            np.testing.assert_allclose(scores[method][target], expected, rtol=1e-10, atol=1e-12)
        for method, key in (("pca_image_inputs", "image_inputs"),
                            ("pca_spectrum_inputs", "spectrum_inputs")):
            x = arrays[key].reshape(len(y), -1)
            pipe = make_pipeline(PCA(n_components=10, random_state=seed),
                                 KNeighborsRegressor(n_neighbors=16, weights="distance"))
            expected = r2_score(y[query], pipe.fit(x[fit], y[fit]).predict(x[query]))
            np.testing.assert_allclose(scores[method][target], expected, rtol=1e-10, atol=1e-12)

    # The spectrum embedding carries less noise, so it must predict better (sanity of the setup).
    assert scores["spectrum"]["redshift"] > scores["image"]["redshift"] > 0.5


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
