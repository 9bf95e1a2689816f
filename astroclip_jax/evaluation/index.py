"""A faiss vector index over a run's embeddings: exact up to a measured size, approximate above.

    run_index = index.open_run_index(settings, workdir)    # built once, then memory-mapped
    rows, sims = run_index.search("spectrum", image_vectors, k=10, exclude=query_rows)

Saved beside the embeddings table as ``workdir/embeddings/<split>.index/``: one faiss file per
modality (``image.faiss``, ``spectrum.faiss``), the catalogue columns the search page shows
(``targetid``, the record ``index``, ``redshift``, ``log_mstar``, and ``ra``/``dec`` where the
table has them) as ``.npy``, ``meta.json`` (the embeddings key and row count it was built
from, each index's kind, build time and measured recall@10), and, written last,
``checksums.json``: the size and sha256 of every other file, ``meta.json`` included
(`files.seal`). When opened, every file is checked against it, no other file may be there,
``meta.json`` must have the documented structure, name exactly the other files, and match
the embeddings (key, row count, columns), and each faiss index and column must hold that many
rows; anything else makes the index
damaged or stale, and `open_or_build` rebuilds it. Then everything is memory-mapped (faiss
``IO_FLAG_MMAP | IO_FLAG_MMAP_IFC``, NumPy ``mmap_mode="r"``), so opening a survey-sized index
costs page cache, not a copy in memory.

Which index (the embeddings are unit vectors, so inner product = cosine similarity):
- up to ``index.exact_max`` rows: ``IndexFlatIP``, exact. One query scans every vector: about
  45 ms per million 128-d vectors on this project's 2-core machine
  (``benchmarks/search_index.py``), hence the default limit of 200,000 (about 10 ms).
- above it: 4-bit product-quantisation fast scan (``PQ{D/2}x4fs``: 32 bytes per 128-d vector,
  SIMD scanned) whose best ``k_factor * k`` candidates are re-ranked exactly against the full
  vectors (``RFlat``). ``k_factor`` is raised until the recall@10 against exact search, on
  ``index.recall_queries`` seeded rows of the table used as queries of both modalities (the
  query row itself left out), reaches ``index.recall_target``; the result is in the metadata.
  IVF and HNSW were measured and not chosen: on 1 M random 128-d unit vectors IVF1024 at
  nprobe 256 reaches recall@10 0.73 (30 ms) and HNSW32 at efSearch 512 reaches 0.76 on 200 k
  after a 141 s build, while PQ64x4fs + re-rank reaches 0.99 in about 6 ms.

The table is read chunk by chunk (``embed.iter_embedding_chunks``), so building needs memory
for the index and one chunk, not for the whole table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Iterable, Mapping

import numpy as np

from astroclip_jax import files
from astroclip_jax import settings as settings_lib
from astroclip_jax.errors import ConfigError, DataError

FORMAT_VERSION = 2  # 2: sealed by CHECKSUMS_FILE (1 checked its files from meta.json alone)
RECALL_K = 10
META_FILE = "meta.json"
CHECKSUMS_FILE = "checksums.json"
MODALITIES = {"image": "image_embedding", "spectrum": "spectrum_embedding"}
# Catalogue columns kept with the index (what a result table shows), where the table has them.
CATALOGUE = ("targetid", "index", "redshift", "log_mstar", "ra", "dec")


def _faiss():
    import faiss

    return faiss


def index_dir(embeddings_directory: str) -> str:
    """``<table>.index`` beside the embeddings table ``<table>``."""
    return os.path.abspath(embeddings_directory).rstrip(os.sep) + ".index"


# --------------------------------------------------------------------------------------------
# Building one index
# --------------------------------------------------------------------------------------------

def factory_string(n: int, dim: int, settings: settings_lib.IndexSettings) -> str:
    """The faiss factory string of the index for ``n`` vectors of ``dim`` (module docstring)."""
    if n <= settings.exact_max:
        return "Flat"
    codes = dim // settings.pq_dims_per_code
    if dim % settings.pq_dims_per_code or codes % 2:
        raise DataError(f"embedding dimension {dim} does not split into an even number of "
                        f"sub-vectors of config field index.pq_dims_per_code = "
                        f"{settings.pq_dims_per_code}")
    return f"PQ{codes}x4fs,RFlat"


def new_index(n: int, dim: int, settings: settings_lib.IndexSettings):
    faiss = _faiss()
    return faiss.index_factory(dim, factory_string(n, dim, settings), faiss.METRIC_INNER_PRODUCT)


def topk_exact_streamed(queries: np.ndarray, chunks: Iterable[np.ndarray], k: int):
    """Exact inner-product top-``k`` rows of ``queries`` over vectors given chunk by chunk:
    (similarities (Q, k), rows (Q, k)), merged across chunks with faiss's result heap."""
    faiss = _faiss()
    queries = np.ascontiguousarray(queries, np.float32)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    start = 0
    for chunk in chunks:
        flat = faiss.IndexFlatIP(queries.shape[1])
        flat.add(np.ascontiguousarray(chunk, np.float32))
        sims, rows = flat.search(queries, min(k, len(chunk)))
        heap.add_result(np.ascontiguousarray(sims), np.where(rows >= 0, rows + start, -1))
        start += len(chunk)
    heap.finalize()
    return heap.D, heap.I


