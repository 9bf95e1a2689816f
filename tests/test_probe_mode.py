"""`--mode=probe` end to end on a one-epoch smoke run: the table, results.json and the figure,
the zero-shot scores equal scikit-learn's on the run's own embeddings and held-out rows, the
held-out rows are those of `eval_knn`, and a supervised bound trains on the shared loop."""

import json
import os
import shutil

import numpy as np
import pytest
from sklearn.metrics import r2_score
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import cli_runs
from astroclip_jax import settings as settings_lib
from astroclip_jax.evaluation import embed, knn
from configs import spender


@pytest.fixture(scope="module")
def probed(smoke_run, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("probe") / "run")
    shutil.copytree(smoke_run, workdir, ignore=shutil.ignore_patterns("export", "probe*"))
    proc = cli_runs.run("probe", workdir, "--config.probe.feature_sets=('image','photometry')",
                        "--config.probe.curve_features=('image',)",
                        "--config.probe.supervised=('photometry',)")
    with open(os.path.join(workdir, "probe", "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    config = spender.get_config("smoke")
    config.data.data_dir = cli_runs.DATA_DIR
    arrays, _, _ = embed.load_or_compute_embeddings(settings_lib.resolve(config), workdir)
    return workdir, proc.stdout, results, arrays


def _entry(results, features, method, target, fraction=1.0, metric="r2"):
    (e,) = [e for e in results["entries"] if e["features"] == features and e["method"] == method
            and e["target"] == target and e["metric"] == metric and e["fraction"] == fraction]
    return e


def test_zero_shot_scores_equal_sklearn_on_the_held_out_rows(probed):
    _, _, results, arrays = probed
    held_out = np.isin(arrays["targetid"], results["held_out_targetids"])
    fit = np.asarray(arrays["has_props"], bool) & ~held_out
    assert held_out.sum() == results["n_query"] and fit.sum() == results["n_labelled_fit"]
    # The same held-out galaxies as eval_knn's split (the paper's protocol).
    rows = knn.property_rows(arrays)
    _, query = knn.holdout_split(len(rows), 20, 0.2, 0)
    assert set(arrays["targetid"][rows[query]]) == set(results["held_out_targetids"])
    for column in ("z_hp", "log_mstar", "log_ssfr"):
        x, y = arrays["image_embedding"], np.asarray(arrays[column], np.float64)
        paper = KNeighborsRegressor(n_neighbors=16, weights="distance").fit(x[fit], y[fit])
        v2 = make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=8,
                                                                 weights="distance"))
        # AstroCLIP v2's on float64 features: the probe standardises in float64 (sklearn keeps
        # a float32 input's precision); the paper's on the stored float32 ones, as eval_knn.
        v2.fit(x[fit].astype(np.float64), y[fit])
        for method, model, xq in (("knn16", paper, x[held_out]),
                                  ("knn64_std", v2, x[held_out].astype(np.float64))):
            want = r2_score(y[held_out], model.predict(xq))
            assert _entry(results, "image", method, column)["mean"] == pytest.approx(want,
                                                                                   abs=1e-9)


def test_report_table_figure_and_supervised_bound(probed):
    workdir, stdout, results, _ = probed
    assert "modality" in stdout and "MLP @25%" in stdout and "probe timings" in stdout
    for column in ("z_hp", "log_mstar", "r_eff_kpc"):
        few = _entry(results, "image", "mlp", column, fraction=0.25)
        n_fit = results["n_labelled_fit"]  # 52 test rows - 10 held out
        assert len(few["values"]) == 2 and few["n_labelled"] == round(0.25 * n_fit)  # 2 seeds
        bound = _entry(results, "magnitudes_mlp", "supervised", column)
        assert np.isfinite(bound["mean"])
    for metric in ("accuracy", "roc_auc"):
        _entry(results, "image", "ridge", "artefact", metric=metric)
    summary = results["supervised"]["photometry"]
    assert summary["epochs"] == 2 and summary["n_train"] + summary["n_val"] == n_fit
    assert os.path.isfile(os.path.join(summary["directory"], "training_curves.png"))
    assert os.path.getsize(os.path.join(workdir, "probe", "few_shot.png")) > 20_000


def test_morphology_section_scores_the_questions_on_their_own_rows(probed):
    """The Galaxy Zoo section: every question with held-out rows of > 34 answers is scored
    (accuracy and F1 in [0, 1]) on exactly those rows, counted here from the table."""
    from astroclip_jax.data import galaxy_zoo

    workdir, stdout, results, arrays = probed
    assert "Galaxy Zoo DECaLS morphology" in stdout
    morph = results["morphology"]
    root = np.nan_to_num(np.asarray(arrays["smooth-or-featured_total-votes"], np.float64))
    rows = np.flatnonzero(root > 0)
    _, query = knn.holdout_split(len(rows), 20, 0.2, 0)
    assert morph["n_query"] == len(query)
    for q in galaxy_zoo.schema():
        total = np.nan_to_num(np.asarray(arrays[galaxy_zoo.total_column(q.name)], np.float64))
        n = int(np.sum(total[rows[query]] >= 35))
        if n == 0:
            assert q.name in morph["skipped"]
            continue
        assert morph["questions"][q.name]["n_query"] == n
        for metric in ("accuracy", "f1"):
            (e,) = [e for e in morph["entries"] if e["features"] == "image"
                    and e["target"] == q.name and e["metric"] == metric]
            assert 0.0 <= e["mean"] <= 1.0
    assert os.path.getsize(os.path.join(workdir, "probe", "morphology.png")) > 10_000


def test_posterior_section_has_every_target_with_calibration(probed):
    """The flow ensembles' section: each regression target of the run has its NLL (one value
    per member), the KS p-value and the interval coverages, and both figures are written."""
    workdir, stdout, results, arrays = probed
    assert "Posteriors (flow ensembles)" in stdout
    entries = results["posterior"]["entries"]
    ensemble = spender.get_config("smoke").posterior.ensemble
    for target in results["probe"]["regression_targets"]:
        for features in ("image", "spectrum"):
            got = {e["metric"]: e for e in entries
                   if e["features"] == features and e["target"] == target}
            assert len(got["nll"]["values"]) == ensemble and np.isfinite(got["nll"]["mean"])
            assert 0.0 <= got["pit_ks_p"]["mean"] <= 1.0
            assert 0.0 <= got["coverage68"]["mean"] <= got["coverage95"]["mean"] <= 1.0
    for name in ("posterior_calibration.png", "posteriors.png"):
        assert os.path.getsize(os.path.join(workdir, "probe", name)) > 10_000
