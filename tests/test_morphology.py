"""Galaxy Zoo morphology scores (evaluation/morphology.py): the metrics against
scikit-learn, the MLP learning the synthetic morphology, the entry point's output."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from astroclip_jax import settings as settings_lib
from astroclip_jax.data import galaxy_zoo as G
from astroclip_jax.data import synthetic as S
from astroclip_jax.data import synthetic_votes as V
from astroclip_jax.errors import ConfigError, DataError
from astroclip_jax.evaluation import morphology as M
from configs import spender

SMALL = settings_lib.MorphologySettings(
    enabled=True, labels="fraction", min_votes=3, min_answers=35, hidden=(32, 32, 32),
    dropout=0.2, epochs=15, learning_rate=3e-3, batch_size=64, val_fraction=0.1,
    weighted_sampling=True, standardise=True, feature_sets=("image",))


def _fractions(rng, n, k, votes):
    """Vote fractions of `votes` volunteers (small counts: ties between answers occur)."""
    counts = rng.multinomial(votes, rng.dirichlet(np.ones(k), size=n))
    return counts / votes


@pytest.mark.parametrize("k, votes", [(2, 4), (3, 3), (6, 5), (4, 40)])
def test_scores_equal_scikit_learn(k, votes):
    """Upstream's scores: indicator matrices of the arg-max answers (ties: several), scored by
    accuracy_score and precision_recall_fscore_support(average="weighted", zero_division=0)."""
    rng = np.random.default_rng(k * 100 + votes)
    y = _fractions(rng, 300, k, votes)
    pred = _fractions(rng, 300, k, 7)
    t, p = M.discretise(y), M.discretise(pred)
    assert (t.sum(1) > 1).any() or votes == 40  # the tie cases are exercised
    got = M.scores(y, pred)
    assert got["accuracy"] == pytest.approx(accuracy_score(t, p), abs=1e-12)
    assert got["f1"] == pytest.approx(precision_recall_fscore_support(
        t, p, average="weighted", zero_division=0)[2], abs=1e-12)


def test_scores_without_ties_are_the_multiclass_scores():
    rng = np.random.default_rng(3)
    y, pred = rng.dirichlet(np.ones(4), 200), rng.dirichlet(np.ones(4), 200)
    got = M.scores(y, pred)
    a, b = y.argmax(1), pred.argmax(1)
    assert got["accuracy"] == pytest.approx(accuracy_score(a, b), abs=1e-12)
    assert got["f1"] == pytest.approx(f1_score(a, b, average="weighted"), abs=1e-12)


def test_question_rows():
    total = np.array([0, 2, 3, 35, 40, np.nan])
    labels = np.array([[np.nan, np.nan], [0.5, 0.5], [1, 0], [0.2, 0.8], [np.nan, 1], [0, 1]])
    np.testing.assert_array_equal(M.question_rows(total, labels, np.arange(6), 3), [2, 3])
    np.testing.assert_array_equal(M.question_rows(total, labels, [5, 3, 1], 35), [3])


@pytest.fixture(scope="module")
def synthetic_rows():
    n = 1024
    p = S.parameters(n, seed=5)
    cat = {k: p[k].astype(np.float32) for k in S.CATALOGUE_KEYS}
    cat["artefact"] = p["artefact"].astype(np.int8)
    cat["r_eff_arcsec"] = S.r_eff_arcsec(cat["r_eff_kpc"], cat["redshift"])
    arrays = {**cat, **V.vote_columns(cat, 5, np.arange(n))}
    log_theta = np.log(cat["r_eff_arcsec"])
    # What the written model reads for smooth-or-featured: bulge fraction, size, artefact.
    x = np.stack([cat["bulge_fraction"], log_theta, cat["artefact"] != 0], 1).astype(np.float64)
    return arrays, x, np.arange(800), np.arange(800, n)


def test_mlp_learns_smooth_or_featured(synthetic_rows):
    """On the generator's own morphology the MLP beats the majority answer by far, and on
    shuffled features it does not."""
    arrays, x, fit, query = synthetic_rows
    y, total = G.labels(arrays, "smooth-or-featured")
    fit_q = M.question_rows(total, y, fit, 3)
    query_q = M.question_rows(total, y, query, 35)
    # The score of always answering the fit rows' commonest answer.
    common = np.bincount(y[fit_q].argmax(1), minlength=3).argmax()
    majority = M.scores(y[query_q], np.tile(np.eye(3)[common], (len(query_q), 1)))["accuracy"]
    pred, summary = M.train_predict(x[fit_q], y[fit_q], x[query_q], SMALL, seed=0)
    assert pred.shape == (len(query_q), 3)
    np.testing.assert_allclose(pred.sum(1), 1.0, rtol=1e-5)
    acc = M.scores(y[query_q], pred)["accuracy"]
    assert acc > majority + 0.25 and acc > 0.85, (acc, majority)
    assert 0 <= summary["best_epoch"] < SMALL.epochs and len(summary["val_loss"]) == SMALL.epochs
    shuffled = np.random.default_rng(0).permutation(x[fit_q])
    pred, _ = M.train_predict(shuffled, y[fit_q], x[query_q], SMALL, seed=0)
    assert M.scores(y[query_q], pred)["accuracy"] < majority + 0.1


def test_evaluate_morphology_entries(synthetic_rows):
    from astroclip_jax.evaluation import probe

    arrays, x, fit, query = synthetic_rows
    quick = dataclasses.replace(SMALL, epochs=2)
    # Same widths: one compiled program per answer count serves both.
    sets = {"image": (x[fit], x[query]), "photometry": (x[fit, ::-1], x[query, ::-1])}
    out = M.evaluate_morphology(arrays, fit, query, sets, quick, seed=0)
    reference = probe._entry("image", "mlp", "z_hp", "r2", [0.5], 1.0, 10)
    assert all(set(e) == set(reference) for e in out["entries"])
    scored = {e["target"] for e in out["entries"]}
    assert scored == set(out["questions"]) and set(out["skipped"]) | scored == {
        q.name for q in G.schema()}
    assert "smooth-or-featured" in scored
    for e in out["entries"]:
        assert e["method"] == "mlp_morphology" and e["metric"] in ("accuracy", "f1")
        assert e["modality"] == probe.FEATURE_SETS[e["features"]][0]
        assert e["n_labelled"] == out["questions"][e["target"]]["n_fit"]
        assert 0 <= e["mean"] <= 1 and e["values"] == [e["mean"]]
    assert len(out["entries"]) == 2 * 2 * len(scored)
    assert out["figures"]["morphology.png"].axes
    strict = M.evaluate_morphology(arrays, fit, query, sets,
                                   dataclasses.replace(quick, min_answers=1000), seed=0)
    assert strict["entries"] == [] and len(strict["skipped"]) == 10


def test_multi_question_loss_closed_form():
    """Per question: the weighted mean of -sum_k y_k log softmax(logits)_k over its rows."""
    rng = np.random.default_rng(8)
    n_out = sum(len(q.answers) for q in G.schema())
    logits = rng.normal(size=(7, n_out))
    y = np.concatenate([rng.dirichlet(np.ones(len(q.answers)), 7) for q in G.schema()], 1)
    w = (rng.uniform(size=(7, 10)) < 0.6).astype(np.float64)
    w[:, 3] = 0  # a question no row counts for adds nothing
    expected = 0.0
    for j, (_, cols) in enumerate(M.answer_slices()):
        z = logits[:, cols]
        log_p = z - z.max(1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
        ce = -(y[:, cols] * log_p).sum(1)
        if w[:, j].sum():
            expected += (ce * w[:, j]).sum() / w[:, j].sum()
    got = M.multi_question_loss(*M.question_sums(logits, y, w))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert M.answer_slices()[-1][1].stop == n_out == 34


def test_supervised_image_bound_runs_on_the_same_rows():
    """The image network trains on the fit rows' cutouts and is scored per question like the
    probes (smoke sizes: it runs, its entries are complete; learning is the probes' test)."""
    n = 96
    out = S.generate(n, seed=9, image_size=32)
    fit, query = np.arange(72), np.arange(72, n)
    probe = settings_lib.resolve(spender.get_config("smoke"), "probe").probe
    quick = dataclasses.replace(SMALL, epochs=1, min_answers=20)
    images = out["image"] / np.abs(out["image"]).max()
    res = M.evaluate_morphology(out, fit, query, {}, quick, seed=0,
                                images=(images[fit], images[query]), probe=probe)
    sup = [e for e in res["entries"] if e["method"] == "supervised_morphology"]
    assert {e["target"] for e in sup} == set(res["questions"]) and sup
    assert all(e["features"] == "images_resnet" and e["modality"] == "image" for e in sup)
    summary = res["training"]["images_resnet"]
    assert len(summary["val_loss"]) == probe.supervised_epochs
    assert np.isfinite(summary["val_loss"]).all()


def test_evaluate_morphology_bad_input(synthetic_rows):
    arrays, x, fit, query = synthetic_rows
    with pytest.raises(DataError, match="feature set 'image' has 10 fit"):
        M.evaluate_morphology(arrays, fit, query, {"image": (x[:10], x[query])}, SMALL, 0)
    missing = {k: v for k, v in arrays.items() if k != "bar_no_fraction"}
    with pytest.raises(DataError, match="no column 'bar_no_fraction'"):
        M.evaluate_morphology(missing, fit, query, {}, SMALL, 0)


def test_morphology_settings_rules():
    config = spender.get_config("smoke")
    assert settings_lib.resolve(config, "probe").morphology.min_answers == 35
    config.morphology.val_fraction = 1.5
    with pytest.raises(ConfigError, match="morphology.val_fraction is 1.5; expected a value in"):
        settings_lib.resolve(config, "probe")
    del config["morphology"]
    with pytest.raises(ConfigError, match="no morphology section"):
        settings_lib.resolve(config, "probe")