def recall_at_k(found: np.ndarray, truth: np.ndarray, own: np.ndarray | None, k: int) -> float:
    """Mean fraction of each row's true top-``k`` that ``found`` holds, with the query's own
    row (``own``, or none) left out of both lists first (a search never returns it)."""
    hits = []
    for r in range(len(truth)):
        t = [x for x in truth[r] if own is None or x != own[r]][:k]
        f = [x for x in found[r] if own is None or x != own[r]][:k]
        hits.append(len(set(t) & set(f)) / max(len(t), 1))
    return float(np.mean(hits))


def tune_k_factor(index, queries: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
                  own: np.ndarray, settings: settings_lib.IndexSettings) -> dict[str, Any]:
    """The smallest power-of-two re-rank depth reaching ``recall_target`` for every query
    modality (or ``k_factor_max``); sets it on ``index``. Returns the measured recalls."""
    k_factor = 1
    while True:
        index.k_factor = k_factor
        recall = {name: recall_at_k(index.search(q, RECALL_K + 1)[1], truth[name], own,
                                    RECALL_K) for name, q in queries.items()}
        if min(recall.values()) >= settings.recall_target or k_factor >= settings.k_factor_max:
            return {"k_factor": k_factor, "recall_at_10": recall}
        k_factor *= 2


# --------------------------------------------------------------------------------------------
# Building a run's index from its embeddings table
# --------------------------------------------------------------------------------------------

