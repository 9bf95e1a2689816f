"""Vector search at 10 k, 1 M and 10 M 128-d unit vectors: our faiss indexes vs NumPy brute force.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.search_index   # 10k, 1M, 10M (10M: 16 GB disk)
    .venv/bin/python -m benchmarks.search_index 10000 1000000   # chosen sizes

For each size: the exact index (`IndexFlatIP`) and the approximate one that
`evaluation/index.py` builds above `index.exact_max` (4-bit PQ fast scan + exact re-rank, its
depth tuned on 200 held queries to recall@10 >= 0.95), both written to disk and reopened
memory-mapped as the server opens them, against NumPy brute force (float32 matmul +
argpartition) in the same run. Reported: build time, index bytes on disk, the process's
resident memory after the searches, query latency p50/p99 for one query at a time and for
batches of 1,000, and recall@10 of the 1,000 test queries against exact search (and the exact
index's agreement with NumPy). Queries are random unit vectors independent of the data: the
hardest case for an approximate index (no cluster structure to exploit).
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time

import faiss
import numpy as np

from astroclip_jax import settings as settings_lib
from astroclip_jax.evaluation import index as index_lib

DIM, K, N_QUERIES, N_TUNE = 128, 10, 1000, 200
CHUNK = 1 << 18  # rows per generated / brute-forced block: bounded temporaries
SETTINGS = settings_lib.IndexSettings(exact_max=0, pq_dims_per_code=2, recall_target=0.95,
                                      recall_queries=N_TUNE, k_factor_max=512,
                                      train_rows=65_536)


def unit(rng, n):
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def chunks_of(n, seed):
    """The data, regenerated chunk by chunk (never all of it in memory as an array)."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, CHUNK):
        yield unit(rng, min(CHUNK, n - start))


def numpy_topk(queries, data_view, k=K):
    """Brute force: float32 inner products block by block, argpartition, merged. Blocks of
    2**24 similarities (64 MB, and argpartition's 128 MB of indices) whatever the batch."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    block = max(1 << 14, (1 << 24) // len(queries))
    for start in range(0, len(data_view), block):
        sims = queries @ data_view[start:start + block].T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], 1)
        i = np.concatenate([best_i, part + start], 1)
        order = np.argsort(-s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return best_s, best_i


def latencies(search, batches):
    """Seconds of ``search(batch)`` for each batch."""
    out = []
    for batch in batches:
        t = time.perf_counter()
        search(batch)
        out.append(time.perf_counter() - t)
    return np.asarray(out)


def one_and_batch(search, queries, repeats_one, repeats_batch):
    """Latencies of single queries (``repeats_one`` of them) and of the 1,000-query batch."""
    return (latencies(search, [queries[i:i + 1] for i in range(repeats_one)]),
            latencies(search, [queries] * repeats_batch))


def rss_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def row(name, n, build_s, disk_gb, one, batch, recall):
    ms = lambda a, p: 1e3 * float(np.percentile(a, p))  # noqa: E731
    print(f"| {n:>10,} | {name:<22} | {build_s:8.1f} | {disk_gb:7.2f} | {rss_gb():6.2f} | "
          f"{ms(one, 50):8.2f} | {ms(one, 99):8.2f} | {ms(batch, 50):9.0f} | {ms(batch, 99):9.0f} "
          f"| {recall} |", flush=True)


def bench(n, scratch):
    rng = np.random.default_rng(1)
    queries, tune = unit(rng, N_QUERIES), unit(rng, N_TUNE)
    repeats_one = 200 if n <= 1_000_000 else 20
    repeats_batch = 3 if n <= 1_000_000 else 1
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY

    # The data as a memory-mapped .npy (aligned, in the page cache): what NumPy searches.
    npy_path = os.path.join(scratch, f"data-{n}.npy")
    data = np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.float32, shape=(n, DIM))
    start = 0
    for chunk in chunks_of(n, seed=0):
        data[start:start + len(chunk)] = chunk
        start += len(chunk)
    data.flush()
    data = np.load(npy_path, mmap_mode="r")

    t = time.perf_counter()
    flat = faiss.IndexFlatIP(DIM)
    for chunk in chunks_of(n, seed=0):
        flat.add(chunk)
    flat_path = os.path.join(scratch, f"flat-{n}.faiss")
    faiss.write_index(flat, flat_path)
    del flat
    build_flat = time.perf_counter() - t
    flat = faiss.read_index(flat_path, flags)

    answers = []
    one, batch = one_and_batch(lambda q: answers.append(numpy_topk(q, data)), queries,
                               min(repeats_one, 50), repeats_batch)
    np_rows = answers[-1][1]
    row("NumPy brute force", n, 0.0, 0.0, one, batch, "exact")

    one, batch = one_and_batch(lambda q: flat.search(q, K), queries, repeats_one, repeats_batch)
    ex_sims, ex_rows = flat.search(queries, K)
    agree = index_lib.recall_at_k(ex_rows, np_rows, None, K)
    row("faiss exact (Flat)", n, build_flat, os.path.getsize(flat_path) / 2 ** 30, one, batch,
        f"{agree:.4f} vs NumPy")

    t = time.perf_counter()
    approx = index_lib.new_index(n, DIM, SETTINGS)
    approx.train(next(chunks_of(min(n, SETTINGS.train_rows), seed=0)))
    for chunk in chunks_of(n, seed=0):
        approx.add(chunk)
    truth = {"random": flat.search(tune, K)[1]}
    tuned = index_lib.tune_k_factor(approx, {"random": tune}, truth, None, SETTINGS)
    approx_path = os.path.join(scratch, f"approx-{n}.faiss")
    faiss.write_index(approx, approx_path)
    del approx
    build_approx = time.perf_counter() - t
    approx = faiss.read_index(approx_path, flags)
    approx.k_factor = tuned["k_factor"]
    one, batch = one_and_batch(lambda q: approx.search(q, K), queries, repeats_one,
                               repeats_batch)
    recall = index_lib.recall_at_k(approx.search(queries, K)[1], ex_rows, None, K)
    name = f"{index_lib.factory_string(n, DIM, SETTINGS)} k_factor={tuned['k_factor']}"
    row(name, n, build_approx, os.path.getsize(approx_path) / 2 ** 30, one, batch,
        f"{recall:.4f}")

    for path in (flat_path, approx_path, npy_path):
        os.remove(path)


def main(argv):
    sizes = [int(a) for a in argv[1:]] or [10_000, 1_000_000, 10_000_000]
    # One thread, as the server runs each query (its requests run side by side); on a shared
    # 2-core machine more threads than free cores make every call wait for the slowest.
    faiss.omp_set_num_threads(int(os.environ.get("FAISS_THREADS", "1")))
    print(f"faiss {faiss.__version__}, {os.cpu_count()} CPUs, faiss threads "
          f"{faiss.omp_get_max_threads()}; {DIM}-d random unit vectors; {N_QUERIES} random "
          f"unit queries; recall@{K} vs exact")
    print("| rows | index | build s | disk GB | RSS GB | 1 query p50 ms | p99 ms | "
          "1000 queries p50 ms | p99 ms | recall@10 |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="search_index_", dir=os.environ.get("TMPDIR")) as d:
        for n in sizes:
            bench(n, d)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GB")


if __name__ == "__main__":
    main(sys.argv)
