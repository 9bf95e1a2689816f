"""Embedding-space structure: UMAP maps, DBSCAN islands, k-Means clusters (paper 3.6, Figs 9-14).

    python main.py --config=configs/spender.py --mode=cluster --workdir=runs/default

- UMAP to 2-D of the image, spectrum and joint (image and spectrum concatenated) embeddings,
  coloured by redshift Z_HP and log stellar mass (Figures 9-11).
- DBSCAN (eps ``dbscan_eps`` = 0.20, ``dbscan_min_samples`` = 5) on each projection. The paper
  applies eps to the raw UMAP coordinates (umap-learn defaults: min_dist 0.1, spread 1.0, which
  put neighbouring points ~0.1 apart whatever the input scale), so we do too, unstandardised;
  the projection's extent and median nearest-neighbour distance are recorded beside the result.
  A UMAP layout has about the same extent whatever N, so its 2-D density grows with N and a
  fixed eps fragments small samples (a few hundred galaxies) into many islands: optional
  ``config.eval.dbscan_scale = "density"`` applies eps * sqrt(39,599 / N) instead (the same
  0.20 at the paper's test-set size). Sample images of each island (Figure 12).
- k-Means on the full spectrum embeddings (the paper's choice), k picked by the silhouette score
  over ``kmeans_k_min..kmeans_k_max`` (the paper took 10), shown on the spectrum projection
  with sample spectra and images per cluster (Figures 13-14).
- When the data mark artefact images (synthetic ``artefact``), whether they form their own
  island: for each projection, the island holding the largest share of artefacts, its purity
  and the fraction of all artefacts it holds.

Writes ``workdir/cluster/results.json`` and PNGs beside it.
"""

import numpy as np

from astroclip_jax.evaluation import plots, runner

PAPER_N = 39_599  # test-split galaxies the paper's eps was tuned on
SILHOUETTE_SAMPLE = 5000  # silhouette is O(N^2): scored on a seeded sample
PAPER_K = 10
N_SAMPLE_IMAGES = 8


# --------------------------------------------------------------------------------------------
# Pure array functions
# --------------------------------------------------------------------------------------------

def embedding_sets(arrays):
    """The three embeddings that are projected: image, spectrum, joint (concatenated)."""
    image, spectrum = arrays["image_embedding"], arrays["spectrum_embedding"]
    return {"image": image, "spectrum": spectrum,
            "joint": np.concatenate([image, spectrum], axis=1)}


def umap_2d(x, n_neighbors=15, seed=0, n_epochs=None):
    """(N, 2) UMAP projection (umap-learn defaults otherwise; seeded, hence single-threaded).

    ``n_epochs`` None is umap-learn's default (500 below 10,000 points, else 200).
    """
    import warnings

    import umap

    reducer = umap.UMAP(n_components=2, n_neighbors=int(min(n_neighbors, len(x) - 1)),
                        random_state=seed, n_epochs=n_epochs)
    with warnings.catch_warnings():  # "n_jobs overridden by random_state": seeding is the point
        warnings.filterwarnings("ignore", message=".*n_jobs.*", category=UserWarning)
        return reducer.fit_transform(np.asarray(x, np.float32))


def applied_eps(eps, n, scale="raw"):
    """eps on the raw UMAP coordinates ("raw", the paper) or density-matched to N ("density")."""
    if scale == "raw":
        return float(eps)
    if scale == "density":
        return float(eps * np.sqrt(PAPER_N / n))
    raise ValueError(f"unknown dbscan_scale {scale!r}; expected 'raw' or 'density'")


def dbscan_labels(xy, eps=0.2, min_samples=5):
    """DBSCAN labels of 2-D points (-1 = noise)."""
    from sklearn.cluster import DBSCAN

    return DBSCAN(eps=eps, min_samples=min_samples).fit_predict(xy)


