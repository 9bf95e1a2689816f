"""Legacy-Survey-like g, r, z cutouts: bulge + disk profiles, Gaussian PSF, sky noise, artefacts.

Images are in nanomaggies per 0.262" pixel, laid out (n, S, S, 3) with bands g, r, z. Galaxies are
vectorised over the batch; the PSF is applied in Fourier space (one FFT per profile).
"""

import numpy as np

PIXEL_SCALE = 0.262  # arcsec per pixel
ARCSEC_PER_RAD = 180.0 * 3600.0 / np.pi
# Per-pixel sky noise (nanomaggies) at nominal depth: 5-sigma point-source depths of about
# g 24.0, r 23.4, z 22.5 (Legacy Surveys DR9) for a ~1.2" Gaussian PSF.
SKY_SIGMA = np.array([0.0068, 0.0127, 0.032])
PSF_BAND_SCALE = np.array([1.08, 1.0, 0.92])  # seeing is worse in blue bands
B_DEV = 7.669  # Sersic b_n for n = 4 (half the light inside r_eff)
B_EXP = 1.678  # and for n = 1


def _grid(size, cx, cy):
    """Pixel offsets (m, S, S) from per-galaxy centres (m,), x along the last axis."""
    pix = np.arange(size, dtype=np.float64)
    dx = pix[None, None, :] - cx[:, None, None]
    dy = pix[None, :, None] - cy[:, None, None]
    return dx, dy


def elliptical_radius(dx, dy, axis_ratio, angle):
    """Semi-major-axis radius of each pixel for ellipses at `angle` (rad from +x, counter-clockwise)."""
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    major = dx * c + dy * s
    minor = -dx * s + dy * c
    return np.sqrt(major**2 + (minor / axis_ratio[:, None, None]) ** 2)


def sersic_profiles(size, cx, cy, r_eff_px, axis_ratio, angle):
    """Unit-sum de Vaucouleurs (bulge) and exponential (disk) images, each (m, S, S).

    Both share the half-light ellipse, so the composite's half-light semi-major axis is r_eff. The
    radius is softened by half a pixel so cusps sampled at pixel centres stay finite.
    """
    dx, dy = _grid(size, cx, cy)
    r2 = elliptical_radius(dx, dy, axis_ratio, angle) ** 2
    r = (np.sqrt(r2 + 0.25) / r_eff_px[:, None, None]).astype(np.float32)  # float32: 2x faster, ample
    bulge = np.exp(-B_DEV * (np.sqrt(np.sqrt(r)) - 1.0))
    disk = np.exp(-B_EXP * (r - 1.0))
    bulge /= bulge.sum(axis=(1, 2), keepdims=True)
    disk /= disk.sum(axis=(1, 2), keepdims=True)
    return bulge, disk


def psf_sigma_px(fwhm_arcsec):
    """Gaussian sigma in pixels, per band: (m,) r-band FWHM -> (m, 3)."""
    return fwhm_arcsec[:, None] * PSF_BAND_SCALE[None, :] / (2.0 * np.sqrt(2.0 * np.log(2.0))) / PIXEL_SCALE


def render_galaxies(p, size):
    """Noiseless PSF-convolved images (m, S, S, 3) from (m,) parameter arrays in `p`.

    Keys used: cx, cy (pixel centre), r_eff_px, axis_ratio, position_angle, psf_fwhm (r band, arcsec;
    0 means no PSF), bulge_nmgy and disk_nmgy (m, 3) total fluxes per band.
    """
    bulge, disk = sersic_profiles(size, p["cx"], p["cy"], p["r_eff_px"], p["axis_ratio"], p["position_angle"])
    # Convolve with a per-band Gaussian PSF: multiply by its (separable) transfer function
    # exp(-2 pi^2 sigma^2 k^2), on a zero-padded fast FFT size so the wrap-around is negligible.
    n_fft = size + 8 + (-(size + 8)) % 32
    ky = np.fft.fftfreq(n_fft)[:, None] ** 2
    kx = np.fft.rfftfreq(n_fft)[None, :] ** 2
    sig2 = (-2.0 * np.pi**2 * psf_sigma_px(p["psf_fwhm"]) ** 2)[:, :, None, None]  # (m, 3, 1, 1)
    b_hat = np.fft.rfft2(bulge, s=(n_fft, n_fft))[:, None]
    d_hat = np.fft.rfft2(disk, s=(n_fft, n_fft))[:, None]
    flux_b = p["bulge_nmgy"].astype(np.float32)[:, :, None, None]
    flux_d = p["disk_nmgy"].astype(np.float32)[:, :, None, None]
    transfer = (np.exp(sig2 * ky) * np.exp(sig2 * kx)).astype(np.float32)
    img = np.fft.irfft2(transfer * (flux_b * b_hat + flux_d * d_hat), s=(n_fft, n_fft))[:, :, :size, :size]
    return np.ascontiguousarray(np.moveaxis(img, 1, -1), dtype=np.float32)


def _gaussian_psf_image(dx, dy, sigma):
    """Unit-flux Gaussian PSF sampled at pixel offsets; sigma (m, 3) -> (m, S, S, 3)."""
    r2 = (dx * dx + dy * dy)[..., None]
    s2 = sigma[:, None, None, :] ** 2
    return np.exp(-0.5 * r2 / s2) / (2.0 * np.pi * s2)


def satellite_trail(size, angle, offset, width_px, amplitude):
    """A straight streak across the cutout: Gaussian cross-section, peak `amplitude` (m, 3) nmgy/px."""
    centre = np.full(angle.shape, size / 2.0)
    dx, dy = _grid(size, centre, centre)
    dist = dx * np.sin(angle)[:, None, None] - dy * np.cos(angle)[:, None, None] - offset[:, None, None]
    profile = np.exp(-0.5 * (dist / width_px[:, None, None]) ** 2)
    return profile[..., None] * amplitude[:, None, None, :]


def bright_star(size, x, y, flux_nmgy, sigma_px, halo_px=10.0, halo_frac=0.15, beta=2.0):
    """A bright star: PSF core plus an extended Moffat halo (scattered light), flux (m, 3) nmgy."""
    dx, dy = _grid(size, x, y)
    core = _gaussian_psf_image(dx, dy, sigma_px)
    r2 = (dx * dx + dy * dy)[..., None] / halo_px**2
    halo = (beta - 1.0) / (np.pi * halo_px**2) * (1.0 + r2) ** -beta  # unit integral over the plane
    return flux_nmgy[:, None, None, :] * ((1.0 - halo_frac) * core + halo_frac * halo)


def add_artefacts(images, p):
    """Add satellite trails (artefact == 1) and bright neighbouring stars (artefact == 2) in place."""
    size = images.shape[1]
    sigma = psf_sigma_px(p["psf_fwhm"])
    trail = np.flatnonzero(p["artefact"] == 1)
    if trail.size:
        images[trail] += satellite_trail(size, p["art_angle"][trail], p["art_offset"][trail],
                                         sigma[trail, 1], p["art_flux"][trail])
    star = np.flatnonzero(p["artefact"] == 2)
    if star.size:
        images[star] += bright_star(size, p["art_x"][star], p["art_y"][star], p["art_flux"][star], sigma[star])
    return images
