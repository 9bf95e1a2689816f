"""Similarity search: cosine top-k retrieval in four directions (paper section 3.5.1, Figs 6-7).

    python main.py --config=configs/spender.py --mode=search --workdir=runs/default
    python main.py ... --mode=search --config.eval.search_targetids="(39627586855682279,)"

Directions (query embedding -> searched embeddings): image -> image, spectrum -> spectrum,
image -> spectrum, spectrum -> image. The query galaxy itself is left out of its own results
(in-modal it is trivially the top hit; cross-modal its counterpart is scored separately as the
pair-retrieval rate). Queries are ``config.eval.search_targetids`` when set, otherwise
``search_queries`` seeded random galaxies.

Quantitative score, per direction: the median |delta z| between each of up to
``SCORE_QUERIES`` seeded random queries and its top-k, against the median over k random
other galaxies per query; plus how often a galaxy's own counterpart in the other modality is
the top-1 / in the top-k. Writes ``workdir/search/results.json`` and ``figure6.png``,
``figure7_<direction>.png``.

The mode searches with the run's faiss index (`index.py`, built beside the embeddings on first
use and memory-mapped after); `cosine_topk`, NumPy brute force, is the reference the tests
compare it with, and what `report` uses when it is given no index.
"""

import numpy as np

from astroclip_jax import settings as settings_lib
from astroclip_jax.errors import ConfigError
from astroclip_jax.evaluation import embed
from astroclip_jax.evaluation import index as index_lib
from astroclip_jax.evaluation import plots, runner

DIRECTIONS = {
    "image_to_image": ("image_embedding", "image_embedding"),
    "spectrum_to_spectrum": ("spectrum_embedding", "spectrum_embedding"),
    "image_to_spectrum": ("image_embedding", "spectrum_embedding"),
    "spectrum_to_image": ("spectrum_embedding", "image_embedding"),
}
SCORE_QUERIES = 2000
_CHUNK = 512  # query rows per similarity block: bounded memory for any split size


# --------------------------------------------------------------------------------------------
# Pure array functions
# --------------------------------------------------------------------------------------------

def normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_topk(queries, keys, k, exclude=None):
    """Top-``k`` keys by cosine similarity for each query: (indices (Q, k), similarities (Q, k)).

    Sorted by decreasing similarity, ties by increasing index. ``exclude`` (Q,) gives one key
    index per query to leave out (e.g. the query galaxy itself); -1 excludes nothing.
    """
    q, keys = normalize(queries), normalize(keys)
    k = min(k, len(keys) - (exclude is not None))
    idx_out, sim_out = [], []
    for start in range(0, len(q), _CHUNK):
        sims = q[start:start + _CHUNK] @ keys.T
        if exclude is not None:
            ex = np.asarray(exclude[start:start + _CHUNK])
            rows = np.flatnonzero(ex >= 0)
            sims[rows, ex[rows]] = -np.inf
        # argpartition keeps the search O(N) per query; the k winners are then sorted exactly.
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else \
            np.tile(np.arange(sims.shape[1]), (len(sims), 1))
        top = np.take_along_axis(sims, part, axis=1)
        # Include any key tied with the k-th value so the tie-break by index is exact.
        kth = top.min(axis=1, keepdims=True)
        for r in range(len(sims)):
            cand = np.flatnonzero(sims[r] >= kth[r])
            order = np.lexsort((cand, -sims[r, cand]))[:k]
            idx_out.append(cand[order])
            sim_out.append(sims[r, cand[order]])
    return np.asarray(idx_out, np.int64).reshape(-1, k), np.asarray(sim_out).reshape(-1, k)


def random_others(n, n_queries_idx, k, rng):
    """(Q, k) random galaxy indices, each row distinct and different from its query."""
    out = np.empty((len(n_queries_idx), k), np.int64)
    for r, q in enumerate(n_queries_idx):
        pick = rng.choice(n - 1, size=k, replace=False)
        out[r] = pick + (pick >= q)  # skip the query's own index
    return out


