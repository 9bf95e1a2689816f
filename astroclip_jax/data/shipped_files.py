"""The reference files shipped in `data/resources/`, each opened here and nowhere else.

  desi_spectra_std.npz                   the real per-pixel flux std of DESI EDR spectra, on
                                         the DESI grid (noise of the synthetic spectra, and of
                                         the spectrum augmentation)
  vrikkis_wandb_export_{train,val}_loss  the reproduction paper's loss curves (wandb export),
                                         drawn beside ours in the training-curve figure
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np

from astroclip_jax import wavelength_grids

_PACKAGE = "astroclip_jax.data"
PAPER_CURVES = {"train": "vrikkis_wandb_export_train_loss.csv",
                "val": "vrikkis_wandb_export_val_loss.csv"}


def _resource(name: str):
    return resources.files(_PACKAGE).joinpath("resources", name)


@functools.cache
def _desi_pixel_std() -> np.ndarray:
    with _resource("desi_spectra_std.npz").open("rb") as f, np.load(f) as data:
        return np.asarray(data["spectra_npz"], np.float64)


def pixel_std(grid: str) -> np.ndarray:
    """Per-pixel flux std (float64, one value per pixel of `grid`): the real DESI std,
    linearly interpolated in wavelength onto other grids (SDSS lies inside the DESI range)."""
    std = _desi_pixel_std().copy()
    if grid == "desi":
        return std
    return np.interp(wavelength_grids.wave(grid), wavelength_grids.desi_wave(), std)


def paper_curve_path(which: str) -> str:
    """Path of the paper's "train" or "val" loss curve (a CSV file inside the package)."""
    return str(_resource(PAPER_CURVES[which]))
