"""Retrieval equals brute-force NumPy top-k (argsort of cosine similarity), in the pure
functions and in the mode's report."""

import dataclasses

import matplotlib.pyplot as plt
import numpy as np
import pytest

from astroclip_jax import settings as settings_lib
from astroclip_jax.evaluation import runner, search
from configs import spender


def _brute_topk(queries, keys, k, exclude=None):
    """Cosine = dot / (|q| |k|), then a stable argsort of the negated similarities."""
    sims = (queries @ keys.T) / np.outer(np.linalg.norm(queries, axis=1),
                                         np.linalg.norm(keys, axis=1))
    out = []
    for r in range(len(queries)):
        order = np.argsort(-sims[r], kind="stable")
        if exclude is not None:
            order = order[order != exclude[r]]
        out.append(order[:k])
    return np.array(out)


def test_topk_equals_brute_force_in_all_directions():
    rng = np.random.default_rng(0)
    n, d, k = 1300, 16, 8  # > one similarity block of 512 query rows
    arrays = {"image_embedding": rng.normal(size=(n, d)),
              "spectrum_embedding": rng.normal(size=(n, d)) * rng.uniform(0.5, 2, (n, 1))}
    queries = rng.choice(n, size=700, replace=False)
    for name, (a, b) in search.DIRECTIONS.items():
        got, sims = search.cosine_topk(arrays[a][queries], arrays[b], k, exclude=queries)
        want = _brute_topk(arrays[a][queries], arrays[b], k, exclude=queries)
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert np.all(np.diff(sims, axis=1) <= 0)
        assert not np.any(got == queries[:, None])
    got, _ = search.cosine_topk(arrays["image_embedding"][:50], arrays["spectrum_embedding"], k)
    np.testing.assert_array_equal(got, _brute_topk(arrays["image_embedding"][:50],
                                                   arrays["spectrum_embedding"], k))


def test_ties_break_by_index():
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    got, _ = search.cosine_topk(np.array([[1.0, 0.0]]), keys, 3)
    np.testing.assert_array_equal(got, [[0, 2, 3]])


def _circle_table(n=400, seed=1):
    """Embeddings on a circle parametrised by redshift (neighbours in z are neighbours here)."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0, 1, n)
    emb = np.stack([np.cos(3 * z), np.sin(3 * z)], 1) + rng.normal(0, 0.01, (n, 2))
    return {"image_embedding": emb, "spectrum_embedding": emb + rng.normal(0, 1e-4, (n, 2)),
            "redshift": z, "targetid": np.arange(n, dtype=np.int64) * 7 + 2 ** 40}


def test_delta_z_score_and_pair_retrieval():
    arrays = _circle_table()
    z = arrays["redshift"]
    scores, queries = search.evaluate(arrays, k=4, seed=0, score_queries=100)
    for name, s in scores.items():
        # Brute force: medians of |dz| over the top-4 (self excluded) of the same queries.
        a, b = search.DIRECTIONS[name]
        nbrs = _brute_topk(arrays[a][queries], arrays[b], 4, exclude=queries)
        want = np.median(np.abs(z[queries][:, None] - z[nbrs]))
        np.testing.assert_allclose(s["median_abs_dz_topk"], want, rtol=1e-12)
        assert s["median_abs_dz_topk"] < 0.2 * s["median_abs_dz_random"]
    pairs = scores["image_to_spectrum"]["pair_retrieval"]
    assert pairs["top4"] >= pairs["top1"] > 0.2


def test_random_others_never_pick_the_query():
    rng = np.random.default_rng(2)
    q = np.arange(50)
    r = search.random_others(51, q, 50, rng)
    assert not np.any(r == q[:, None])
    assert all(len(set(row)) == 50 for row in r)


def _inputs(arrays, asked, **eval_fields):
    def examples(rows):
        asked.append(np.asarray(rows))
        return {"image": {int(r): np.full((8, 8, 3), 0.5, np.float32) for r in rows},
                "spectrum": {int(r): np.sin(np.arange(50) + r) for r in rows},
                "wave": np.linspace(3600, 9824, 50)}

    settings = settings_lib.resolve(spender.get_config("smoke")).eval
    return runner.EvalInputs(arrays=arrays, meta={"split": "test"}, examples=examples,
                             settings=dataclasses.replace(settings, **eval_fields))


def test_report_shows_the_requested_queries_and_their_neighbours():
    arrays, asked = _circle_table(), []
    targetids = tuple(int(arrays["targetid"][r]) for r in (17, 5, 300))
    result = search.report(_inputs(arrays, asked, search_k=4, search_targetids=targetids,
                                   seed=0))
    queries = np.array([17, 5, 300])
    shown = [queries]
    for r, entry in enumerate(result.report["queries"]):
        assert entry["targetid"] == targetids[r]
        assert entry["redshift"] == arrays["redshift"][queries[r]]
    for name, (a, b) in search.DIRECTIONS.items():
        nbrs = _brute_topk(arrays[a][queries], arrays[b], 4, exclude=queries)
        shown.append(nbrs.ravel())
        assert [e[name] for e in result.report["queries"]] == arrays["targetid"][nbrs].tolist()
    # The figures show exactly the queries and their neighbours, read once.
    (rows,) = asked
    np.testing.assert_array_equal(rows, np.unique(np.concatenate(shown)))
    assert sorted(result.figures) == ["figure6.png", "figure7_image_to_spectrum.png",
                                      "figure7_spectrum_to_spectrum.png"]
    for fig in result.figures.values():
        plt.close(fig)
    # The scores are those of the seeded score queries (checked against brute force above).
    scores, score_queries = search.evaluate(arrays, 4, 0)
    assert result.report["scores"] == scores and result.report["k"] == 4
    assert result.report["n_score_queries"] == len(score_queries) == 400
    assert len(result.lines) == len(search.DIRECTIONS)


def test_report_names_query_ids_missing_from_the_split():
    arrays = _circle_table(n=50)
    with pytest.raises(ValueError, match="search_targetids"):
        search.report(_inputs(arrays, [], search_targetids=(int(arrays["targetid"][3]), 12345)))