def build(chunks, n: int, out: str, key: str, settings: settings_lib.IndexSettings,
          seed: int, log=print) -> dict[str, Any]:
    """Build the index directory ``out`` from an embeddings table.

    ``chunks()`` returns a fresh iterator of table chunks ({column: array}, rows in order)
    holding the embedding columns and the catalogue columns; ``n`` is the table's row count.
    Written atomically: ``out`` is the old directory or the whole new one."""
    faiss = _faiss()
    first = next(iter(chunks()))
    modalities = [m for m, col in MODALITIES.items() if col in first]
    catalogue = [c for c in CATALOGUE if c in first]
    rng = np.random.default_rng([seed, n])
    own = np.sort(rng.choice(n, size=min(settings.recall_queries, n), replace=False))
    with files.atomic_directory(out) as tmp:
        columns = {c: [] for c in catalogue}
        queries = {m: [] for m in modalities}
        for chunk, start in _with_starts(chunks()):
            for c in catalogue:
                columns[c].append(np.asarray(chunk[c]))
            local = own[(own >= start) & (own < start + len(chunk[catalogue[0]]))] - start
            for m in modalities:
                queries[m].append(np.asarray(chunk[MODALITIES[m]][local], np.float32))
        meta = {"format_version": FORMAT_VERSION, "embeddings_key": key, "n": int(n),
                "recall_rows_seed": [int(seed), int(n)], "modalities": {}, "columns": {}}
        for c in catalogue:
            path = os.path.join(tmp, f"{c}.npy")
            np.save(path, np.concatenate(columns[c]))
            meta["columns"][c] = _file_entry(path)
        order = np.argsort(np.load(os.path.join(tmp, "targetid.npy")), kind="stable")
        np.save(os.path.join(tmp, "targetid_order.npy"), order)
        meta["columns"]["targetid_order"] = _file_entry(os.path.join(tmp, "targetid_order.npy"))
        queries = {m: np.concatenate(q) for m, q in queries.items()}
        for m in modalities:
            t0 = time.perf_counter()
            vectors = lambda: (chunk[MODALITIES[m]] for chunk in chunks())  # noqa: E731
            dim = first[MODALITIES[m]].shape[1]
            index = new_index(n, dim, settings)
            if not index.is_trained:
                index.train(_training_sample(vectors(), settings.train_rows))
            for v in vectors():
                index.add(np.ascontiguousarray(v, np.float32))
            entry = {"factory": factory_string(n, dim, settings), "dim": int(dim)}
            if entry["factory"] == "Flat":
                entry["recall_at_10"] = {f"{q}_queries": 1.0 for q in modalities}
            else:
                truth = {f"{q}_queries": topk_exact_streamed(queries[q], vectors(),
                                                             RECALL_K + 1)[1]
                         for q in modalities}
                entry.update(tune_k_factor(index, {f"{q}_queries": queries[q]
                                                   for q in modalities}, truth, own, settings))
            path = os.path.join(tmp, f"{m}.faiss")
            faiss.write_index(index, path)
            entry.update(_file_entry(path), build_seconds=round(time.perf_counter() - t0, 3))
            meta["modalities"][m] = entry
            log(f"index: {m}: {entry['factory']} over {n} vectors, recall@10 "
                f"{entry['recall_at_10']}, {entry['build_seconds']:.1f} s")
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        files.seal(tmp, CHECKSUMS_FILE)  # last: its presence means the index was finished
    return meta


def _with_starts(chunks):
    start = 0
    for chunk in chunks:
        yield chunk, start
        start += len(next(iter(chunk.values())))


def _training_sample(vectors, rows: int) -> np.ndarray:
    """The first ``rows`` vectors (records are in no particular order of their content)."""
    parts, have = [], 0
    for v in vectors:
        parts.append(np.asarray(v[:rows - have], np.float32))
        have += len(parts[-1])
        if have >= rows:
            break
    return np.ascontiguousarray(np.concatenate(parts))


def _file_entry(path: str) -> dict[str, Any]:
    return {"file": os.path.basename(path), **files.file_record(path)}


# --------------------------------------------------------------------------------------------
# Opening and searching
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunIndex:
    """A run's opened index: per-modality faiss indexes and catalogue columns, memory-mapped.

    ``search(modality, queries, k, exclude)`` searches the ``modality`` vectors (``"image"`` or
    ``"spectrum"``) with query vectors of either modality; ``row_of(targetid)`` and
    ``vectors(modality, rows)`` give the rows of galaxies and their stored embeddings."""

    directory: str
    meta: dict[str, Any]
    indexes: dict[str, Any]
    columns: dict[str, np.ndarray]

    @property
    def n(self) -> int:
        return int(self.meta["n"])

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.indexes)

    def search(self, modality: str, queries, k: int, exclude=None):
        """(rows (Q, k'), similarities (Q, k')), best first; k' = min(k, what exists). A row
        of ``exclude`` (Q,) (e.g. the query galaxy itself; -1: none) is never returned."""
        q = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        k = min(int(k), self.n - (exclude is not None))
        sims, rows = self.indexes[modality].search(q, k + (exclude is not None))
        if exclude is None:
            return rows.astype(np.int64), sims
        ex = np.asarray(exclude, np.int64)[:, None]
        keep = rows != ex
        # Drop the excluded row where it came back, else the last one: k per query either way.
        keep[keep.all(axis=1), -1] = False
        return (rows[keep].reshape(len(q), k).astype(np.int64), sims[keep].reshape(len(q), k))

    def vectors(self, modality: str, rows) -> np.ndarray:
        rows = np.atleast_1d(np.asarray(rows, np.int64))
        index = self.indexes[modality]
        return np.stack([index.reconstruct(int(r)) for r in rows]).astype(np.float32)

    def row_of(self, targetid: int) -> int | None:
        """The row of ``targetid``, or None when the table has no such galaxy."""
        if not -2 ** 63 <= int(targetid) < 2 ** 63:  # no int64 column holds it
            return None
        tids, order = self.columns["targetid"], self.columns["targetid_order"]
        at = int(np.searchsorted(tids, targetid, sorter=order))
        if at < len(order) and int(tids[order[at]]) == int(targetid):
            return int(order[at])
        return None


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _file_name(entry) -> bool:
    name = entry.get("file") if isinstance(entry, dict) else None
    return isinstance(name, str) and name == os.path.basename(name) and name not in ("", ".", "..")


