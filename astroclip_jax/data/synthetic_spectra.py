"""Galaxy spectral model: rest-frame stellar continua, lines, redshifting, and broadband photometry.

All wavelengths are vacuum Angstrom (the DESI and SDSS grids are vacuum); fluxes are f_lambda in DESI
units, 1e-17 erg/s/cm^2/A. Everything is vectorised over galaxies: parameters are (n,) arrays, the
line luminosities (n, len(EMISSION_LINES)).
"""

import math

import numpy as np

C_KMS = 299792.458
C_AA = 2.99792458e18  # speed of light, Angstrom/s
FLUX_UNIT = 1e-17  # erg/s/cm^2/A of one DESI flux unit
HC_OVER_K = 1.438777e8  # h c / k_B in Angstrom Kelvin
NORM_WAVE = 6200.0  # rest wavelength where continua are normalised (rest-frame r band)

# Emission lines (vacuum, Angstrom), in the column order of the line-luminosity array.
EMISSION_LINES = {
    "OII_3726": 3727.09,
    "OII_3729": 3729.88,
    "Hdelta": 4102.89,
    "Hgamma": 4341.68,
    "Hbeta": 4862.68,
    "OIII_4959": 4960.30,
    "OIII_5007": 5008.24,
    "NII_6548": 6549.86,
    "Halpha": 6564.61,
    "NII_6584": 6585.27,
    "SII_6716": 6718.29,
    "SII_6731": 6732.67,
}
EMISSION_WAVE = np.array(list(EMISSION_LINES.values()))

# Absorption features: (vacuum centre, intrinsic Gaussian sigma in A, reference depth).
# Metal lines belong to the old population; Balmer absorption (A stars) to the young one.
OLD_ABSORPTION = {
    "CaII_K": (3934.78, 4.0, 0.35),
    "CaII_H": (3969.59, 4.0, 0.30),
    "G_band": (4305.0, 8.0, 0.15),
    "Mg_b": (5176.7, 7.0, 0.12),
    "Na_D": (5894.6, 4.0, 0.10),
}
YOUNG_ABSORPTION = {
    "Hdelta_abs": (4102.89, 10.0, 0.12),
    "Hgamma_abs": (4341.68, 10.0, 0.10),
    "Hbeta_abs": (4862.68, 10.0, 0.08),
}
ABSORPTION_LINES = {k: v[0] for k, v in {**OLD_ABSORPTION, **YOUNG_ABSORPTION}.items()}

INSTRUMENT_SIGMA = 0.8  # observed-frame line spread (A), ~DESI's 1.8 A FWHM
SIGMA_STAR_MAX = 350.0  # km/s; caps let the line windows be a fixed width (chunk-independent sums)
SIGMA_GAS_MAX = 250.0
Z_MAX = 0.65

# Approximate Legacy Survey g, r, z bandpasses: top-hats with smooth (tanh) edges.
BANDS = {"g": (4000.0, 5500.0), "r": (5600.0, 7200.0), "z": (8500.0, 10000.0)}
BAND_EDGE = 40.0  # A, width of the tanh edges
# Internal observed-frame grid for photometry: wider than DESI's 3600-9824 A so z is covered. Only
# continua (smooth on 5 A) are integrated on it; emission lines enter the bands analytically.
PHOT_WAVE = np.arange(3400.0, 10800.0 + 1.0, 5.0)


def observed_wavelength(rest_wave, redshift):
    """lambda_obs = (1 + z) lambda_rest, broadcast over galaxies: (n,) x (k,) -> (n, k)."""
    return np.outer(1.0 + np.asarray(redshift, np.float64), np.asarray(rest_wave, np.float64))


def _step(lam, centre, width):
    """Smooth 0 -> 1 step at `centre`."""
    return 0.5 * (1.0 + np.tanh((lam - centre) / width))


def old_continuum(lam_rest, temperature, break_depth):
    """Old stars: a cool Planck shape with a 4000 A break, 1 at NORM_WAVE. lam_rest (n, L)."""
    t = temperature[:, None]
    shape = (NORM_WAVE / lam_rest) ** 5 * np.expm1(HC_OVER_K / (NORM_WAVE * t)) / np.expm1(HC_OVER_K / (lam_rest * t))
    return shape * (1.0 - break_depth[:, None] * (1.0 - _step(lam_rest, 4000.0, 25.0)))


