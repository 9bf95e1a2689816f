"""The `mmu` data path end to end from the command line: tiny Multimodal Universe folders in the
upstream layout (tests/mmu_files.py) and a PROVABGS catalogue, `prepare` -> `train` ->
`eval_knn` -> `probe` with smoke-sized towers. The pairs are the one-to-one cross-match, the
evaluation sees the catalogue's redshift and log M*, and its held-out scores are scikit-learn's
on the run's own embeddings."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import r2_score
from sklearn.neighbors import KNeighborsRegressor

import cli_runs
import mmu_files
from astroclip_jax.data import provabgs
from test_data_formats import write_provabgs

N = 200  # pairs: the test split (the last 20 %) has 40, enough for eval_knn's 16 neighbours


@pytest.fixture(scope="module")
def mmu_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmu_run")
    rng = np.random.default_rng(5)
    targets = rng.choice(10**6, size=N, replace=False).astype(np.int64)
    ra, dec = 150 + rng.uniform(0, 0.3, N), 2 + rng.uniform(0, 0.3, N)
    z = rng.uniform(0.02, 0.4, N)
    half = N // 2
    mmu_files.write_desi(root, 1, targets[:half], ra[:half], dec[:half], z[:half], seed=1)
    mmu_files.write_desi(root, 2, targets[half:], ra[half:], dec[half:], z[half:], seed=2)
    jitter = rng.normal(0, 0.1 / 3600, (2, N))
    mmu_files.write_ssl(root, 1, np.arange(N) + 7, ra + jitter[0], dec + jitter[1], seed=3)
    logm = 9.0 + 3.0 * z + 0.1 * rng.normal(size=N)
    write_provabgs(root / provabgs.FILENAME,
                   [(int(t), float(zz), float(m), 19.0, 18.5, 18.0)
                    for t, zz, m in zip(targets, z, logm)])
    workdir = str(root / "run")
    flags = (f"--config.data.data_dir={root / 'tfds'}", "--config.data.name=mmu_pairs",
             "--config.data.builder_config=grz_152_provabgs",
             f"--config.data.mmu_desi_dir={root / 'dr1_main'}",
             f"--config.data.mmu_legacysurvey_dir={root / 'south'}",
             f"--config.data.provabgs_path={root / provabgs.FILENAME}",
             "--config.probe.regression_targets=('z_hp','log_mstar')",
             "--config.probe.classification_targets=()", "--config.probe.photometry_columns=()",
             "--config.probe.feature_sets=('image','spectrum')",
             "--config.probe.curve_features=()", "--config.probe.supervised=()",
             "--config.morphology.enabled=False", "--config.posterior.feature_sets=('spectrum',)")
    for mode in ("train", "eval_knn", "probe"):
        cli_runs.run(mode, workdir, *flags)
    return workdir, dict(zip(targets.tolist(), zip(z, logm)))


def test_probe_on_mmu_pairs_scores_the_catalogue_properties(mmu_run):
    workdir, truth = mmu_run
    with open(os.path.join(workdir, "probe", "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    frame = pd.concat([pd.read_parquet(os.path.join(workdir, "embeddings", "test", name))
                       for name in sorted(os.listdir(os.path.join(workdir, "embeddings", "test")))
                       if name.endswith(".parquet")])
    # Every pair is a DESI target with its catalogue values (the join by TARGETID).
    for tid, z_hp, logm in zip(frame["targetid"], frame["z_hp"], frame["log_mstar"]):
        np.testing.assert_allclose([z_hp, logm], truth[int(tid)], rtol=1e-6)
    held_out = np.isin(frame["targetid"], results["held_out_targetids"])
    x = np.stack(frame["spectrum_embedding"].to_numpy())
    y = frame["z_hp"].to_numpy(np.float64)
    want = r2_score(y[held_out], KNeighborsRegressor(16, weights="distance").fit(
        x[~held_out], y[~held_out]).predict(x[held_out]))
    (got,) = [e for e in results["entries"] if e["features"] == "spectrum"
              and e["method"] == "knn16" and e["target"] == "z_hp"]
    np.testing.assert_allclose(got["mean"], want, atol=1e-9)
    assert any(e["metric"] == "nll" for e in results["posterior"]["entries"])
