"""Zero-shot property prediction: k-NN regression of redshift and stellar mass on embeddings.

The paper's protocol (section 3.5.2, Table 1, Figure 8): take the test-split galaxies that have
PROVABGS properties, shuffle them with a fixed seed, hold out the last ``min(knn_holdout,
knn_holdout_fraction * N)`` as queries, fit ``KNeighborsRegressor(n_neighbors=16,
weights="distance")`` on the rest and score ``r2_score`` on the held-out set. Directions:
image -> image, spectrum -> spectrum, cross-modal (fit on spectrum embeddings, predict from image
embeddings, as the paper) and its reverse. Baselines on the same split: the frozen towers' features
before the heads, the same towers with the heads before training (all four directions), and PCA of
the model inputs (fit on the fit part only).

    python main.py --config=configs/spender.py --mode=eval_knn --workdir=runs/default

Writes ``workdir/eval_knn/results.json`` and ``workdir/eval_knn/figure8*.png``.
"""

import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import r2_score
from sklearn.neighbors import KNeighborsRegressor

from astroclip_jax.errors import DataError
from astroclip_jax.evaluation import plots, runner

# Property name -> column of the embeddings file (the paper's targets: Z_HP and log M*).
TARGETS = {"redshift": "z_hp", "log_mstar": "log_mstar"}
TARGET_LABELS = {"redshift": "redshift $Z_{HP}$", "log_mstar": r"$\log M_*$"}

# Direction -> (fit features, query features). "cross_modal" is the paper's: fit on spectra.
DIRECTIONS = {
    "image": ("image_embedding", "image_embedding"),
    "spectrum": ("spectrum_embedding", "spectrum_embedding"),
    "cross_modal": ("spectrum_embedding", "image_embedding"),
    "cross_modal_reverse": ("image_embedding", "spectrum_embedding"),
}
# Baselines -> (features, reduce with PCA first). Only in-modal: the spaces differ across towers.
BASELINES = {
    "frozen_image_features": ("image_features", False),
    "frozen_spectrum_features": ("spectrum_features", False),
    "pca_image_inputs": ("image_inputs", True),
    "pca_spectrum_inputs": ("spectrum_inputs", True),
}
# Baselines in all directions: the frozen towers with the heads before training.
UNTRAINED_DIRECTIONS = {
    f"untrained_heads_{name}": tuple(f"untrained_{key}" for key in keys)
    for name, keys in DIRECTIONS.items()}
PCA_COMPONENTS = 64

# Real-data R^2 (UPSTREAM.md "Reference numbers"): AstroCLIP v1 and the reproduced paper.
REFERENCE = {
    "redshift": {"image": (0.71, 0.65), "spectrum": (0.97, 0.87), "cross_modal": (0.64, 0.59)},
    "log_mstar": {"image": (0.66, 0.57), "spectrum": (0.86, 0.74), "cross_modal": (0.58, 0.50)},
}


# --------------------------------------------------------------------------------------------
# Pure array functions
# --------------------------------------------------------------------------------------------

def holdout_split(n, holdout, fraction, seed):
    """(fit, query) row indices: a seeded permutation; its last min(holdout, fraction*n) query."""
    n_query = int(min(holdout, int(fraction * n)))
    if n_query < 1 or n - n_query < 1:
        raise ValueError(f"cannot split {n} galaxies into a fit set and {n_query} queries")
    order = np.random.default_rng(seed).permutation(n)
    return order[:-n_query], order[-n_query:]


def knn_predict(fit_x, fit_y, query_x, n_neighbors=16):
    """Distance-weighted k-NN regression prediction for ``query_x`` (the paper's regressor)."""
    k = min(n_neighbors, len(fit_x))
    model = KNeighborsRegressor(n_neighbors=k, weights="distance")
    model.fit(np.asarray(fit_x), np.asarray(fit_y, np.float64))
    return model.predict(np.asarray(query_x))


def pca_reduce(fit_x, query_x, n_components=PCA_COMPONENTS, seed=0):
    """PCA fitted on ``fit_x`` only, applied to both parts (no information from the queries)."""
    fit_x = np.asarray(fit_x).reshape(len(fit_x), -1)
    query_x = np.asarray(query_x).reshape(len(query_x), -1)
    n = min(n_components, fit_x.shape[0], fit_x.shape[1])
    pca = PCA(n_components=n, random_state=seed).fit(fit_x)
    return pca.transform(fit_x), pca.transform(query_x)


def property_rows(arrays):
    """Rows usable for k-NN: galaxies with properties and finite values of every target."""
    keep = np.asarray(arrays["has_props"], bool).copy()
    for column in TARGETS.values():
        keep &= np.isfinite(np.asarray(arrays[column], np.float64))
    return np.flatnonzero(keep)