def dust_attenuation(lam_rest, a_v):
    """Transmission for a power-law attenuation curve A_lambda = A_V (lambda / 5500)^-0.7."""
    return 10.0 ** (-0.4 * a_v[..., None] * (lam_rest / 5500.0) ** -0.7)


def young_continuum(lam_rest, slope, a_v):
    """Young stars: blue power law with a weak Balmer break, reddened by dust; 1 at NORM_WAVE."""
    # (lam / N)^-slope * 10^(-0.4 A_V [(lam / 5500)^-0.7 - (N / 5500)^-0.7]) as one exponential.
    log_x = np.log(lam_rest / NORM_WAVE)
    curve = np.exp(-0.7 * (log_x + math.log(NORM_WAVE / 5500.0))) - (NORM_WAVE / 5500.0) ** -0.7
    shape = np.exp(-slope[:, None] * log_x - 0.4 * math.log(10.0) * a_v[:, None] * curve)
    return shape * (1.0 - 0.25 * (1.0 - _step(lam_rest, 3646.0, 30.0)))


def _half_window(wave):
    """Fixed half-width (pixels) covering 6 sigma of the broadest possible line on `wave`."""
    rest_max = max(EMISSION_WAVE.max(), max(v[0] for v in OLD_ABSORPTION.values()))
    sig_rest = np.hypot(10.0, rest_max * SIGMA_STAR_MAX / C_KMS)
    sig_obs = np.hypot((1.0 + Z_MAX) * sig_rest, INSTRUMENT_SIGMA)
    return int(np.ceil(6.0 * sig_obs / np.diff(wave).min()))


def add_gaussians(out, wave, centre, sigma, amp):
    """out[i] += sum_k amp[i,k] exp(-(wave - centre[i,k])^2 / 2 sigma[i,k]^2), in place.

    Each Gaussian is evaluated only in a fixed window of pixels around its centre (lines are narrow;
    this is ~30x cheaper than the full grid). The window size depends only on the grid, so a galaxy's
    values never depend on which other galaxies share the batch.
    """
    n, length = out.shape
    half = _half_window(wave)
    pad = 2 * half + 1
    padded = np.zeros((n, length + 2 * pad))
    wave_pad = np.concatenate([wave[0] - (wave[1] - wave[0]) * np.arange(pad, 0, -1), wave,
                               wave[-1] + (wave[-1] - wave[-2]) * np.arange(1, pad + 1)])
    rows = np.arange(n)[:, None]
    offsets = np.arange(-half, half + 1)
    for k in range(centre.shape[1]):
        c = np.clip(np.searchsorted(wave, centre[:, k]), -half, length + half) + pad
        idx = c[:, None] + offsets[None, :]
        x = (wave_pad[idx] - centre[:, k, None]) / sigma[:, k, None]
        padded[rows, idx] += amp[:, k, None] * np.exp(-0.5 * x * x)
    out += padded[:, pad:pad + length]
    return out


def _absorption(wave, z, lines, sigma_star, strength):
    """Multiplicative absorption profile (n, L) in the observed frame."""
    rest = np.array([v[0] for v in lines.values()])
    centre = observed_wavelength(rest, z)
    intrinsic = np.array([v[1] for v in lines.values()])
    sig_rest = np.hypot(intrinsic[None, :], rest[None, :] * sigma_star[:, None] / C_KMS)
    sigma = np.hypot(sig_rest * (1.0 + z[:, None]), INSTRUMENT_SIGMA)
    depth = strength[:, None] * np.array([v[2] for v in lines.values()])[None, :]
    dip = np.zeros((len(z), len(wave)))
    add_gaussians(dip, wave, centre, sigma, depth)
    return 1.0 - dip


def line_fluxes(p):
    """Observed emission-line centres (A), widths (A) and fluxes (DESI units x A), each (n, K)."""
    z = p["redshift"]
    centre = observed_wavelength(EMISSION_WAVE, z)
    sigma = np.hypot(centre * p["sigma_gas"][:, None] / C_KMS, INSTRUMENT_SIGMA)
    to_obs = 1.0 / (4.0 * np.pi * p["lum_dist_cm"] ** 2 * FLUX_UNIT)
    flux = p["line_lum"] * dust_attenuation(EMISSION_WAVE, p["av_gas"]) * to_obs[:, None]
    return centre, sigma, flux


