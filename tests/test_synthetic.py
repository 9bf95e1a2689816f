"""Physics checks of the synthetic galaxy generator against closed forms and physical facts."""

from pathlib import Path

import numpy as np
import pytest
from scipy import integrate, stats

from astroclip_jax import wavelength_grids as grids
from astroclip_jax.data import shipped_files
from astroclip_jax.data import synthetic as S
from astroclip_jax.data import synthetic_spectra as sspec


@pytest.fixture(scope="module")
def sample():
    """A small rendered sample with noiseless copies (shared: rendering is the slow part)."""
    return S.generate(48, seed=3, return_noiseless=True)


@pytest.fixture(scope="module")
def population():
    """Ground truth of a larger population (parameters only: cheap)."""
    return S.parameters(4096, seed=0)


def test_keys_shapes_dtypes(sample):
    n, length = 48, grids.DESI_LENGTH
    assert sample["image"].shape == (n, 152, 152, 3) and sample["image"].dtype == np.float32
    assert sample["spectrum"].shape == (n, length) and sample["spectrum"].dtype == np.float32
    assert sample["ivar"].shape == (n, length) and sample["ivar"].dtype == np.float32
    assert sample["targetid"].dtype == np.int64 and len(np.unique(sample["targetid"])) == n
    assert sample["artefact"].dtype == np.int8
    for k in S.CATALOGUE_KEYS:
        assert sample[k].shape == (n,) and sample[k].dtype == np.float32, k
        assert np.all(np.isfinite(sample[k])), k
    assert np.all(np.isfinite(sample["image"])) and np.all(np.isfinite(sample["spectrum"]))
    sdss = S.generate(2, seed=3, grid="sdss", image_size=64)
    assert sdss["spectrum"].shape == (2, grids.SDSS_LENGTH) and sdss["image"].shape == (2, 64, 64, 3)


def test_distances_match_quadrature():
    """Flat LCDM (H0 = 70, Om = 0.3) comoving distance against scipy's adaptive quadrature."""
    for z in (0.05, 0.2, 0.6):
        dc, _ = integrate.quad(lambda x: 1.0 / np.sqrt(0.3 * (1 + x) ** 3 + 0.7), 0.0, z)
        dc *= 299792.458 / 70.0
        assert S.comoving_distance_mpc(z) == pytest.approx(dc, rel=1e-6)
        assert S.luminosity_distance_mpc(z) == pytest.approx((1 + z) * dc, rel=1e-6)
        assert S.angular_diameter_distance_mpc(z) == pytest.approx(dc / (1 + z), rel=1e-6)


def test_ab_zero_point():
    """A flat f_nu = 3631 Jy source is magnitude 0 (1e9 nanomaggies) in every band, on any grid."""
    for wave in (sspec.PHOT_WAVE, np.arange(3000.0, 11500.0, 0.8)):
        f_lambda = 3631e-23 * sspec.C_AA / wave**2 / 1e-17
        mags = sspec.nanomaggies_to_mag(sspec.band_nanomaggies(wave, f_lambda))
        np.testing.assert_allclose(mags, 0.0, atol=2e-4)


def test_determinism_and_chunk_independence():
    """Galaxy i depends only on (seed, i): a range crossing a parameter block is cut-independent."""
    start = S.BLOCK - 6
    whole = S.generate(12, seed=5, start=start, image_size=48)
    parts = [S.generate(5, seed=5, start=start, image_size=48), S.generate(7, seed=5, start=start + 5, image_size=48)]
    for k, v in whole.items():
        np.testing.assert_array_equal(v, np.concatenate([q[k] for q in parts]), err_msg=k)
    assert np.all(whole["targetid"] == S.TARGETID_OFFSET + np.arange(start, start + 12))
    other = S.generate(3, seed=6, start=start, image_size=48)
    assert not np.allclose(other["redshift"], whole["redshift"][:3])


def test_emission_lines_at_redshifted_wavelengths(sample):
    """The Halpha and [OIII] peaks of star-forming galaxies sit at (1 + z) lambda_rest."""
    wave = grids.desi_wave()
    sf = np.flatnonzero(sample["log_ssfr"] > -10.3)
    assert sf.size >= 5
    checked = 0
    for i in sf:
        z, spec = sample["redshift"][i], sample["spectrum_noiseless"][i]
        for rest in (sspec.EMISSION_LINES["Halpha"], sspec.EMISSION_LINES["OIII_5007"]):
            expected = rest * (1 + z)
            if expected > wave[-1] - 10:
                continue
            window = np.abs(wave - expected) < 6.0
            side = (np.abs(wave - expected) > 30) & (np.abs(wave - expected) < 60)
            if spec[window].max() < 1.5 * np.median(spec[side]):
                continue  # only lines that clearly stand out of the continuum
            peak = wave[window][np.argmax(spec[window])]
            assert abs(peak - expected) <= 0.41, (i, rest, peak, expected)  # half a 0.8 A pixel
            checked += 1
    assert checked >= 5


