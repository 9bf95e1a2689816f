"""The spectrum-noise augmentation is in flux units: the real DESI per-pixel scatter.

Spectra come from the synthetic generator on each grid and go through the host preprocessing
(`preprocess_batch`: z-score, giving `spectrum_scale`, the flux per normalised unit). With the
noise on, the noise added to the normalised spectra, times `spectrum_scale`, must have, at
every pixel and for every galaxy, std = spectrum_noise_scale * shipped_files.pixel_std(grid):
the measured DESI flux noise, whatever the galaxy's brightness. Checked for the online step
(`augment.augment_spectra`) and for the cached views (`cached_views.spectrum_view`).

Tolerances come from the sample size, not from taste: with K independent N(0, sigma^2)
draws, sum(x^2) / sigma^2 is chi-square with K degrees of freedom, and sum(x) / sigma is
N(0, K). Each check allows the central 1 - 1e-6 of those laws, split (Bonferroni) over the
pixels or galaxies checked, so a correct implementation fails with probability < 1e-6 per
check. On the DESI grid a pixel's variance ratio (K = 1024 draws) must lie in [0.74, 1.31]
and a galaxy's (K = 64 x 7781 draws) in [0.989, 1.011]: a wrong unit (not divided by the
scale, the DESI std on the wrong pixels, a missing `spectrum_noise_scale` factor) is far
outside, and even a std 5 % too large fails the per-galaxy band.
"""

import dataclasses

import jax
import numpy as np
import pytest
from scipy import stats

from astroclip_jax import settings
from astroclip_jax.data import preprocess, shipped_files, synthetic
from astroclip_jax.training import augment, cached_views
from configs import spender

GALAXIES, DRAWS = 16, 64  # 1024 noise draws per pixel, 64 * L per galaxy
ALPHA = 1e-6  # allowed false-failure probability of each check
SMOKE = settings.resolve(spender.get_config("smoke"))
SCALES = {"desi": 0.5, "sdss": 2.0}  # spectrum_noise_scale per grid: not 1, so it must multiply

augment_spectra = jax.jit(augment.augment_spectra, static_argnums=4)
spectrum_view = jax.jit(cached_views.spectrum_view, static_argnums=4)


@pytest.fixture(scope="module", params=["desi", "sdss"])
def grid_batch(request):
    """(grid, preprocessed batch) of synthetic galaxies on that grid."""
    grid = request.param
    raw = synthetic.generate(GALAXIES, seed=7, grid=grid, image_size=SMOKE.data.image_crop)
    data = dataclasses.replace(SMOKE.data, grid=grid)
    assert data.spectrum_norm == "zscore"
    batch = preprocess.preprocess_batch(raw, data)
    scale = batch["spectrum_scale"]
    assert scale.max() / scale.min() > 5  # bright and faint galaxies: the division matters
    return grid, batch


def _augment(grid):
    return dataclasses.replace(SMOKE.augment, spectrum_noise_scale=SCALES[grid])


def _assert_flux_noise(noise, spectrum_scale, grid):
    """`noise` (DRAWS, GALAXIES, L) in normalised units: times each galaxy's flux scale, N(0,
    (scale * pixel_std)^2) at every pixel and for every galaxy (the module docstring's bands)."""
    expected = SCALES[grid] * shipped_files.pixel_std(grid)  # (L,) flux
    assert noise.shape == (DRAWS, GALAXIES, expected.size)
    z = np.asarray(noise, np.float64) * spectrum_scale[None, :, None] / expected
    for axes, k, n_checks in (((0, 1), DRAWS * GALAXIES, expected.size),  # per pixel
                              ((0, 2), DRAWS * expected.size, GALAXIES)):  # per galaxy
        a = ALPHA / n_checks
        var = (z ** 2).mean(axis=axes)
        lo, hi = stats.chi2.ppf(a / 2, k) / k, stats.chi2.isf(a / 2, k) / k
        assert var.min() > lo and var.max() < hi, (axes, var.min(), var.max(), lo, hi)
        mean_bound = stats.norm.isf(a / 2) / np.sqrt(k)
        assert np.abs(z.mean(axis=axes)).max() < mean_bound, axes


def test_online_noise_is_the_desi_flux_std(grid_batch):
    grid, batch = grid_batch
    spectra, scale = batch["spectrum"], batch["spectrum_scale"]
    tiled = np.tile(spectra, (DRAWS, 1))  # row d * GALAXIES + g: draw d of galaxy g
    out = augment_spectra(jax.random.PRNGKey(3), tiled, np.tile(scale, DRAWS),
                          shipped_files.pixel_std(grid), _augment(grid))
    noise = (np.asarray(out) - tiled).reshape(DRAWS, GALAXIES, -1)
    _assert_flux_noise(noise, scale, grid)


def test_cached_views_noisy_except_view_0(grid_batch):
    grid, batch = grid_batch
    spectra, scale = batch["spectrum"], batch["spectrum_scale"]
    cache = dataclasses.replace(SMOKE.feature_cache, spectrum_draws=DRAWS + 1)
    spec = cached_views.view_spec(_augment(grid), cache, seed=0)
    assert spec.n_spectrum_views == DRAWS + 1 and spec.spectrum_noise_scale == SCALES[grid]
    index = np.arange(100, 100 + GALAXIES)  # the galaxies' indices in the data source
    key, pixel_std = jax.random.PRNGKey(spec.seed), shipped_files.pixel_std(grid)

    def view(v):
        return np.asarray(spectrum_view(spectra, scale, v, index, spec, key, pixel_std))

    np.testing.assert_array_equal(view(0), spectra)  # view 0 is the clean spectrum
    noise = np.stack([view(v) - spectra for v in range(1, DRAWS + 1)])
    _assert_flux_noise(noise, scale, grid)


def test_std_of_the_wrong_grid_is_refused():
    """DESI's 7781-pixel std on 3921-pixel SDSS spectra: a clear error, not a broadcast."""
    sdss = np.zeros((2, 3921), np.float32)
    scale = np.ones(2, np.float32)
    desi_std = shipped_files.pixel_std("desi")
    message = "pixel_std has 7781 pixels, the spectra 3921: use the std on the spectra's own grid"
    with pytest.raises(ValueError, match=message):
        augment.augment_spectra(jax.random.PRNGKey(0), sdss, scale, desi_std, _augment("sdss"))
    spec = cached_views.view_spec(_augment("sdss"), SMOKE.feature_cache, seed=0)
    with pytest.raises(ValueError, match=message):
        cached_views.spectrum_view(sdss, scale, 1, np.arange(2), spec, jax.random.PRNGKey(0),
                                   desi_std)