def delta_z_score(z, query_rows, neighbours, random_rows):
    """Median |z_query - z_neighbour| over the top-k and over random pairs, and their ratio."""
    dz_top = np.abs(z[query_rows][:, None] - z[neighbours])
    dz_rand = np.abs(z[query_rows][:, None] - z[random_rows])
    top, rand = float(np.nanmedian(dz_top)), float(np.nanmedian(dz_rand))
    return {"median_abs_dz_topk": top, "median_abs_dz_random": rand,
            "ratio": top / rand if rand > 0 else float("nan")}


def pair_retrieval(queries, keys, own, k, topk_rows=None):
    """Fractions of queries whose own counterpart (row ``own`` of ``keys``) is top-1 / in top-k.
    ``topk_rows(queries, k)``: the search to use (default: brute force over ``keys``)."""
    idx = topk_rows(queries, k) if topk_rows else cosine_topk(queries, keys, k)[0]
    own = np.asarray(own)[:, None]
    return {"top1": float(np.mean(idx[:, 0] == own[:, 0])),
            f"top{k}": float(np.mean((idx == own).any(axis=1))),
            "chance_top1": 1.0 / len(keys)}


def brute_force_topk(arrays):
    """``topk(queries, key_column, k, exclude=None) -> rows``: `cosine_topk` over ``arrays``."""
    return lambda q, key, k, exclude=None: cosine_topk(q, arrays[key], k, exclude)[0]


def index_topk(run_index):
    """The same search through a run's faiss index (`index.RunIndex`)."""
    modality = {column: name for name, column in index_lib.MODALITIES.items()}
    return lambda q, key, k, exclude=None: run_index.search(modality[key], q, k, exclude)[0]


def evaluate(arrays, k, seed, score_queries=SCORE_QUERIES, topk=None):
    """Per-direction retrieval scores on a sample of seeded random queries (see module doc).
    ``topk``: the search (`brute_force_topk` of ``arrays`` unless given)."""
    topk = topk or brute_force_topk(arrays)
    n = len(arrays["image_embedding"])
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(n, size=min(score_queries, n), replace=False))
    rand = random_others(n, queries, min(k, n - 1), rng)
    z = np.asarray(arrays["redshift"], np.float64)
    scores = {}
    for name, (q_key, k_key) in DIRECTIONS.items():
        nbrs = topk(arrays[q_key][queries], k_key, k, exclude=queries)
        scores[name] = delta_z_score(z, queries, nbrs, rand)
        if q_key != k_key:
            scores[name]["pair_retrieval"] = pair_retrieval(
                arrays[q_key][queries], arrays[k_key], queries, k,
                lambda q, kk, key=k_key: topk(q, key, kk))
    return scores, queries


def choose_queries(arrays, targetids, n_queries, seed):
    """Row indices of the requested target ids (all must exist), or seeded random rows."""
    if targetids:
        where = {int(t): i for i, t in enumerate(arrays["targetid"])}
        missing = [int(t) for t in targetids if int(t) not in where]
        if missing:
            raise ConfigError(f"config field eval.search_targetids: {missing} are not in this "
                              f"split")
        return np.asarray([where[int(t)] for t in targetids], np.int64)
    n = len(arrays["targetid"])
    return np.random.default_rng(seed).choice(n, size=min(n_queries, n), replace=False)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def plot_figure6(examples, queries, results, z, n_show=3):
    """Figure 6: a row per query: its image, then the top ``n_show`` of each direction."""
    import matplotlib.pyplot as plt

    names = list(DIRECTIONS)
    ncols = 1 + n_show * len(names)
    fig, axes = plt.subplots(len(queries), ncols, figsize=(1.25 * ncols, 1.35 * len(queries)),
                             squeeze=False)
    for r, q in enumerate(queries):
        plots.show_image(axes[r, 0], examples[q], f"query z={z[q]:.2f}")
        for d, name in enumerate(names):
            for j, row in enumerate(results[name][r][:n_show]):
                plots.show_image(axes[r, 1 + d * n_show + j], examples[row], f"z={z[row]:.2f}")
    for d, name in enumerate(names):
        axes[0, 1 + d * n_show + n_show // 2].set_title(
            name.replace("_to_", " -> ") + f"\nz={z[results[name][0][n_show // 2]]:.2f}",
            fontsize=7)
    fig.suptitle("Query (left) and top matches per direction", fontsize=9)
    fig.tight_layout()
    return fig