def test_image_colours_match_spectrum(sample):
    """g - r and r - z from image aperture sums agree with the spectrum through the same bands."""
    clean = sample["artefact"] == 0
    flux = sample["image_noiseless"][clean].sum(axis=(1, 2))  # (m, 3) nanomaggies
    mag_img = sspec.nanomaggies_to_mag(flux)
    # g and r lie inside the DESI grid: integrate the noiseless spectrum directly.
    spec_nmgy = sspec.band_nanomaggies(grids.desi_wave(), sample["spectrum_noiseless"][clean].astype(np.float64))
    gr_spec = -2.5 * np.log10(spec_nmgy[:, 0] / spec_nmgy[:, 1])
    np.testing.assert_allclose(mag_img[:, 0] - mag_img[:, 1], gr_spec, atol=0.05)
    np.testing.assert_allclose(sample["mag_g"][clean] - sample["mag_r"][clean], gr_spec, atol=0.01)
    # z extends past the DESI grid: compare with the catalogue magnitudes (the wider internal model).
    rz_cat = sample["mag_r"][clean] - sample["mag_z"][clean]
    np.testing.assert_allclose(mag_img[:, 1] - mag_img[:, 2], rz_cat, atol=0.05)
    # The noisy image with a background-subtracted aperture agrees at high S/N too.
    noisy = sample["image"][clean]
    yy, xx = np.mgrid[:152, :152] - 76.0
    r = np.hypot(xx, yy)
    bkg = np.median(noisy[:, r > 70], axis=1)  # (m, 3)
    ap = (noisy[:, r < 60] - bkg[:, None]).sum(axis=1)
    bright = sample["mag_r"][clean] < 19.0
    gr_ap = -2.5 * np.log10(ap[:, 0] / ap[:, 1])
    assert np.median(np.abs(gr_ap - gr_spec)[bright]) < 0.05


def _half_light_radius(image, cx, cy, q, angle):
    """Half-light semi-major axis (px) of one band image around a known centre and ellipse."""
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]].astype(np.float64)
    dx, dy = xx - cx, yy - cy
    major = dx * np.cos(angle) + dy * np.sin(angle)
    minor = -dx * np.sin(angle) + dy * np.cos(angle)
    r = np.sqrt(major**2 + (minor / q) ** 2).ravel()
    order = np.argsort(r)
    flux = image.ravel()[order]
    cum = np.cumsum(flux) - 0.5 * flux  # each pixel's light counted at its own radius, centred
    return np.interp(0.5 * flux.sum(), cum, r[order])


def _exponential_r_eff(image, cx, cy, q, angle):
    """Half-light radius of an exponential disk from its light-weighted <R^2> = 6 h^2, r_eff = 1.678 h.

    (A second moment is nearly insensitive to pixelisation, unlike a half-light interpolation.)
    """
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]].astype(np.float64)
    dx, dy = xx - cx, yy - cy
    major = dx * np.cos(angle) + dy * np.sin(angle)
    minor = -dx * np.sin(angle) + dy * np.cos(angle)
    r2 = major**2 + (minor / q) ** 2
    return 1.6783469900166608 * np.sqrt((image * r2).sum() / image.sum() / 6.0)


def test_apparent_size_falls_with_redshift():
    """At fixed physical size, the half-light radius in pixels scales as 1 / D_A(z)."""
    p = S.parameters(1, seed=0)
    p.update(r_eff_kpc=np.array([10.0]), psf_fwhm=np.array([0.0]), artefact=np.array([0]),
             axis_ratio=np.array([0.6]), offset_x=np.zeros(1), offset_y=np.zeros(1))
    p["bulge_nmgy"] = np.zeros((1, 3))  # pure exponential disk: no flux beyond the cutout edge
    p["disk_nmgy"] = np.ones((1, 3))
    radii = {}
    for z in (0.1, 0.4):
        q = dict(p, redshift=np.array([z]))
        img = S.noiseless_images(q, 256)[0, :, :, 1]  # large enough to hold the whole disk
        radii[z] = _exponential_r_eff(img, 128.0, 128.0, 0.6, p["position_angle"][0])
        expected = 10.0 / (S.angular_diameter_distance_mpc(z) * 1e3) * 206264.806 / 0.262
        assert radii[z] == pytest.approx(expected, rel=0.01)
    ratio = S.angular_diameter_distance_mpc(0.4) / S.angular_diameter_distance_mpc(0.1)
    assert radii[0.1] / radii[0.4] == pytest.approx(ratio, rel=0.01)