def evaluate(arrays, n_neighbors=16, holdout=5000, fraction=0.2, seed=0,
             pca_components=PCA_COMPONENTS):
    """All k-NN scores on one embeddings table.

    ``arrays`` maps names to per-galaxy arrays (see :mod:`astroclip_jax.evaluation.embed`);
    missing baseline columns are skipped. Returns ``(scores, predictions, split)`` where
    ``scores[method][target]`` is R^2, ``predictions[method][target]`` the held-out predictions,
    and ``split`` holds the fit/query row indices into ``arrays``.
    """
    rows = property_rows(arrays)
    fit_rows, query_rows = (rows[i] for i in holdout_split(len(rows), holdout, fraction, seed))
    truths = {t: np.asarray(arrays[c], np.float64) for t, c in TARGETS.items()}

    features = {}  # method -> (fit features, query features)
    for name, (fit_key, query_key) in DIRECTIONS.items():
        features[name] = (arrays[fit_key][fit_rows], arrays[query_key][query_rows])
    for name, (fit_key, query_key) in UNTRAINED_DIRECTIONS.items():
        if fit_key in arrays and query_key in arrays:
            features[name] = (arrays[fit_key][fit_rows], arrays[query_key][query_rows])
    for name, (key, reduce) in BASELINES.items():
        if key not in arrays:
            continue
        fit_x, query_x = arrays[key][fit_rows], arrays[key][query_rows]
        if reduce:
            fit_x, query_x = pca_reduce(fit_x, query_x, pca_components, seed)
        features[name] = (fit_x, query_x)

    scores, predictions = {}, {}
    for name, (fit_x, query_x) in features.items():
        scores[name], predictions[name] = {}, {}
        for target, y in truths.items():
            pred = knn_predict(fit_x, y[fit_rows], query_x, n_neighbors)
            predictions[name][target] = pred
            scores[name][target] = float(r2_score(y[query_rows], pred))
    split = {"fit_rows": fit_rows, "query_rows": query_rows}
    return scores, predictions, split


def format_table(scores, synthetic):
    """Text table shaped like the paper's Table 1, with the published numbers beside ours."""
    ref_note = " (real-data reference values; ours are on synthetic data)" if synthetic else ""
    lines = [f"Zero-shot k-NN R^2{ref_note}",
             f"{'property':<11} {'method':<36} {'ours':>7} {'paper':>7} {'AstroCLIP v1':>13}"]
    for target in TARGETS:
        for method in scores:
            v1, paper = REFERENCE[target].get(method, (None, None))
            fmt = lambda v: f"{v:7.3f}" if v is not None else f"{'-':>7}"  # noqa: E731
            lines.append(f"{target:<11} {method:<36} {fmt(scores[method][target])} {fmt(paper)} "
                         f"{fmt(v1):>13}")
    return "\n".join(lines)


def plot_figure8(truths, predictions, scores, methods=("image", "spectrum", "cross_modal",
                                                       "cross_modal_reverse")):
    """Figure 8: one row per method, one column per target; prediction vs truth with R^2."""
    import matplotlib.pyplot as plt

    methods = [m for m in methods if m in predictions]
    fig, axes = plt.subplots(len(methods), len(TARGETS), figsize=(4.2 * len(TARGETS),
                                                                  3.8 * len(methods)),
                             squeeze=False)
    for i, method in enumerate(methods):
        for j, target in enumerate(TARGETS):
            ax = axes[i, j]
            plots.density_panel(ax, truths[target], predictions[method][target],
                                TARGET_LABELS[target], scores[method][target])
            ax.set_title(f"{method.replace('_', ' ')}: {target}", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Mode
# --------------------------------------------------------------------------------------------

def report(inputs: runner.EvalInputs) -> runner.EvalResult:
    """The mode's evaluator: scores, the table, Figure 8."""
    arrays, settings = inputs.arrays, inputs.settings
    n_props = len(property_rows(arrays))
    if n_props < 2 * settings.knn_neighbors:
        raise DataError(
            f"eval_knn: only {n_props} galaxies of split {inputs.meta['split']!r} have "
            "properties (z_hp and log_mstar); prepare the dataset with its property catalogue "
            "(PROVABGS) first")
    scores, predictions, split = evaluate(
        arrays, settings.knn_neighbors, settings.knn_holdout, settings.knn_holdout_fraction, settings.seed)
    table = format_table(scores, inputs.meta.get("synthetic", False))
    query = split["query_rows"]
    truths = {t: np.asarray(arrays[c], np.float64)[query] for t, c in TARGETS.items()}
    return runner.EvalResult(
        report={
            "r2": scores,
            "reference_r2": {t: {m: {"astroclip_v1": v1, "paper": p} for m, (v1, p) in r.items()}
                             for t, r in REFERENCE.items()},
            "reference_is_real_data": True,
            "ours_on_synthetic_data": inputs.meta.get("synthetic", False),
            "n_with_properties": n_props, "n_fit": len(split["fit_rows"]), "n_query": len(query),
            "n_neighbors": settings.knn_neighbors, "weights": "distance", "seed": settings.seed,
            "pca_components": PCA_COMPONENTS, "table": table},
        figures={"figure8.png": plot_figure8(truths, predictions, scores)},
        lines=[table])

