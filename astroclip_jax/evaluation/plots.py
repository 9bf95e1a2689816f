"""Drawing helpers shared by the evaluators: RGB images of cutouts and common panels.
(Writing results and figures is the runner's: `runner.py`.)"""

import matplotlib

matplotlib.use("Agg")  # evaluators run headless; notebooks pick their own backend before import
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402



# --------------------------------------------------------------------------------------------
# RGB images
# --------------------------------------------------------------------------------------------

def lupton_rgb(image, stretch=None, q=8.0):
    """Lupton et al. (2004) asinh RGB of one (H, W, 3) g, r, z image -> (H, W, 3) in [0, 1].

    The three bands are mapped z -> red, r -> green, g -> blue (astronomers' order: reddest band
    red). The asinh stretch is applied to the summed intensity so colours are preserved; the
    default ``stretch`` is the 99.5th percentile of the intensity, so any flux scale (raw flux,
    z-scored or already transformed inputs) gives a visible picture.
    """
    img = np.asarray(image, dtype=np.float64)
    rgb = img[..., ::-1]  # g, r, z -> z, r, g = R, G, B
    rgb = rgb - np.minimum(np.median(rgb, axis=(0, 1)), 0.0)  # sky offsets below zero
    rgb = np.clip(rgb, 0.0, None)
    intensity = rgb.mean(axis=-1)
    if stretch is None:
        stretch = float(np.percentile(intensity, 99.5)) or 1.0
    scaled = np.arcsinh(q * intensity / stretch) / q
    factor = np.where(intensity > 0, scaled / np.maximum(intensity, 1e-30), 0.0)
    out = rgb * factor[..., None]
    top = np.percentile(out.max(axis=-1), 99.9)
    return np.clip(out / (top if top > 0 else 1.0), 0.0, 1.0)


def display_cutouts(raw, image_crop: int, image_size: int) -> np.ndarray:
    """RGB in [0, 1] of (..., S, S, 3) raw g, r, z cutouts as the towers saw them: the host
    crop (`image_crop`, 0: none), then the model's own (`image_size`), in `display_rgb`'s
    rendering. What every figure and the search page show."""
    from astroclip_jax.data.preprocess import center_crop

    images = np.asarray(raw, np.float32)
    if image_crop:
        images = center_crop(images, image_crop)
    return display_rgb(center_crop(images, image_size))


def display_rgb(flux, method="stein"):
    """RGB in [0, 1] of (..., H, W, 3) g, r, z flux images for figures.

    "stein": Stein et al.'s ToRGB, the project's transform (what the image tower sees);
    "lupton": the asinh RGB above, which adapts its stretch to each image.
    """
    flux = np.asarray(flux, np.float32)
    if method == "lupton":
        return np.stack([lupton_rgb(x) for x in flux.reshape((-1,) + flux.shape[-3:])]
                        ).reshape(flux.shape)
    from astroclip_jax.data.preprocess import stein_rgb

    return stein_rgb(flux)


def show_image(ax, rgb, title=None):
    """Draw one RGB image (H, W, 3) in [0, 1] (see :func:`display_rgb`) on ``ax``, no axes."""
    ax.imshow(np.clip(rgb, 0.0, 1.0), origin="lower")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=7)


def image_grid(images, titles=None, ncols=8, size=1.2, suptitle=None):
    """A figure of RGB galaxy images (N, H, W, 3) (see display_rgb) in ``ncols`` columns."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            show_image(ax, images[i], None if titles is None else titles[i])
        else:
            ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------
# Panels
# --------------------------------------------------------------------------------------------

def density_panel(ax, truth, pred, label, r2=None, bins=60, max_kde=3000, seed=0):
    """Figure-8 panel: grey points, 2-D histogram heat map, KDE contours, y = x, R^2 in a corner."""
    truth = np.asarray(truth, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    lo = float(np.nanmin([truth.min(), pred.min()]))
    hi = float(np.nanmax([truth.max(), pred.max()]))
    pad = 0.02 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    ax.scatter(truth, pred, s=1, c="0.6", alpha=0.3, rasterized=True)
    ax.hist2d(truth, pred, bins=bins, range=[[lo, hi], [lo, hi]], cmap="viridis", cmin=1, alpha=0.8)
    if len(truth) >= 10 and np.std(truth) > 0 and np.std(pred) > 0:
        from scipy.stats import gaussian_kde

        # KDE cost grows with points x grid: a seeded subsample keeps it bounded.
        rng = np.random.default_rng(seed)
        take = rng.choice(len(truth), size=min(max_kde, len(truth)), replace=False)
        try:
            kde = gaussian_kde(np.stack([truth[take], pred[take]]))
            gx, gy = np.meshgrid(np.linspace(lo, hi, 80), np.linspace(lo, hi, 80))
            dens = kde(np.stack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
            ax.contour(gx, gy, dens, levels=5, colors="k", linewidths=0.7)
        except np.linalg.LinAlgError:  # degenerate (collinear) samples have no 2-D density
            pass
    ax.plot([lo, hi], [lo, hi], "r--", lw=0.8)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"true {label}")
    ax.set_ylabel(f"k-NN predicted {label}")
    if r2 is not None:
        ax.text(0.04, 0.95, f"$R^2$ = {r2:.3f}", transform=ax.transAxes, va="top",
                bbox=dict(facecolor="white", alpha=0.8, lw=0))


def scatter_2d(ax, xy, values, title, cmap="viridis", label=None, s=2):
    """A 2-D projection coloured by ``values`` (NaN drawn light grey underneath)."""
    values = np.asarray(values, dtype=np.float64)
    known = np.isfinite(values)
    ax.scatter(xy[~known, 0], xy[~known, 1], s=s, c="0.85", rasterized=True)
    sc = ax.scatter(xy[known, 0], xy[known, 1], s=s, c=values[known], cmap=cmap, rasterized=True)
    if known.any():
        plt.colorbar(sc, ax=ax, label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
