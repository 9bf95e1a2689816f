"""The faiss index (evaluation/index.py) against NumPy float64 brute force: exact below
`index.exact_max`, the approximate index above it with the recall@10 its metadata records
recomputed here; files memory-mapped, verified (meta.json too), refused when damaged or stale
and then rebuilt; `--mode=search` searching through the index; near-duplicates by sky
distance against astropy."""

import json
import os
import shutil
import subprocess
import types

import faiss
import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord

import cli_runs
from astroclip_jax import files
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


def _edit_meta(directory, change, reseal=True):
    """Apply ``change`` to the parsed meta.json (or write its return value's text when it
    returns a string), then reseal the directory when asked: a writer that also rewrote the
    checksums, so that only the structure and cross-checks can catch it."""
    path = os.path.join(directory, index_lib.META_FILE)
    with open(path) as f:
        meta = json.load(f)
    text = change(meta)
    with open(path, "w") as f:
        f.write(text if isinstance(text, str) else json.dumps(meta))
    if reseal:
        files.seal(directory, index_lib.CHECKSUMS_FILE)


def _reseal(change):
    def damage(directory):
        change(directory)
        files.seal(directory, index_lib.CHECKSUMS_FILE)
    return damage


def _truncate(name):
    def change(directory):
        path = os.path.join(directory, name)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 16)
    return change


def _write(name, content):
    def change(directory):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(content)
    return change


DAMAGE = {  # what happens to a built index -> what the refusal names
    "row count changed": (lambda d: _edit_meta(d, lambda m: m.update(n=m["n"] + 1),
                                               reseal=False), "meta.json"),
    "row count changed, resealed": (lambda d: _edit_meta(d, lambda m: m.update(n=m["n"] - 1)),
                                    "rows"),
    "a modality dropped from meta.json, resealed": (lambda d: _edit_meta(
        d, lambda m: m["modalities"].pop("image")), "names files"),
    "a modality dropped with its file, resealed": (lambda d: (
        os.remove(os.path.join(d, "image.faiss")),
        _edit_meta(d, lambda m: m["modalities"].pop("image"))), "the embeddings need"),
    "a column dropped with its file, resealed": (lambda d: (
        os.remove(os.path.join(d, "redshift.npy")),
        _edit_meta(d, lambda m: m["columns"].pop("redshift"))), "the embeddings need"),
    "key changed": (lambda d: _edit_meta(d, lambda m: m.update(embeddings_key="k2"),
                                         reseal=False), "meta.json"),
    "factory changed": (lambda d: _edit_meta(d, lambda m: m["modalities"]["image"].update(
        factory="HNSW32"), reseal=False), "meta.json"),
    "columns removed, resealed": (lambda d: _edit_meta(d, lambda m: m.pop("columns")),
                                  "columns"),
    "modalities a list, resealed": (lambda d: _edit_meta(
        d, lambda m: m.update(modalities=["image"])), "modalities"),
    "n a string, resealed": (lambda d: _edit_meta(d, lambda m: m.update(n=str(m["n"]))),
                             "row count"),
    "n true, resealed": (lambda d: _edit_meta(d, lambda m: m.update(n=True)), "row count"),
    "dim a float, resealed": (lambda d: _edit_meta(d, lambda m: m["modalities"]["image"].update(
        dim=32.0)), "modality 'image'"),
    "recall removed, resealed": (lambda d: _edit_meta(d, lambda m: m["modalities"]["image"].pop(
        "recall_at_10")), "modality 'image'"),
    "k_factor a string, resealed": (lambda d: _edit_meta(
        d, lambda m: m["modalities"]["image"].update(k_factor="8")), "modality 'image'"),
    "a file outside the index, resealed": (lambda d: _edit_meta(
        d, lambda m: m["columns"]["targetid"].update(file="../t.npy")), "column 'targetid'"),
    "an unknown column, resealed": (lambda d: _edit_meta(
        d, lambda m: m["columns"].update(z={"file": "targetid.npy"})), "columns"),
    "format 1, resealed": (lambda d: _edit_meta(d, lambda m: m.update(format_version=1)),
                           "format"),
    "format 1 as written before checksums.json": (lambda d: (
        _edit_meta(d, lambda m: m.update(format_version=1), reseal=False),
        os.remove(os.path.join(d, "checksums.json"))), "format 1 (older"),
    "not JSON, resealed": (lambda d: _edit_meta(d, lambda m: "{"), "not JSON"),
    "a JSON list, resealed": (lambda d: _edit_meta(d, lambda m: "[]"), "not a JSON object"),
    "meta.json removed": (lambda d: os.remove(os.path.join(d, index_lib.META_FILE)),
                          "meta.json is missing"),
    "checksums removed": (lambda d: os.remove(os.path.join(d, "checksums.json")),
                          "checksums.json"),
    "checksums not JSON": (_write("checksums.json", b"[1, 2"), "checksums.json"),
    "an extra file": (_write("extra.npy", b"x"), "extra.npy"),
    "a column truncated": (_truncate("targetid.npy"), "targetid.npy"),
    "a column truncated, resealed": (_reseal(_truncate("redshift.npy")), "redshift.npy"),
    "a column with other rows, resealed": (_reseal(lambda d: np.save(
        os.path.join(d, "index.npy"), np.arange(5))), "index.npy"),
    "a faiss file of garbage, resealed": (_reseal(_write("spectrum.faiss", b"not faiss" * 9)),
                                          "spectrum.faiss"),
    "a faiss file of other vectors, resealed": (_reseal(lambda d: faiss.write_index(
        faiss.IndexFlatIP(32), os.path.join(d, "image.faiss"))), "image.faiss"),
}


