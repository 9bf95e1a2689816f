"""The faiss index (evaluation/index.py) against NumPy float64 brute force: exact below
`index.exact_max`, the approximate index above it with the recall@10 its metadata records
recomputed here; files memory-mapped, verified, and refused when damaged; `--mode=search`
searching through the index; near-duplicates by sky distance against astropy."""

import json
import os

import faiss
import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord

import cli_runs
from astroclip_jax import settings as settings_lib
from astroclip_jax.errors import DataError
from astroclip_jax.evaluation import embed, search
from astroclip_jax.evaluation import index as index_lib
from astroclip_jax.serving import queries

faiss.omp_set_num_threads(1)  # small searches: OpenMP teams only wait on a shared 2-core machine
SETTINGS = settings_lib.IndexSettings(exact_max=5000, pq_dims_per_code=2, recall_target=0.95,
                                      recall_queries=300, k_factor_max=512, train_rows=65536)


def _table(n, d=32, seed=0):
    """Unit vectors around 40 centres (as embeddings cluster), a noisy second modality, and
    shuffled 64-bit target ids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, d))
    x = centres[rng.integers(0, 40, n)] + 0.6 * rng.normal(size=(n, d))
    y = x + 0.4 * rng.normal(size=(n, d))
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return {"image_embedding": unit(x), "spectrum_embedding": unit(y),
            "targetid": (rng.permutation(n) * 7 + 39 * 10 ** 15).astype(np.int64),
            "index": np.arange(n, dtype=np.int64),
            "redshift": rng.uniform(0, 0.6, n).astype(np.float32)}


def _build(table, out, settings=SETTINGS, key="k1", chunk=3000):
    n = len(table["targetid"])
    chunks = lambda: ({c: v[s:s + chunk] for c, v in table.items()}  # noqa: E731
                      for s in range(0, n, chunk))
    index_lib.build(chunks, n, str(out), key, settings, seed=0, log=lambda _: None)
    return index_lib.open_index(str(out), key)


def _brute(queries_, keys, k):
    """float64 inner products (unit rows: cosine), stable argsort: (rows, sims)."""
    sims = np.asarray(queries_, np.float64) @ np.asarray(keys, np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, 1)


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    table = _table(2500)
    return table, _build(table, tmp_path_factory.mktemp("exact") / "t.index")


@pytest.fixture(scope="module")
def approximate(tmp_path_factory):
    table = _table(12000, seed=1)
    return table, _build(table, tmp_path_factory.mktemp("approx") / "t.index")


def test_exact_index_equals_brute_force_in_every_direction(exact):
    table, run_index = exact
    rows = np.arange(0, 2500, 7)
    for name, (a, b) in search.DIRECTIONS.items():
        got, sims = run_index.search(b.split("_")[0], table[a][rows], 10, exclude=rows)
        want, want_sims = _brute(table[a][rows], table[b], 11)
        want = np.stack([w[w != r][:10] for w, r in zip(want, rows)])
        np.testing.assert_array_equal(got, want, err_msg=name)
        np.testing.assert_allclose(sims, np.take_along_axis(
            np.asarray(table[a][rows], np.float64) @ np.asarray(table[b], np.float64).T,
            want, 1), atol=1e-5)
        assert not np.any(got == rows[:, None])
    assert run_index.meta["modalities"]["image"]["factory"] == "Flat"


def test_approximate_index_records_the_recall_numpy_measures(approximate):
    table, run_index = approximate
    n = len(table["targetid"])
    rng = np.random.default_rng(run_index.meta["recall_rows_seed"])
    own = np.sort(rng.choice(n, size=SETTINGS.recall_queries, replace=False))
    for m, entry in run_index.meta["modalities"].items():
        assert entry["factory"] == "PQ16x4fs,RFlat"
        for q in ("image", "spectrum"):
            vectors = table[f"{q}_embedding"][own]
            truth, _ = _brute(vectors, table[f"{m}_embedding"], 11)
            found, sims = run_index.search(m, vectors, 11)
            recall = index_lib.recall_at_k(found, truth, own, 10)
            recorded = entry["recall_at_10"][f"{q}_queries"]
            assert recorded >= SETTINGS.recall_target
            assert recall == pytest.approx(recorded, abs=2e-3)  # float32 vs float64 near-ties
            # The re-rank is exact: returned similarities are the true inner products.
            np.testing.assert_allclose(sims, np.einsum(
                "qd,qkd->qk", vectors.astype(np.float64),
                table[f"{m}_embedding"][found].astype(np.float64)), atol=1e-5)


def test_fresh_queries_reach_the_recall_too(approximate):
    table, run_index = approximate
    rng = np.random.default_rng(7)
    fresh = table["image_embedding"][rng.choice(12000, 200)] + 0.2 * rng.normal(size=(200, 32))
    fresh = (fresh / np.linalg.norm(fresh, axis=1, keepdims=True)).astype(np.float32)
    truth, _ = _brute(fresh, table["spectrum_embedding"], 10)
    found, _ = run_index.search("spectrum", fresh, 10)
    assert index_lib.recall_at_k(found, truth, None, 10) >= 0.93


def test_files_are_memory_mapped_and_rows_found_by_targetid(exact):
    table, run_index = exact
    with open("/proc/self/maps") as f:
        mapped = f.read()
    for entry in [*run_index.meta["modalities"].values(), *run_index.meta["columns"].values()]:
        assert os.path.join(run_index.directory, entry["file"]) in mapped, entry["file"]
    where = {int(t): i for i, t in enumerate(table["targetid"])}
    for tid in table["targetid"][::97]:
        assert run_index.row_of(int(tid)) == where[int(tid)]
    assert run_index.row_of(12345) is None
    np.testing.assert_allclose(run_index.vectors("spectrum", [3, 9]),
                               table["spectrum_embedding"][[3, 9]], atol=0)


def test_a_damaged_or_stale_index_is_refused(tmp_path):
    table = _table(600, seed=3)
    out = tmp_path / "t.index"
    _build(table, out)
    with pytest.raises(DataError, match="other embeddings"):
        index_lib.open_index(str(out), "another key")
    path = out / "spectrum.faiss"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="spectrum.faiss"):
        index_lib.open_index(str(out), "k1")
    (out / index_lib.META_FILE).write_text("{")
    with pytest.raises(DataError, match="meta.json"):
        index_lib.open_index(str(out))


def test_search_report_through_the_index_equals_brute_force(exact):
    table, run_index = exact
    z = table["redshift"].astype(np.float64)
    arrays = {**table, "redshift": z}
    got, _ = search.evaluate(arrays, 6, 0, score_queries=300,
                             topk=search.index_topk(run_index))
    want, _ = search.evaluate(arrays, 6, 0, score_queries=300)
    assert got == want


def test_search_mode_uses_the_runs_index(smoke_run):
    cli_runs.run("search", smoke_run, "--config.eval.overwrite=True")
    table = embed.embeddings_path(smoke_run, "test")
    with open(os.path.join(index_lib.index_dir(table), index_lib.META_FILE)) as f:
        meta = json.load(f)
    arrays, _, _ = embed.read_embeddings(table)
    assert meta["n"] == len(arrays["targetid"]) and meta["modalities"]["image"]["factory"] == "Flat"
    with open(os.path.join(smoke_run, "search", "results.json")) as f:
        results = json.load(f)
    for entry in results["queries"]:
        row = int(np.flatnonzero(arrays["targetid"] == entry["targetid"])[0])
        for name, (a, b) in search.DIRECTIONS.items():
            order, sims = _brute(arrays[a][[row]], arrays[b], 9)
            keep = order[0] != row
            want_sims = sims[0][keep][:8]
            got_rows = [int(np.flatnonzero(arrays["targetid"] == t)[0]) for t in entry[name]]
            got_sims = np.asarray(arrays[a][row], np.float64) @ \
                np.asarray(arrays[b][got_rows], np.float64).T
            np.testing.assert_allclose(got_sims, want_sims, atol=1e-5, err_msg=name)


def test_near_duplicates_by_target_id_and_sky_distance_match_astropy():
    rng = np.random.default_rng(5)
    n = 60
    ra, dec = rng.uniform(0, 360, n), rng.uniform(-80, 80, n)
    close = rng.choice(n, 20, replace=False)  # neighbours placed 0-4 arcsec from another one
    for i, j in zip(close[::2], close[1::2]):
        ra[j], dec[j] = ra[i] + rng.uniform(0, 2) / 3600 / np.cos(np.radians(dec[i])), \
            dec[i] + rng.uniform(-2, 2) / 3600
    tids = rng.integers(0, 40, n)  # repeated target ids too
    radec = np.stack([ra, dec], 1)
    sky = SkyCoord(ra * u.deg, dec * u.deg)
    np.testing.assert_allclose(queries.separation_arcsec(ra[0], dec[0], ra, dec),
                               sky[0].separation(sky).arcsec, atol=1e-6)
    query = (ra[close[0]], dec[close[0]])
    got = queries.keep_distinct(tids, radec, query_targetid=int(tids[1]), query_radec=query,
                                arcsec=2.5)
    # Reference: the same greedy rule with astropy's separations.
    kept, seen = [SkyCoord(query[0] * u.deg, query[1] * u.deg)], {int(tids[1])}
    want = []
    for i in range(n):
        ok = int(tids[i]) not in seen and all(sky[i].separation(c).arcsec > 2.5 for c in kept)
        want.append(ok)
        if ok:
            seen.add(int(tids[i]))
            kept.append(sky[i])
    np.testing.assert_array_equal(got, want)
    assert 0 < got.sum() < n - 20