def plot_figure7(spectra, images, wave, queries, neighbours, z, title, n_show=5):
    """Figure 7: per query its spectrum (blue), the top ``n_show`` retrieved spectra (grey)."""
    import matplotlib.pyplot as plt

    ncols = min(2, len(queries))
    nrows = -(-len(queries) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 2.8 * nrows), squeeze=False)
    for ax, q, nbrs in zip(axes.flat, queries, neighbours):
        for row in nbrs[:n_show]:
            ax.plot(wave, _smooth(spectra[row]), color="0.6", lw=0.5)
        ax.plot(wave, _smooth(spectra[q]), color="tab:blue", lw=0.7, label=f"query z={z[q]:.2f}")
        ax.set_xlabel("observed wavelength [$\\AA$]")
        ax.set_ylabel("normalised flux")
        ax.legend(loc="upper right", fontsize=7)
        inset = ax.inset_axes([0.0, 0.62, 0.22, 0.38])
        plots.show_image(inset, images[q])
    for ax in list(axes.flat)[len(queries):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _smooth(y, width=9):
    """Box-car smoothing for display only (raw DESI spectra are noise-dominated per pixel)."""
    return np.convolve(y, np.ones(width) / width, mode="same")


# --------------------------------------------------------------------------------------------
# Mode
# --------------------------------------------------------------------------------------------

def report(inputs: runner.EvalInputs, topk=None) -> runner.EvalResult:
    """The mode's evaluator: the |delta z| scores, the query galaxies' neighbours, Figs 6-7.
    ``topk``: the search (`index_topk` in the mode; brute force when not given)."""
    arrays, settings = inputs.arrays, inputs.settings
    topk = topk or brute_force_topk(arrays)
    k = settings.search_k
    scores, score_queries = evaluate(arrays, k, settings.seed, topk=topk)
    queries = choose_queries(arrays, settings.search_targetids, settings.search_queries, settings.seed)
    results = {name: topk(arrays[a][queries], b, k, exclude=queries)
               for name, (a, b) in DIRECTIONS.items()}
    ex = inputs.examples(np.unique(np.concatenate([queries, *[r.ravel()
                                                              for r in results.values()]])))
    z = np.asarray(arrays["redshift"], np.float64)
    figures = {"figure6.png": plot_figure6(ex["image"], queries, results, z)}
    for name in ("spectrum_to_spectrum", "image_to_spectrum"):
        figures[f"figure7_{name}.png"] = plot_figure7(
            ex["spectrum"], ex["image"], ex["wave"], queries, results[name], z,
            name.replace("_to_", " -> "))
    targetid = arrays["targetid"]
    return runner.EvalResult(
        report={"scores": scores, "k": k, "n_score_queries": len(score_queries),
                "queries": [{"targetid": int(targetid[q]), "redshift": float(z[q]),
                             **{name: [int(targetid[i]) for i in results[name][r]]
                                for name in results}}
                            for r, q in enumerate(queries)]},
        figures=figures,
        lines=[f"search {name:<22} median |dz| top-{k} {s['median_abs_dz_topk']:.4f} "
               f"vs random {s['median_abs_dz_random']:.4f}" for name, s in scores.items()])


def run(config, workdir):
    """``--mode=search``: retrieval figures for the query galaxies and the |delta z| score,
    searched with the run's faiss index."""
    settings = settings_lib.resolve(config)
    index_lib.require_split(settings, "search")

    def report_with_index(inputs):
        # The table the runner has just ensured and read: open (or build) its index without
        # restoring the checkpoint and checking the table a second time.
        table = embed.embeddings_path(workdir, inputs.meta["split"])
        run_index = index_lib.open_or_build(table, embed.embedding_manifest(table), settings)
        return report(inputs, index_topk(run_index))

    return runner.run_evaluator(config, workdir, "search", report_with_index)["scores"]