def meta_problem(meta) -> str | None:
    """What makes a parsed ``meta.json`` other than `build` writes it (the first problem, in
    words), or None."""
    if not isinstance(meta, dict):
        return "is not a JSON object"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"has format {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
    if not isinstance(meta.get("embeddings_key"), str):
        return "has no embeddings_key string"
    if not _is_int(meta.get("n"), 1):
        return f"has row count n = {meta.get('n')!r}, expected an integer >= 1"
    modalities, columns = meta.get("modalities"), meta.get("columns")
    if not isinstance(modalities, dict) or not modalities or set(modalities) - set(MODALITIES):
        return f"has modalities {modalities!r}, expected some of {list(MODALITIES)}"
    for m, entry in modalities.items():
        recall = entry.get("recall_at_10") if isinstance(entry, dict) else None
        if not _file_name(entry) or not isinstance(entry.get("factory"), str) or \
                not _is_int(entry.get("dim"), 1) or \
                ("k_factor" in entry and not _is_int(entry["k_factor"], 1)) or \
                not isinstance(recall, dict) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool)
                    for v in recall.values()):
            return f"has an incomplete entry for modality {m!r}"
    required = {"targetid", "index", "targetid_order"}
    if not isinstance(columns, dict) or not required <= set(columns) or \
            set(columns) - set(CATALOGUE) - required:
        return f"has columns {columns!r}, expected {sorted(required)} and some of {CATALOGUE}"
    for c, entry in columns.items():
        if not _file_name(entry):
            return f"has an incomplete entry for column {c!r}"
    return None


def _contents(table_columns: Iterable[str]) -> tuple[set[str], set[str]]:
    """(modalities, catalogue columns) the index of a table with these columns holds."""
    names = set(table_columns)
    return ({m for m, col in MODALITIES.items() if col in names},
            {c for c in CATALOGUE if c in names} | {"targetid_order"})


def _format_of(meta_path: str):
    """The format_version a meta.json says, or None (for the message about an old index)."""
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta.get("format_version") if isinstance(meta, dict) else None