def kmeans_by_silhouette(x, k_min=2, k_max=15, seed=0, sample_size=SILHOUETTE_SAMPLE):
    """(best k, {k: silhouette}, labels of the best k): k-Means for each k, scored by silhouette."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = np.asarray(x, np.float64)
    k_max = min(k_max, len(x) - 1)
    scores, labels = {}, {}
    for k in range(k_min, k_max + 1):
        labels[k] = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        scores[k] = float(silhouette_score(x, labels[k], sample_size=min(sample_size, len(x)),
                                           random_state=seed))
    best = max(scores, key=scores.get)
    return best, scores, labels[best]


def island_summary(labels):
    """{label: size} of the DBSCAN islands, largest first (noise, label -1, separately)."""
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return {int(ids[i]): int(counts[i]) for i in order}


def artefact_island(labels, artefact):
    """Do the artefacts form their own island? Stats of the island with the highest artefact share.

    Returns its ``label``, ``size``, ``purity`` (artefact share of the island) and ``recall``
    (fraction of all artefact galaxies in it), the same for the island holding the most artefacts
    (``most_artefacts``), and the overall artefact share (``base_rate``). Noise (-1) is no island.
    """
    artefact = np.asarray(artefact).astype(bool)
    n_art = int(artefact.sum())
    out = {"n_artefact": n_art, "base_rate": float(artefact.mean()) if len(artefact) else 0.0}
    islands = [int(lab) for lab in np.unique(labels) if lab >= 0]
    if n_art == 0 or not islands:
        empty = {"label": None, "size": 0, "purity": 0.0, "recall": 0.0}
        return {**out, **empty, "most_artefacts": empty}

    def stats(lab):
        inside = labels == lab
        return {"label": lab, "size": int(inside.sum()), "purity": float(artefact[inside].mean()),
                "recall": float(artefact[inside].sum() / n_art)}

    table = [stats(lab) for lab in islands]
    # Ties on share go to the island holding more artefacts, then to the lower label.
    by_share = max(table, key=lambda t: (t["purity"], t["recall"], -t["label"]))
    by_count = max(table, key=lambda t: (t["recall"], t["purity"], -t["label"]))
    return {**out, **by_share, "most_artefacts": by_count}


def pick_samples(labels, label, n, rng):
    """Up to ``n`` seeded random rows with ``labels == label``."""
    rows = np.flatnonzero(labels == label)
    return np.sort(rng.choice(rows, size=min(n, len(rows)), replace=False))


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def plot_property_maps(xy, z, log_mstar, kind):
    """Figures 9-11: the projection coloured by redshift (left) and stellar mass (right)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    plots.scatter_2d(axes[0], xy, z, f"{kind} embeddings: redshift", label="$Z_{HP}$")
    plots.scatter_2d(axes[1], xy, log_mstar, f"{kind} embeddings: stellar mass", cmap="plasma",
                     label=r"$\log M_*$")
    fig.tight_layout()
    return fig


