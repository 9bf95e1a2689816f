"""What Spender's autoencoder trains on: flux spectra normalised as spender prepares them, and
inverse-variance weights (spender 0.3 `spender/data/desi.py:DESI.prepare_spectra`).

    norm_i = median of spectrum_i over restframe 5300-5850 A where w_i > 0   (lower median,
             as torch.median)
    spectrum_i / norm_i,   w_i * norm_i^2

The weights are 1 / pixel_std^2 with the sky lines masked (`shipped_files.spectrum_weights`):
the synthetic spectra's noise is exactly that std (`synthetic.generate`'s `ivar`), and for the
AstroCLIP file it is the real per-pixel DESI std. spender drops spectra whose norm is not
finite; here a spectrum without a positive norm keeps its flux and gets zero weight (it adds
nothing to the fidelity loss), so batches keep their shape.
"""

from __future__ import annotations

import numpy as np

NORM_WINDOW = (5300.0, 5850.0)  # restframe A: flat and observed out to z ~ 0.5


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