def open_index(directory: str, key: str | None = None, n: int | None = None,
               table_columns: Iterable[str] | None = None) -> RunIndex:
    """Open a built index directory, verified (module docstring; the key, row count ``n`` and
    column names of the embeddings when given: an index of each embedding, a copy of each
    catalogue column), memory-mapped. Raises DataError naming the file when something does not
    match."""
    faiss = _faiss()
    problem = files.damage(directory, CHECKSUMS_FILE)
    if problem is not None and not os.path.exists(os.path.join(directory, CHECKSUMS_FILE)) \
            and _format_of(os.path.join(directory, META_FILE)) == 1:
        problem = f"format 1 (older, its {META_FILE} unsealed); expected {FORMAT_VERSION}"
    if problem is not None:
        raise DataError(f"index {directory}: {problem}")
    with open(os.path.join(directory, CHECKSUMS_FILE), encoding="utf-8") as f:
        sealed = set(json.load(f))  # just verified by files.damage
    extra = sorted(set(files.files_under(directory, CHECKSUMS_FILE)) - sealed)
    if extra:
        raise DataError(f"index {directory}: holds {extra}, which {CHECKSUMS_FILE} does not list")
    meta_path = os.path.join(directory, META_FILE)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"index file {meta_path} is missing or not JSON ({err})") from None
    problem = meta_problem(meta)
    if problem is None:
        named = {e["file"] for e in [*meta["columns"].values(), *meta["modalities"].values()]}
        if named != sealed - {META_FILE}:
            problem = (f"names files {sorted(named)}; {CHECKSUMS_FILE} lists "
                       f"{sorted(sealed - {META_FILE})}")
    if problem is None and table_columns is not None:
        want = _contents(table_columns)
        if want != (set(meta["modalities"]), set(meta["columns"])):
            problem = (f"lists modalities {sorted(meta['modalities'])} and columns "
                       f"{sorted(meta['columns'])}; the embeddings need {sorted(want[0])} and "
                       f"{sorted(want[1])}")
    if problem is not None:
        raise DataError(f"index file {meta_path} {problem}")
    if key is not None and meta["embeddings_key"] != key:
        raise DataError(f"index {directory} was built from other embeddings")
    if n is not None and meta["n"] != n:
        raise DataError(f"index file {meta_path} says {meta['n']} rows; the embeddings have {n}")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    indexes, columns = {}, {}
    for m, entry in meta["modalities"].items():
        path = os.path.join(directory, entry["file"])
        try:
            indexes[m] = faiss.read_index(path, flags)
        except RuntimeError as err:
            raise DataError(f"index file {path} is not a faiss index ({err})") from None
        if indexes[m].ntotal != meta["n"] or indexes[m].d != entry["dim"]:
            raise DataError(f"index file {path} holds {indexes[m].ntotal} vectors of "
                            f"{indexes[m].d} dimensions; {META_FILE} says {meta['n']} of "
                            f"{entry['dim']}")
        if "k_factor" in entry:
            indexes[m].k_factor = entry["k_factor"]
    for c, entry in meta["columns"].items():
        path = os.path.join(directory, entry["file"])
        try:
            columns[c] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"index file {path} is not a .npy column ({err})") from None
        if columns[c].shape != (meta["n"],) or (c in ("targetid", "index", "targetid_order")
                                                 and columns[c].dtype.kind not in "iu"):
            raise DataError(f"index file {path} holds {columns[c].dtype} {columns[c].shape}; "
                            f"expected {meta['n']} rows")
    return RunIndex(directory=directory, meta=meta, indexes=indexes, columns=columns)


def open_or_build(table: str, manifest: Mapping[str, Any], settings: settings_lib.RunSettings,
                  log=print) -> RunIndex:
    """The index of the embeddings table ``table`` (with its ``manifest``), built when missing,
    stale or damaged, then opened memory-mapped."""
    from astroclip_jax.evaluation import embed

    if settings.index is None:
        raise ConfigError("the config has no `index` section (see configs/spender.py)")
    key = manifest["embeddings_key"]
    out = index_dir(table)
    n, have = int(manifest["n"]), list(manifest["columns"])
    if os.path.exists(out):
        try:
            return open_index(out, key, n, have)
        except DataError as err:
            log(f"index: {err}; rebuilding it")
    names = [c for c in (*MODALITIES.values(), *CATALOGUE) if c in have]
    build(lambda: embed.iter_embedding_chunks(table, names), n, out, key,
          settings.index, settings.seed, log)
    return open_index(out, key, n, have)


def open_run_index(settings: settings_lib.RunSettings, workdir: str, log=print) -> RunIndex:
    """The index of the run's ``eval.split`` embeddings, each computed first when needed."""
    from astroclip_jax.evaluation import embed

    table, manifest, _ = embed.ensure_embeddings(settings, workdir)
    return open_or_build(table, manifest, settings, log)