def plot_labels(ax, xy, labels, title):
    """Projection coloured by cluster label (noise -1 in light grey)."""
    noise = labels < 0
    ax.scatter(xy[noise, 0], xy[noise, 1], s=1, c="0.85", rasterized=True)
    ax.scatter(xy[~noise, 0], xy[~noise, 1], s=2, c=labels[~noise] % 20, cmap="tab20",
               vmin=0, vmax=19, rasterized=True)
    for lab in np.unique(labels[~noise]):
        cx, cy = np.median(xy[labels == lab], axis=0)
        ax.text(cx, cy, str(lab), fontsize=7, weight="bold")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_cluster_images(images, groups, title):
    """Rows of sample images, one row per cluster: ``groups`` = {label: rows}."""
    import matplotlib.pyplot as plt

    n_cols = max(len(r) for r in groups.values())
    fig, axes = plt.subplots(len(groups), n_cols, figsize=(1.1 * n_cols, 1.2 * len(groups)),
                             squeeze=False)
    for i, (label, rows) in enumerate(groups.items()):
        for j in range(n_cols):
            ax = axes[i, j]
            if j < len(rows):
                plots.show_image(ax, images[rows[j]])
            else:
                ax.axis("off")
        axes[i, 0].set_ylabel(str(label), rotation=0, labelpad=12, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_cluster_spectra(spectra, wave, groups, title, n_show=4):
    """Sample spectra per cluster, one panel per cluster (Figure 13)."""
    import matplotlib.pyplot as plt

    ncols = min(3, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 2.3 * nrows), squeeze=False)
    width = 9
    for ax, (label, rows) in zip(axes.flat, groups.items()):
        for row in rows[:n_show]:
            ax.plot(wave, np.convolve(spectra[row], np.ones(width) / width, "same"), lw=0.5)
        ax.set_title(f"cluster {label}", fontsize=8)
        ax.set_xlabel("observed wavelength [$\\AA$]", fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Mode
# --------------------------------------------------------------------------------------------

def analyse(arrays, n_neighbors=15, eps=0.2, min_samples=5, k_min=2, k_max=15, seed=0,
            eps_scale="raw", n_epochs=None):
    """All numbers of the mode (no files): projections, DBSCAN, k-Means, artefact islands."""
    projections, dbscan, report = {}, {}, {"umap": {}, "dbscan": {}, "artefact": {}}
    eps = applied_eps(eps, len(arrays["image_embedding"]), eps_scale)
    report["eps_applied"] = eps
    has_artefact = "artefact" in arrays
    for kind, x in embedding_sets(arrays).items():
        xy = umap_2d(x, n_neighbors, seed, n_epochs)
        labels = dbscan_labels(xy, eps, min_samples)
        projections[kind], dbscan[kind] = xy, labels
        report["umap"][kind] = {"extent": np.ptp(xy, axis=0).tolist(),
                                "median_nn_distance": _median_nn(xy)}
        islands = island_summary(labels)
        report["dbscan"][kind] = {"n_islands": len(islands), "island_sizes": islands,
                                  "n_noise": int((labels < 0).sum())}
        if has_artefact:
            report["artefact"][kind] = artefact_island(labels, arrays["artefact"])
    best_k, sil, km_labels = kmeans_by_silhouette(arrays["spectrum_embedding"], k_min, k_max, seed)
    report["kmeans"] = {"embedding": "spectrum", "best_k": best_k, "silhouette": sil,
                        "paper_k": PAPER_K,
                        "sizes": {int(k): int(v) for k, v in
                                  zip(*np.unique(km_labels, return_counts=True))}}
    if has_artefact:
        report["artefact"]["kmeans_spectrum"] = artefact_island(km_labels, arrays["artefact"])
    return projections, dbscan, km_labels, report


def _median_nn(xy):
    """Median distance to the nearest other point: the scale eps is compared with."""
    from sklearn.neighbors import NearestNeighbors

    dist, _ = NearestNeighbors(n_neighbors=2).fit(xy).kneighbors(xy)
    return float(np.median(dist[:, 1]))


def report(inputs: runner.EvalInputs) -> runner.EvalResult:
    """The mode's evaluator: UMAP maps, DBSCAN islands, k-Means clusters and their figures."""
    import matplotlib.pyplot as plt

    arrays, meta, settings = inputs.arrays, inputs.meta, inputs.settings
    projections, dbscan, km_labels, out = analyse(
        arrays, settings.umap_neighbors, settings.dbscan_eps, settings.dbscan_min_samples, settings.kmeans_k_min,
        settings.kmeans_k_max, settings.seed, settings.dbscan_scale)
    lines = []
    if not np.any(arrays["has_props"]):
        lines.append("cluster: no galaxy of this split has properties (z_hp, log_mstar); the "
                     "maps are drawn grey. Prepare the dataset with its property catalogue to "
                     "colour them.")
    figures = {f"umap_{kind}.png": plot_property_maps(xy, arrays["z_hp"], arrays["log_mstar"],
                                                       kind)
               for kind, xy in projections.items()}

    # Sample galaxies: the 6 largest image islands (Fig 12) and every k-Means cluster (13-14).
    rng = np.random.default_rng(settings.seed)
    islands = list(island_summary(dbscan["image"]))[:6]
    island_rows = {lab: pick_samples(dbscan["image"], lab, N_SAMPLE_IMAGES, rng) for lab in islands}
    km_rows = {int(lab): pick_samples(km_labels, lab, N_SAMPLE_IMAGES, rng)
               for lab in np.unique(km_labels)}
    ex = inputs.examples(np.unique(np.concatenate([*island_rows.values(), *km_rows.values()])))

    fig, ax = plt.subplots(figsize=(6, 5.5))
    plot_labels(ax, projections["image"], dbscan["image"],
                f"image embeddings: DBSCAN (eps={out['eps_applied']:.3g}, min_samples="
                f"{settings.dbscan_min_samples})")
    figures["dbscan_image.png"] = fig
    if island_rows:
        figures["dbscan_image_samples.png"] = plot_cluster_images(
            ex["image"], island_rows, "largest image-embedding islands (rows)")
    fig, ax = plt.subplots(figsize=(6, 5.5))
    plot_labels(ax, projections["spectrum"], km_labels,
                f"spectrum embeddings: k-Means, k={out['kmeans']['best_k']}")
    figures["kmeans_spectrum.png"] = fig
    figures["kmeans_spectra.png"] = plot_cluster_spectra(
        ex["spectrum"], ex["wave"], km_rows, "sample spectra per k-Means cluster")
    figures["kmeans_images.png"] = plot_cluster_images(
        ex["image"], km_rows, "sample images per k-Means cluster (rows)")

    out.update({"n": int(meta["n"]),
                "params": {"umap_neighbors": settings.umap_neighbors, "dbscan_eps": settings.dbscan_eps,
                           "dbscan_min_samples": settings.dbscan_min_samples,
                           "dbscan_scale": settings.dbscan_scale, "seed": settings.seed}})
    for kind, r in out["dbscan"].items():
        line = f"cluster {kind:<8} {r['n_islands']} islands, {r['n_noise']} noise"
        if kind in out["artefact"]:
            a = out["artefact"][kind]
            line += (f"; artefact island {a['label']}: purity {a['purity']:.2f}, holds "
                     f"{a['recall']:.2f} of {a['n_artefact']} artefacts")
        lines.append(line)
    if out["dbscan"]["image"]["n_islands"] == 0:
        lines.append(f"cluster: DBSCAN found no island at eps {out['eps_applied']:.3g} on "
                     f"{meta['n']} galaxies (the paper's eps suits ~40k); for small samples set "
                     "config.eval.dbscan_scale='density'")
    lines.append(f"cluster: k-Means best k={out['kmeans']['best_k']} (silhouette)")
    return runner.EvalResult(report=out, figures=figures, lines=lines)

