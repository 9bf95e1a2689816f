"""Clustering on a small synthetic embedding: against direct scikit-learn and brute-force counts;
the mode's report on four separated blobs."""

import dataclasses

import matplotlib.pyplot as plt
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from astroclip_jax import settings as settings_lib
from astroclip_jax.evaluation import cluster, runner
from configs import spender


def _blobs(n_per=80, d=16, seed=0):
    """Four well separated unit-norm blobs; the last one is the 'artefact' population."""
    rng = np.random.default_rng(seed)
    centres = np.eye(d)[:4] * 3.0
    x = np.concatenate([c + rng.normal(0, 0.15, (n_per, d)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = np.repeat(np.arange(4), n_per)
    return x.astype(np.float32), truth


def test_kmeans_silhouette_matches_sklearn():
    x, truth = _blobs()
    best, scores, labels = cluster.kmeans_by_silhouette(x, 2, 5, seed=0)
    for k in range(2, 6):
        lab = KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(x.astype(np.float64))
        want = silhouette_score(x.astype(np.float64), lab, sample_size=len(x), random_state=0)
        np.testing.assert_allclose(scores[k], want, rtol=1e-12)
    assert best == 4
    # The 4 clusters are the 4 blobs (up to label names).
    assert len({(a, b) for a, b in zip(truth, labels)}) == 4


def test_artefact_island_counts():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, -1, -1])
    art = np.array([0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0])
    r = cluster.artefact_island(labels, art)
    # Island 2: 2/2 artefacts (share 1.0), holding 2 of 7. Island 1: 3 of 4, the most artefacts.
    assert r["label"] == 2 and r["purity"] == 1.0 and r["recall"] == 2 / 7 and r["size"] == 2
    m = r["most_artefacts"]
    assert m["label"] == 1 and m["purity"] == 3 / 4 and m["recall"] == 3 / 7
    assert r["n_artefact"] == 7 and r["base_rate"] == 7 / 11


def test_analyse_finds_the_artefact_island():
    # 1200 points: at eps 0.2 (raw UMAP coordinates, as the paper) a few hundred would fragment.
    x, truth = _blobs(n_per=300)
    rng = np.random.default_rng(1)
    spec = x[:, ::-1] + rng.normal(0, 0.01, x.shape).astype(np.float32)
    arrays = {"image_embedding": x, "spectrum_embedding": spec,
              "artefact": (truth == 3).astype(np.int8)}
    projections, dbscan, km_labels, report = cluster.analyse(
        arrays, n_neighbors=15, eps=0.2, min_samples=5, k_min=3, k_max=5, seed=0,
        n_epochs=200)
    assert set(projections) == {"image", "spectrum", "joint"}
    assert projections["image"].shape == (len(x), 2)
    art = report["artefact"]["image"]
    assert art["purity"] == 1.0 and art["recall"] > 0.9 and report["eps_applied"] == 0.2
    assert report["kmeans"]["best_k"] == 4
    # DBSCAN labels are those of scikit-learn on the same projection.
    from sklearn.cluster import DBSCAN
    np.testing.assert_array_equal(
        dbscan["image"], DBSCAN(eps=0.2, min_samples=5).fit_predict(projections["image"]))


def test_density_scaled_eps():
    assert cluster.applied_eps(0.2, cluster.PAPER_N, "density") == 0.2
    np.testing.assert_allclose(cluster.applied_eps(0.2, cluster.PAPER_N // 4, "density"), 0.4,
                               rtol=1e-4)
    assert cluster.applied_eps(0.2, 10, "raw") == 0.2


def test_report_clusters_and_samples_every_kmeans_cluster():
    x, truth = _blobs(n_per=40)
    n = len(x)
    arrays = {"image_embedding": x, "spectrum_embedding": x[:, ::-1].copy(),
              "has_props": np.zeros(n, bool), "z_hp": np.full(n, np.nan, np.float32),
              "log_mstar": np.full(n, np.nan, np.float32)}
    asked = []

    def examples(rows):
        asked.append(np.asarray(rows))
        return {"image": {int(r): np.full((8, 8, 3), 0.5, np.float32) for r in rows},
                "spectrum": {int(r): np.sin(np.arange(50) + r) for r in rows},
                "wave": np.linspace(3600, 9824, 50)}

    settings = dataclasses.replace(settings_lib.resolve(spender.get_config("smoke")).eval,
                                   kmeans_k_min=2, kmeans_k_max=6, dbscan_scale="density",
                                   seed=0)
    result = cluster.report(runner.EvalInputs(arrays=arrays, meta={"n": n, "split": "test"},
                                              settings=settings, examples=examples))
    out = result.report
    # The four blobs are the four k-Means clusters of the spectrum embeddings.
    assert out["kmeans"]["best_k"] == 4 and sorted(out["kmeans"]["sizes"].values()) == [40] * 4
    assert out["eps_applied"] == pytest.approx(0.2 * np.sqrt(cluster.PAPER_N / n))
    assert out["n"] == n and out["params"]["dbscan_scale"] == "density"
    assert set(out["dbscan"]) == {"image", "spectrum", "joint"}
    # Samples: N_SAMPLE_IMAGES galaxies of every k-Means cluster (= every blob), read once.
    (rows,) = asked
    assert all(np.sum(truth[rows] == blob) >= cluster.N_SAMPLE_IMAGES for blob in range(4))
    assert len(np.unique(rows)) == len(rows)
    assert {"umap_image.png", "umap_spectrum.png", "umap_joint.png", "dbscan_image.png",
            "kmeans_spectrum.png", "kmeans_spectra.png", "kmeans_images.png"} <= set(result.figures)
    for fig in result.figures.values():
        plt.close(fig)
    # Without properties the maps are grey, and the summary says why.
    assert any("no galaxy of this split has properties" in line for line in result.lines)
    assert result.lines[-1] == "cluster: k-Means best k=4 (silhouette)"