def test_a_damaged_changed_or_incomplete_index_is_refused_in_one_line_then_rebuilt(tmp_path):
    """Every file of the index directory, meta.json included, is verified; a meta.json whose
    structure or counts do not match is refused even when the checksums were rewritten with
    it. `open_or_build` then rebuilds an index that answers like NumPy brute force."""
    table = _table(700, seed=4)
    path = str(tmp_path / "t")
    embed.write_embeddings(path, table, {"split": "test"}, "k1", chunk_rows=300)
    manifest = embed.embedding_manifest(path)
    settings = types.SimpleNamespace(index=SETTINGS, seed=0)
    out = index_lib.index_dir(path)
    index_lib.open_or_build(path, manifest, settings, log=lambda _: None)
    pristine = str(tmp_path / "pristine")
    shutil.copytree(out, pristine)
    rows = np.arange(0, 700, 50)
    want, _ = _brute(table["image_embedding"][rows], table["spectrum_embedding"], 5)
    for case, (damage, names) in DAMAGE.items():
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        damage(out)
        with pytest.raises(DataError) as refused:
            index_lib.open_index(out, "k1", 700, manifest["columns"])
        message = str(refused.value)
        assert names in message and "\n" not in message, (case, message)
        assert out in message, (case, message)  # the file or directory is named
        logged = []
        rebuilt = index_lib.open_or_build(path, manifest, settings, log=logged.append)
        assert any("rebuilding" in line for line in logged), (case, logged)
        got, _ = rebuilt.search("spectrum", table["image_embedding"][rows], 5)
        np.testing.assert_array_equal(got, want, err_msg=case)
        assert index_lib.open_index(out, "k1", 700, manifest["columns"]).n == 700


def test_search_on_a_survey_says_in_one_line_why_not(smoke_run, tmp_path):
    """`--mode=search` needs both modalities and the split's records: a survey is refused in
    one line before anything is embedded."""
    from astroclip_jax.data.survey_files import write_survey_file

    path = write_survey_file(str(tmp_path / "south.h5"), np.zeros((3, 64, 64, 3), np.float32),
                             ra=np.zeros(3), dec=np.zeros(3))
    workdir = str(tmp_path / "run")
    shutil.copytree(smoke_run, workdir)
    proc = subprocess.run(cli_runs.command("search", workdir, f"--config.eval.survey_file={path}"),
                          cwd=cli_runs.ROOT, env=cli_runs.env(), capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: config field eval.survey_file") and "--mode=search" in lines[0]
    assert not os.path.exists(os.path.join(workdir, "embeddings", "survey-south"))


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