def test_measured_sizes_fall_with_redshift(sample):
    """In the generated images, apparent size per kpc of r_eff shrinks with redshift."""
    clean = np.flatnonzero(sample["artefact"] == 0)
    size = np.array([_half_light_radius(sample["image_noiseless"][i, :, :, 1], 76.0, 76.0,
                                        sample["axis_ratio"][i], sample["position_angle"][i]) for i in clean])
    rho = stats.spearmanr(size / sample["r_eff_kpc"][clean], sample["redshift"][clean]).statistic
    assert rho < -0.5


def test_spectrum_noise_is_the_desi_std(sample):
    """Noise residuals are unit Gaussians in units of the shipped DESI std; ivar = 1 / std^2."""
    std_file = Path(S.__file__).parent / "resources" / "desi_spectra_std.npz"
    std = np.load(std_file)["spectra_npz"].astype(np.float64)
    resid = (sample["spectrum"] - sample["spectrum_noiseless"]) / std
    assert resid.std() == pytest.approx(1.0, abs=0.01)
    assert abs(resid.mean()) < 0.01
    np.testing.assert_allclose(sample["ivar"], np.broadcast_to(1.0 / std**2, resid.shape), rtol=1e-6)
    sdss = S.generate(1, seed=3, grid="sdss", image_size=32)
    sdss_std = np.interp(grids.sdss_wave(), grids.desi_wave(), std)
    np.testing.assert_allclose(sdss["ivar"][0], 1.0 / sdss_std ** 2, rtol=1e-6)
    # The one reader of the shipped file gives the same stds, as float64 copies.
    np.testing.assert_array_equal(shipped_files.pixel_std("desi"), std)
    np.testing.assert_array_equal(shipped_files.pixel_std("sdss"), sdss_std)
    shipped_files.pixel_std("desi")[:] = 0.0  # a caller's edit must not reach the next caller
    np.testing.assert_array_equal(shipped_files.pixel_std("desi"), std)


def test_image_sky_noise_levels(sample):
    """Per-band sky noise is near the Legacy-Survey-like depth (deeper in g than r than z)."""
    resid = (sample["image"] - sample["image_noiseless"]).std(axis=(1, 2))  # (n, 3)
    ratio = resid / S.simg.SKY_SIGMA
    assert np.all((ratio > 0.5) & (ratio < 2.0))
    assert np.all(resid[:, 0] < resid[:, 1]) and np.all(resid[:, 1] < resid[:, 2])


def test_flux_limit_and_selection(population):
    """No galaxy is fainter than r = 19.5; the limit binds; faint dwarfs drop out at high redshift."""
    p = population
    assert p["mag_r"].max() < S.MAG_LIMIT and p["mag_r"].max() > S.MAG_LIMIT - 0.05
    assert p["redshift"].min() >= S.Z_MIN and p["redshift"].max() <= S.Z_MAX
    assert 0.12 < np.median(p["redshift"]) < 0.3
    near, far = p["redshift"] < 0.1, p["redshift"] > 0.3
    assert np.percentile(p["log_mstar"][far], 5) > np.percentile(p["log_mstar"][near], 5) + 1.0
    # The pre-selection margin is far above the cheap estimate's error (it must never cut a real member).
    d = S.approximate_mag_r(p) - p["mag_r"]
    assert d.max() <= 0.0 + 1e-6 and d.min() > -S.PRESELECT_MARGIN / 3


def test_population_physics(population):
    """Red sequence vs blue cloud, bulges in quiescent galaxies, size-mass and mass-to-light trends."""
    p = population
    q = p["log_ssfr"] < -11
    assert 0.2 < q.mean() < 0.6
    mid = (p["redshift"] > 0.1) & (p["redshift"] < 0.2)
    gr = p["mag_g"] - p["mag_r"]
    assert np.median(gr[q & mid]) > np.median(gr[~q & mid]) + 0.4
    assert np.median(p["bulge_fraction"][q]) > np.median(p["bulge_fraction"][~q]) + 0.3
    assert stats.spearmanr(p["log_mstar"], p["r_eff_kpc"]).statistic > 0.3
    assert stats.spearmanr(p["log_mstar"], p["log_ssfr"]).statistic < -0.3
    # Brighter at fixed distance when more massive (mass-to-light normalisation).
    assert stats.spearmanr(p["log_mstar"][mid], p["mag_r"][mid]).statistic < -0.5


def test_artefact_fraction(population):
    frac = np.bincount(population["artefact"], minlength=3) / len(population["artefact"])
    assert 0.02 < frac[1] + frac[2] < 0.1
    assert frac[1] > 0.01 and frac[2] > 0.01


def test_line_list_consistent_with_grid():
    """Rest-frame lines land inside the DESI grid for BGS redshifts, vacuum wavelengths."""
    z = np.array([0.1])
    obs = S.observed_wavelength(list(S.EMISSION_LINES.values()), z)[0]
    assert np.all((obs > grids.desi_wave()[0]) & (obs < grids.desi_wave()[-1]))
    assert S.EMISSION_LINES["Halpha"] == pytest.approx(6564.61)
