"""Spender's training recipe as pure functions: its losses, its redshift augmentation and its
one-cycle schedule (spender 0.3 `spender/loss.py`, `spender/data/desi.py:augment_spectra`,
pmelchior/spender `train/train_DESI.py`, torch's `OneCycleLR`).

    loss = fidelity + similarity_amp * similarity_restframe + consistency_amp * consistency

Pairwise dissimilarities are expanded (|a - b|^2 = |a|^2 + |b|^2 - 2 a.b) instead of spender's
(N, N, L) difference tensor, which at batch 512 on 9780 restframe pixels would be 10 GB.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from astroclip_jax.models import spender_autoencoder as ae


class SimilarityConfig(NamedTuple):
    """spender's `LossConfig` fields that the similarity loss reads (its defaults)."""

    wid: float = 5.0
    restframe_mu: float = 5000.0
    restframe_sigma: float = 2000.0
    restframe_bound: tuple[float, float] = (4000.0, 7000.0)


# train_DESI.py's similarity slope: annealed 0, 0.1, ..., 1.9 then again, 0 for the last 10 epochs.
ANNEAL_SCHEDULE = np.arange(0.0, 2.0, 0.1)


def similarity_slope(epoch: int, epochs: int) -> float:
    """The similarity slope of `epoch` (0-based) in a run of `epochs`, as train_DESI.py sets it."""
    if epochs - epoch <= 10:
        return 0.0
    return float(ANNEAL_SCHEDULE[epoch % len(ANNEAL_SCHEDULE)])


def consistency_loss(s: jax.Array, s_aug: jax.Array) -> jax.Array:
    """sum_batch sigmoid(|s_aug - s|^2 / (S * mean_dim var_batch(s))) - 1/2 (unbiased var)."""
    n, size = s.shape
    tol2 = jnp.mean(jnp.var(s, axis=0, ddof=1))
    x = jnp.sum(jnp.square(s_aug - s), axis=1) / (size * tol2)
    return jnp.sum(jax.nn.sigmoid(x) - 0.5)


def _pairwise_sq(a: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """(N, N) sum_l weight_l (a_i,l - a_j,l)^2, without the (N, N, L) tensor."""
    aw = a if weight is None else a * weight
    sq = jnp.sum(aw * a, axis=1)
    gram = jnp.dot(aw, a.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)


def _normalise_dissimilarity(d: jax.Array) -> jax.Array:
    n = d.shape[0]
    return d * (n * (n - 1)) / jnp.sum(d)


def lower_median(x: jax.Array, axis: int = -1) -> jax.Array:
    """torch.median: the lower of the two middle values for an even count."""
    n = x.shape[axis]
    return jnp.take(jnp.sort(x, axis=axis), (n - 1) // 2, axis=axis)


def similarity_restframe_loss(restframe: jax.Array, s: jax.Array, wave_rest: np.ndarray,
                              slope: jax.Array, config: SimilarityConfig = SimilarityConfig()
                              ) -> jax.Array:
    """spender's `similarity_restframe_loss` of decoded restframe spectra (N, L) and latents."""
    n, size = restframe.shape
    wave_rest = np.asarray(wave_rest)
    lo, hi = config.restframe_bound
    in_bound = np.flatnonzero((wave_rest > lo) & (wave_rest < hi))
    spec = restframe / lower_median(restframe[:, in_bound], axis=1)[:, None]
    weight = jnp.asarray(np.exp(-(0.5 * (wave_rest - config.restframe_mu)
                                  / config.restframe_sigma) ** 2), jnp.float32)
    spec_sim = _normalise_dissimilarity(_pairwise_sq(spec, weight) / size)
    s_sim = _normalise_dissimilarity(_pairwise_sq(s) / s.shape[1])
    x = s_sim - spec_sim
    loss = (jax.nn.sigmoid(slope * x - 0.5 * config.wid)
            + jax.nn.sigmoid(-slope * x - 0.5 * config.wid))
    loss = jnp.where(jnp.eye(n, dtype=bool), 0.0, loss)
    return jnp.sum(loss) / n


def augment_redshift(key: jax.Array, spectra: jax.Array, weights: jax.Array, z: jax.Array,
                     wave_obs: np.ndarray, z_max: float, noise_ratio: float = 0.05
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """spender's `DESI.augment_spectra(redshift=True, noise=True, mask=False)`: each spectrum
    moved to z_new ~ U(0, z_max), and noise of 0.2 * max(spectrum) on a random `noise_ratio`
    of the pixels (`redshifted` does the rest)."""
    k_z, k_noise, k_pick = jax.random.split(key, 3)
    z_new = z_max * jax.random.uniform(k_z, (spectra.shape[0],))
    sigma = 0.2 * jnp.max(spectra, axis=1, keepdims=True)
    noise = sigma * jax.random.normal(k_noise, spectra.shape)
    noise = jnp.where(jax.random.uniform(k_pick, spectra.shape) > noise_ratio, 0.0, noise)
    return (*redshifted(spectra, weights, z, z_new, noise, wave_obs), z_new)


def redshifted(spectra: jax.Array, weights: jax.Array, z: jax.Array, z_new: jax.Array,
               noise: jax.Array, wave_obs: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Spectra and weights as seen at z_new: the observed grid stretched by (1 + z) / (1 +
    z_new), both interpolated, `noise` added (its variance to the weights' inverse), zero
    outside the observed range."""
    wave = jnp.asarray(wave_obs, jnp.float32)
    wave_z = wave[None, :] * ((1 + z) / (1 + z_new))[:, None]
    spec = ae.interp1d(wave, spectra, wave_z) + noise
    w = ae.interp1d(wave, weights, wave_z)
    w = 1 / (1 / (w + 1e-6) + jnp.square(noise))
    out = (wave_z < wave[0]) | (wave_z > wave[-1])
    return jnp.where(out, 0.0, spec), jnp.where(out, 0.0, w)


def one_cycle(step: jax.Array | int, total: int, max_lr: float, pct_start: float = 0.3,
              div_factor: float = 25.0, final_div_factor: float = 1e4,
              base_momentum: float = 0.85, max_momentum: float = 0.95
              ) -> tuple[jax.Array, jax.Array]:
    """(learning rate, Adam beta1) of torch's `OneCycleLR` (cosine, two phases, momentum
    cycled) at scheduler step `step` of `total`."""
    initial = max_lr / div_factor
    minimum = initial / final_div_factor
    end1, end2 = float(pct_start * total) - 1, float(total - 1)
    step = jnp.asarray(step, jnp.float32)

    def anneal(start, end, pct):
        return end + (start - end) / 2.0 * (jnp.cos(math.pi * pct) + 1)

    first = step <= end1
    pct = jnp.where(first, step / max(end1, 1e-12), (step - end1) / max(end2 - end1, 1e-12))
    lr = jnp.where(first, anneal(initial, max_lr, pct), anneal(max_lr, minimum, pct))
    beta1 = jnp.where(first, anneal(max_momentum, base_momentum, pct),
                      anneal(base_momentum, max_momentum, pct))
    return lr, beta1