def observed_components(wave, p, lines=True, absorption=True, dtype=np.float64):
    """Noiseless observed spectra of the old and the young (+ emission lines) parts, each (n, L).

    `p` holds (n,) arrays: redshift, lum_dist_cm, l6200 (rest-frame luminosity density at NORM_WAVE,
    erg/s/A), f_young (fraction of it from young stars), t_old, break_old, slope_young, av_star,
    av_gas, sigma_star, sigma_gas, age; and line_lum (n, len(EMISSION_LINES)) intrinsic erg/s.
    The continua are evaluated in `dtype` (float32 is plenty for rendering, and twice as fast).
    """
    wave = np.asarray(wave, np.float64)
    z = p["redshift"]
    lam_rest = (wave[None, :] / (1.0 + z[:, None])).astype(dtype)
    cast = ("t_old", "break_old", "slope_young", "av_star", "f_young")
    p = {k: (v.astype(dtype) if k in cast else v) for k, v in p.items()}
    # f_obs(lambda_obs) = L_lambda(lambda_obs / (1+z)) / (4 pi D_L^2 (1+z)): flux density dilutes by 1+z.
    to_obs = 1.0 / (4.0 * np.pi * p["lum_dist_cm"] ** 2 * FLUX_UNIT)
    cont = (p["l6200"] * to_obs / (1.0 + z))[:, None].astype(dtype)
    old = cont * (1.0 - p["f_young"])[:, None] * old_continuum(lam_rest, p["t_old"], p["break_old"])
    young = cont * p["f_young"][:, None] * young_continuum(lam_rest, p["slope_young"], p["av_star"])
    if absorption:
        old *= _absorption(wave, z, OLD_ABSORPTION, p["sigma_star"], 0.6 + 0.6 * p["age"]).astype(dtype)
        young *= _absorption(wave, z, YOUNG_ABSORPTION, p["sigma_star"], np.ones_like(z)).astype(dtype)
    if lines:  # Gaussians of the line flux, broadened by gas motions and the instrument
        centre, sigma, flux = line_fluxes(p)
        young += add_gaussians(np.zeros(young.shape), wave, centre, sigma, flux / (np.sqrt(2.0 * np.pi) * sigma))
    return old, young


def band_transmission(wave):
    """(3, L) transmission of the g, r, z bands on `wave`."""
    wave = np.asarray(wave, np.float64)
    return np.stack([_step(wave, lo, BAND_EDGE) * _step(-wave, -hi, BAND_EDGE) for lo, hi in BANDS.values()])


def _ab_norm():
    """int f_AB,lambda T lambda dl per band (DESI units x A^2), f_AB = 3631 Jy; on a fine grid."""
    fine = np.arange(3000.0, 11500.0, 0.5)
    f_ab = 3631e-23 * C_AA / fine**2 / FLUX_UNIT
    return np.trapezoid(f_ab * band_transmission(fine) * fine, fine, axis=-1)


AB_NORM = _ab_norm()


def band_weights(wave):
    """(L, 3) matrix W so that flux @ W gives nanomaggies (trapezoid rule on `wave`)."""
    wave = np.asarray(wave, np.float64)
    gaps = np.diff(wave)
    dl = 0.5 * (np.concatenate([gaps, [0.0]]) + np.concatenate([[0.0], gaps]))  # trapezoid weights
    return (band_transmission(wave) * wave * dl / AB_NORM[:, None]).T * 1e9


def band_nanomaggies(wave, flux):
    """AB band fluxes (..., 3) in nanomaggies of f_lambda spectra (..., L) in DESI units.

    Photon-counting definition: F = int f_lambda T lambda dl / int f_AB,lambda T lambda dl, with
    f_AB = 3631 Jy; nanomaggies = 1e9 F, so mag = 22.5 - 2.5 log10(nmgy).
    """
    return flux @ band_weights(wave)


def line_band_nanomaggies(p):
    """Band fluxes (n, 3) of the emission lines alone (narrow: flux x T lambda at the centre)."""
    centre, _, flux = line_fluxes(p)
    weight = band_transmission(centre.ravel()).reshape(3, *centre.shape) * centre  # (3, n, K)
    return 1e9 * np.einsum("bnk,nk->nb", weight, flux) / AB_NORM[None, :]


def nanomaggies_to_mag(nmgy):
    """AB magnitude of a flux in nanomaggies."""
    return 22.5 - 2.5 * np.log10(nmgy)
