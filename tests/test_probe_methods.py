"""Probe functions (evaluation/probe_methods.py) against scikit-learn on the same arrays, and the MLP
probes against facts of the data they are given."""

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from astroclip_jax.evaluation import probe_methods


def _data(n=400, d=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 5, d)  # unequal scales: standardising matters
    w = rng.normal(size=(d, 2))
    y = x @ w + rng.normal(size=(n, 2))
    return x[:300], y[:300], x[300:], y[300:]


@pytest.mark.parametrize("rows", [300, 12])  # d < n (normal equations) and d > n (dual form)
@pytest.mark.parametrize("alpha", [0.01, 3.0, 300.0])
def test_ridge_equals_sklearn(rows, alpha):
    fit_x, fit_y, query_x, _ = _data()
    got = probe_methods.ridge_predict(fit_x[:rows], fit_y[:rows], query_x, alpha)
    want = Ridge(alpha=alpha).fit(fit_x[:rows], fit_y[:rows]).predict(query_x)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8)


def test_ridge_probe_is_sklearn_on_standardised_data_with_the_chosen_penalty():
    fit_x, fit_y, query_x, query_y = _data()
    alphas = (0.1, 10.0, 1000.0)
    pred, chosen = probe_methods.ridge_probe(fit_x, fit_y, query_x, alphas, 0.2, seed=0)
    scaler_x, scaler_y = StandardScaler().fit(fit_x), StandardScaler().fit(fit_y)
    for t, alpha in enumerate(chosen):
        model = Ridge(alpha=alpha).fit(scaler_x.transform(fit_x), scaler_y.transform(fit_y)[:, t])
        want = model.predict(scaler_x.transform(query_x)) * scaler_y.scale_[t] + scaler_y.mean_[t]
        np.testing.assert_allclose(pred[:, t], want, rtol=1e-8, atol=1e-8)
    # The penalty was chosen on the fit rows' validation slice: re-derive it with sklearn.
    train, val = probe_methods.validation_split(len(fit_x), 0.2, 0)
    sx, sy = scaler_x.transform(fit_x), scaler_y.transform(fit_y)
    for t, alpha in enumerate(chosen):
        errors = [np.mean((Ridge(alpha=a).fit(sx[train], sy[train, t]).predict(sx[val])
                           - sy[val, t]) ** 2) for a in alphas]
        assert alpha == alphas[int(np.argmin(errors))]


def test_knn_paper_and_v2_equal_sklearn():
    fit_x, fit_y, query_x, _ = _data()
    want16 = KNeighborsRegressor(n_neighbors=16, weights="distance").fit(fit_x, fit_y[:, 0])
    np.testing.assert_allclose(probe_methods.knn_paper(fit_x, fit_y[:, 0], query_x, 16),
                               want16.predict(query_x), rtol=1e-10)
    want64 = make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=64,
                                                                 weights="distance"))
    np.testing.assert_allclose(probe_methods.knn_v2(fit_x, fit_y[:, 0], query_x, 64),
                               want64.fit(fit_x, fit_y[:, 0]).predict(query_x), rtol=1e-10)


def _classes(n=600, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    label = (x[:, 0] > 0.5).astype(int) + 2 * (x[:, 1] > 1.0) * (x[:, 0] <= 0.5)
    return x[:450], label[:450], x[450:], label[450:]


def test_knn_classify_and_scores_equal_sklearn():
    fit_x, fit_y, query_x, query_y = _classes()
    got = probe_methods.knn_classify(fit_x, fit_y, query_x, 3, 16, standardised=False)
    want = KNeighborsClassifier(16, weights="distance").fit(fit_x, fit_y).predict_proba(query_x)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    scores = probe_methods.classification_scores(query_y, got)
    assert scores["accuracy"] == pytest.approx(np.mean(np.argmax(want, 1) == query_y))
    assert scores["roc_auc"] == pytest.approx(
        roc_auc_score(query_y, want, multi_class="ovr", average="macro"))


def test_auc_counts_only_classes_the_probe_could_rank():
    _, _, _, query_y = _classes()
    scores = np.random.default_rng(3).random((len(query_y), 3))
    # Saw classes 0 and 1: the macro AUC over those two one-vs-rest splits, as sklearn's.
    want = np.mean([roc_auc_score(query_y == c, scores[:, c]) for c in (0, 1)])
    assert probe_methods.classification_scores(query_y, scores, seen=[0, 1, 1])["roc_auc"] == \
        pytest.approx(want)
    # Saw one class only: it never saw a negative, so there is no AUC to give.
    assert np.isnan(probe_methods.classification_scores(query_y, scores, seen=[0, 0])["roc_auc"])


def test_mlp_probes_learn_what_ridge_cannot():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(900, 4))
    y = np.stack([np.sin(2 * x[:, 0]) + x[:, 1] ** 2, x[:, 2] * x[:, 3]], axis=1)  # nonlinear
    fit_x, fit_y, query_x, query_y = x[:700], y[:700], x[700:], y[700:]
    cfg = probe_methods.MLPConfig(max_epochs=40, patience=8)
    mlp = probe_methods.mlp_probe(fit_x, fit_y, query_x, cfg, 0.2, seed=0)
    ridge, _ = probe_methods.ridge_probe(fit_x, fit_y, query_x, (0.1, 1.0, 10.0), 0.2, seed=0)
    for t in range(2):
        assert probe_methods.r2(query_y[:, t], mlp[:, t]) > 0.8
        assert probe_methods.r2(query_y[:, t], ridge[:, t]) < 0.3  # no linear signal in either target
    # Padding the rows (one compiled program for every fraction) changes nothing.
    short = probe_methods.MLPConfig(max_epochs=3)
    padded = probe_methods.mlp_probe(fit_x[:200], fit_y[:200], query_x, short, 0.2, seed=0, pad_to=700)
    np.testing.assert_allclose(padded, probe_methods.mlp_probe(fit_x[:200], fit_y[:200], query_x, short,
                                                        0.2, seed=0), rtol=1e-5, atol=1e-5)


def test_mlp_classifier_separates_classes():
    fit_x, fit_y, query_x, query_y = _classes()
    proba = probe_methods.mlp_classify(fit_x, fit_y, query_x, 3, probe_methods.MLPConfig(max_epochs=40),
                                0.2, seed=0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    scores = probe_methods.classification_scores(query_y, proba)
    assert scores["accuracy"] > 0.9 and scores["roc_auc"] > 0.95


def test_few_shot_rows_are_seeded_subsets():
    a, b = probe_methods.few_shot_rows(1000, 0.1, 0), probe_methods.few_shot_rows(1000, 0.1, 1)
    assert len(a) == 100 and len(np.unique(a)) == 100 and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, probe_methods.few_shot_rows(1000, 0.1, 0))
    train, val = probe_methods.validation_split(10, 0.2, 0)
    assert len(val) == 2 and not set(train) & set(val) and len(train) + len(val) == 10


def test_probe_settings_are_checked_and_optional_in_old_configs():
    from astroclip_jax import settings as settings_lib
    from astroclip_jax.errors import ConfigError
    from configs import spender

    config = spender.get_config("smoke")
    config.probe.fractions = (0.1, 1.5)
    with pytest.raises(ConfigError, match="probe.fractions"):
        settings_lib.resolve(config)
    old = settings_lib.config_json(spender.get_config("smoke"))
    del old["probe"]  # a checkpoint written before the section existed
    assert settings_lib.resolve(old).probe is None
