"""What Spender's autoencoder trains on: flux spectra normalised as spender prepares them, and
inverse-variance weights (spender 0.3 `spender/data/desi.py:DESI.prepare_spectra`).

    norm_i = median of spectrum_i over restframe 5300-5850 A where w_i > 0   (lower median,
             as torch.median)
    spectrum_i / norm_i,   w_i * norm_i^2

The weights (`weights(ivar, grid)`, before that scaling) are the inverse variances in flux
units, zero where ivar <= 1e-6 and on the sky lines, as spender builds them from a file's ivar
(`DESI.prepare_spectra`: `ivar[mask | (ivar <= 1e-6)] = 0`, then `w[:, skyline_mask] = 0`).
The ivar is the dataset's own where it stores one (`synthetic_desi` >= 1.1.0: the variance of
the noise the generator added); for data without it (the AstroCLIP file) it is derived from
the real per-pixel DESI std, 1 / pixel_std(grid)^2, which on synthetic data is the same
number. spender drops spectra whose norm is not finite; here a spectrum without a positive
norm keeps its flux and gets zero weight (it adds nothing to the fidelity loss), so batches
keep their shape.
"""

from __future__ import annotations

import functools

import numpy as np

from astroclip_jax import wavelength_grids
from astroclip_jax.data import shipped_files

NORM_WINDOW = (5300.0, 5850.0)  # restframe A: flat and observed out to z ~ 0.5
IVAR_FLOOR = 1e-6  # spender: pixels with ivar <= this get zero weight


@functools.cache
def _sky_lines(grid: str) -> np.ndarray:
    mask = shipped_files.skyline_mask(wavelength_grids.wave(grid))
    mask.flags.writeable = False  # shared by every caller
    return mask


def weights(ivar: np.ndarray | None, grid: str) -> np.ndarray:
    """Inverse-variance weights in flux units (float32): `ivar` (N, L) -> (N, L), or None (no
    ivar in the data) -> (L,) from the DESI per-pixel std; zero at ivar <= IVAR_FLOOR (NaN
    included) and on the sky lines of `grid`."""
    if ivar is None:
        ivar = 1.0 / np.square(shipped_files.pixel_std(grid))
    ivar = np.asarray(ivar, np.float32)
    return np.where((ivar > IVAR_FLOOR) & ~_sky_lines(grid), ivar, np.float32(0))


def normalise(spectra: np.ndarray, weights: np.ndarray, z: np.ndarray, wave_obs: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spectra / norm, weights * norm^2, norm) per row; rows (N, L), z (N,)."""
    spectra = np.asarray(spectra, np.float32)
    weights = np.broadcast_to(np.asarray(weights, np.float32), spectra.shape)
    wave_rest = np.asarray(wave_obs, np.float64)[None, :] / (1.0 + np.asarray(z, np.float64)[:, None])
    sel = (weights > 0) & (wave_rest > NORM_WINDOW[0]) & (wave_rest < NORM_WINDOW[1])
    count = sel.sum(axis=1)
    ranked = np.sort(np.where(sel, spectra, np.inf), axis=1)
    norm = np.take_along_axis(ranked, np.maximum(count - 1, 0)[:, None] // 2, axis=1)[:, 0]
    ok = (count > 0) & np.isfinite(norm) & (norm > 0)
    norm = np.where(ok, norm, 0.0).astype(np.float32)
    out = np.where(ok[:, None], spectra / np.where(ok, norm, 1.0)[:, None], spectra)
    return out.astype(np.float32), (weights * np.square(norm)[:, None]).astype(np.float32), norm
