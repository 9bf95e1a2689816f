"""Physics-based synthetic DESI-like galaxies: paired g, r, z images and spectra (pure NumPy).

A flux-limited (r < 19.5, BGS-like) population is drawn from a stellar mass function in a flat LCDM
volume; each galaxy gets a star-formation state (red sequence / blue cloud), a stellar population,
emission lines, a velocity dispersion and a bulge + disk morphology. One noiseless spectrum feeds both
modalities: it is sampled on the spectrograph grid (plus real DESI per-pixel noise) and integrated
through g, r, z bands to give the image fluxes, so colours, sizes and brightnesses in the images and
lines, breaks and flux levels in the spectra encode the same redshift and stellar mass.

Galaxy i depends only on (seed, i): parameters come in fixed blocks of BLOCK galaxies seeded by
(seed, block), noise from a generator seeded by (seed, i); so any [start, start + n) slice is the
same whichever way a range is cut into calls.
"""


import numpy as np

from astroclip_jax import wavelength_grids as grids
from astroclip_jax.data import shipped_files
from astroclip_jax.data import synthetic_images as simg
from astroclip_jax.data import synthetic_spectra as sspec
from astroclip_jax.data import synthetic_votes
from astroclip_jax.data.synthetic_spectra import ABSORPTION_LINES, EMISSION_LINES, observed_wavelength  # noqa: F401

BLOCK = 512  # galaxies per parameter block
RENDER_CHUNK = 64  # galaxies rendered at once (bounds memory)
MAG_LIMIT = 19.5  # r-band flux limit (BGS bright)
Z_MIN, Z_MAX = 0.01, 0.6
LOGM_MIN, LOGM_MAX = 8.5, 12.2
TARGETID_OFFSET = 39_000_000_000_000_000  # DESI-like magnitude of target ids
ARTEFACT_RATE = {1: 0.025, 2: 0.025}  # satellite trail, bright neighbouring star
_PARAM_KEY, _NOISE_KEY = 1, 2

H0, OMEGA_M = 70.0, 0.3
MPC_CM = 3.0856775814913673e24
L_SUN_R_ABSMAG = 4.65  # absolute AB magnitude of the Sun in r


# ---------------------------------------------------------------------------------------------------
# Cosmology (flat LCDM): the comoving distance integral on a fine table, interpolated per galaxy.

_Z_TABLE = np.linspace(0.0, 1.0, 4001)


def _comoving_table():
    inv_e = 1.0 / np.sqrt(OMEGA_M * (1.0 + _Z_TABLE) ** 3 + 1.0 - OMEGA_M)
    steps = 0.5 * (inv_e[1:] + inv_e[:-1]) * np.diff(_Z_TABLE)  # trapezoid rule
    return sspec.C_KMS / H0 * np.concatenate([[0.0], np.cumsum(steps)])


_DC_TABLE = _comoving_table()


def comoving_distance_mpc(z):
    """Line-of-sight comoving distance (Mpc), flat LCDM with H0 = 70, Omega_m = 0.3."""
    return np.interp(z, _Z_TABLE, _DC_TABLE)


def luminosity_distance_mpc(z):
    return (1.0 + np.asarray(z)) * comoving_distance_mpc(z)


def angular_diameter_distance_mpc(z):
    return comoving_distance_mpc(z) / (1.0 + np.asarray(z))


# ---------------------------------------------------------------------------------------------------
# Population: mass function x volume, truncated just below the flux limit, then exact rejection.

_LOGM_TABLE = np.linspace(LOGM_MIN, LOGM_MAX, 1001)


def mass_function(logm):
    """Double Schechter stellar mass function per dex (Baldry et al. 2012, z < 0.06)."""
    x = 10.0 ** (logm - 10.66)
    return np.log(10.0) * np.exp(-x) * (3.96e-3 * x ** (1.0 - 0.35) + 0.79e-3 * x ** (1.0 - 1.47))


def _mass_floor(z):
    """A mass below which no galaxy at z can reach r < MAG_LIMIT (lowest M/L with margin)."""
    abs_lim = MAG_LIMIT - 5.0 * np.log10(luminosity_distance_mpc(z) * 1e5) + 2.5 * np.log10(1.0 + z) + 1.0
    return np.log10(0.6) + 0.4 * (L_SUN_R_ABSMAG - abs_lim)


def _population_tables():
    """Cumulative N(>logM) and the redshift proposal dV/dz * N(>floor(z)) as inverse-CDF tables."""
    phi = mass_function(_LOGM_TABLE)
    above = np.concatenate([np.cumsum((0.5 * (phi[1:] + phi[:-1]) * np.diff(_LOGM_TABLE))[::-1])[::-1], [0.0]])
    z = np.linspace(Z_MIN, Z_MAX, 2001)
    dc = comoving_distance_mpc(z)
    dvdz = dc**2 / np.sqrt(OMEGA_M * (1.0 + z) ** 3 + 1.0 - OMEGA_M)
    weight = dvdz * np.interp(np.maximum(_mass_floor(z), LOGM_MIN), _LOGM_TABLE, above)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (weight[1:] + weight[:-1]) * np.diff(z))])
    return above, z, cdf / cdf[-1]


_N_ABOVE, _Z_PROP, _Z_CDF = _population_tables()


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


ML_YOUNG = 0.4  # r-band mass-to-light ratio (solar units) of the young population


def old_mass_to_light(age):
    """r-band mass-to-light ratio (solar units) of the old population: 2 (age 0) to 4 (age 1)."""
    return 2.0 + 2.0 * age


def draw_candidates(rng, m):
    """Physical parameters of m candidate galaxies (before the flux limit), as a dict of arrays."""
    p = {}
    z = np.interp(rng.uniform(size=m), _Z_CDF, _Z_PROP)
    floor = np.maximum(_mass_floor(z), LOGM_MIN)
    n_floor = np.interp(floor, _LOGM_TABLE, _N_ABOVE)
    # Inverse CDF of the mass function truncated at the floor (N(>logM) decreases with logM).
    logm = np.interp(rng.uniform(size=m) * n_floor, _N_ABOVE[::-1], _LOGM_TABLE[::-1])
    p["redshift"], p["log_mstar"] = z, logm
    dm = logm - 10.5

    # Red sequence vs blue cloud: the quiescent fraction rises with mass.
    quiescent = rng.uniform(size=m) < 0.05 + 0.85 * _sigmoid((logm - 10.35) / 0.3)
    ssfr_sf = -9.8 - 0.35 * dm + 0.3 * rng.standard_normal(m)
    ssfr_q = -11.9 + 0.35 * rng.standard_normal(m)
    p["log_ssfr"] = np.where(quiescent, ssfr_q, ssfr_sf)
    # Fraction of the r-band light from young stars follows the specific SFR.
    p["f_young"] = _sigmoid(2.5 * (p["log_ssfr"] + 9.8))

    # Old population: "age" shifts temperature, 4000 A break and mass-to-light ratio together.
    p["age"] = np.clip(0.5 + 0.3 * dm + 0.15 * rng.standard_normal(m), 0.0, 1.0)
    p["t_old"] = 4900.0 - 700.0 * p["age"]
    p["break_old"] = 0.35 + 0.2 * p["age"]
    ml_old = old_mass_to_light(p["age"])
    p["slope_young"] = 1.6 + 0.2 * rng.standard_normal(m)
    p["av_star"] = np.clip(0.5 + 0.4 * dm + 0.25 * rng.standard_normal(m), 0.0, 2.0) * (1.0 - quiescent)
    p["av_gas"] = 2.0 * p["av_star"]
    ml = ml_old * (1.0 - p["f_young"]) + ML_YOUNG * p["f_young"]
    abs_r = L_SUN_R_ABSMAG - 2.5 * (logm - np.log10(ml))
    # AB absolute magnitude -> L_lambda at NORM_WAVE (erg/s/A): L_nu = 4 pi (10 pc)^2 3631 Jy 10^-0.4M.
    ten_pc = 10.0 * MPC_CM / 1e6
    p["l6200"] = 4.0 * np.pi * ten_pc**2 * 3631e-23 * 10.0 ** (-0.4 * abs_r) * sspec.C_AA / sspec.NORM_WAVE**2
    p["lum_dist_cm"] = luminosity_distance_mpc(z) * MPC_CM

    # Kinematics: stellar dispersion from the Faber-Jackson-like mass scaling; gas is colder.
    p["sigma_star"] = np.clip(10.0 ** (2.1 + 0.28 * dm + 0.06 * rng.standard_normal(m)), 40.0, sspec.SIGMA_STAR_MAX)
    p["sigma_gas"] = np.clip(50.0 + 0.25 * p["sigma_star"] + 12.0 * rng.standard_normal(m), 20.0, sspec.SIGMA_GAS_MAX)

    # Emission lines from the SFR (Kennicutt 1998 Halpha), ratios drifting with mass (metallicity).
    halpha = 10.0 ** (logm + p["log_ssfr"]) / 7.9e-42
    o3_hb = 10.0 ** np.clip(0.45 - 0.45 * (logm - 9.0) + 0.15 * rng.standard_normal(m), -0.8, 0.8)
    n2_ha = 10.0 ** np.clip(-1.0 + 0.3 * (logm - 9.0) + 0.1 * rng.standard_normal(m), -1.4, -0.25)
    o2_ha = 10.0 ** np.clip(-0.05 - 0.15 * dm + 0.1 * rng.standard_normal(m), -0.8, 0.3)
    s2_ha = 10.0 ** (-0.55 + 0.08 * rng.standard_normal(m))
    hb = halpha / 2.86
    lines = {
        "OII_3726": 0.45 * o2_ha * halpha, "OII_3729": 0.55 * o2_ha * halpha,
        "Hdelta": 0.259 * hb, "Hgamma": 0.468 * hb, "Hbeta": hb,
        "OIII_4959": o3_hb * hb / 2.98, "OIII_5007": o3_hb * hb,
        "NII_6548": n2_ha * halpha / 3.05, "Halpha": halpha, "NII_6584": n2_ha * halpha,
        "SII_6716": 0.55 * s2_ha * halpha, "SII_6731": 0.45 * s2_ha * halpha,
    }
    p["line_lum"] = np.stack([lines[k] for k in EMISSION_LINES], axis=1)

    # Morphology: bulge share of the old light grows with quiescence and mass.
    q_score = _sigmoid(-(p["log_ssfr"] + 10.8) / 0.3)
    p["bulge_share"] = np.clip(0.3 + 0.55 * q_score + 0.2 * dm + 0.12 * rng.standard_normal(m), 0.0, 1.0)
    early = 10.0 ** (0.6 + 0.56 * (logm - 11.0))  # size-mass relations (Shen et al. 2003 like), kpc
    late = 10.0 ** (0.72 + 0.2 * (logm - 11.0))
    w = p["bulge_share"]
    p["r_eff_kpc"] = (early**w * late ** (1.0 - w)) * 10.0 ** (0.15 * rng.standard_normal(m))
    # Thin oblate disks seen at random inclinations; spheroids are rounder.
    cos_i = rng.uniform(size=m)
    q_disk = np.sqrt(cos_i**2 * (1.0 - 0.2**2) + 0.2**2)
    q_sph = np.clip(0.75 + 0.15 * rng.standard_normal(m), 0.4, 1.0)
    p["axis_ratio"] = w * q_sph + (1.0 - w) * q_disk
    p["position_angle"] = rng.uniform(0.0, np.pi, size=m)

    # Observing conditions and the cutout centring.
    p["psf_fwhm"] = np.clip(1.25 + 0.15 * rng.standard_normal(m), 0.9, 1.8)
    p["sky_scale"] = np.exp(0.15 * rng.standard_normal(m))
    p["offset_x"], p["offset_y"] = rng.uniform(-0.5, 0.5, size=(2, m))

    # Artefacts, independent of the galaxy.
    u = rng.uniform(size=m)
    p["artefact"] = np.where(u < ARTEFACT_RATE[1], 1, np.where(u < ARTEFACT_RATE[1] + ARTEFACT_RATE[2], 2, 0))
    p["art_angle"] = rng.uniform(0.0, np.pi, size=m)
    p["art_offset"] = rng.uniform(-40.0, 40.0, size=m)  # mostly crossing the central 96 px crop
    trail_peak = 10.0 ** rng.uniform(-0.5, 0.5, size=m)
    one_band = rng.integers(0, 3, size=m)
    all_bands = rng.uniform(size=m) < 0.3  # a trail is usually in a single exposure (one band)
    trail_flux = np.where(all_bands[:, None] | (np.arange(3)[None, :] == one_band[:, None]), trail_peak[:, None], 0.0)
    star_r = rng.uniform(11.0, 16.0, size=m)
    star_colours = np.stack([rng.uniform(0.3, 1.4, size=m), np.zeros(m), -rng.uniform(0.0, 0.8, size=m)], 1)
    star_flux = 10.0 ** (-0.4 * (star_r[:, None] + star_colours - 22.5))
    p["art_flux"] = np.where((p["artefact"] == 1)[:, None], trail_flux, star_flux)
    star_r_px, star_phi = rng.uniform(20.0, 60.0, size=m), rng.uniform(0.0, 2 * np.pi, size=m)
    p["art_dx"], p["art_dy"] = star_r_px * np.cos(star_phi), star_r_px * np.sin(star_phi)
    return p


def photometry(p):
    """Add band fluxes of the old (bulge + part of disk) and young light, magnitudes, bulge fraction."""
    old, young = sspec.observed_components(sspec.PHOT_WAVE, p, lines=False)
    old_nmgy = sspec.band_nanomaggies(sspec.PHOT_WAVE, old)
    young_nmgy = sspec.band_nanomaggies(sspec.PHOT_WAVE, young) + sspec.line_band_nanomaggies(p)
    total = old_nmgy + young_nmgy
    p["bulge_nmgy"] = p["bulge_share"][:, None] * old_nmgy  # the bulge is pure old light: redder
    p["disk_nmgy"] = total - p["bulge_nmgy"]
    p["bulge_fraction"] = p["bulge_nmgy"][:, 1] / total[:, 1]
    for b, name in enumerate("grz"):
        p[f"mag_{name}"] = sspec.nanomaggies_to_mag(total[:, b])
    return p


# ---------------------------------------------------------------------------------------------------
# Stellar-population properties as PROVABGS reports them (Z_MW, TAGE_MW), derived without random
# draws from the parameters above: the images and spectra do not change.

GYR_S = 1e9 * 365.25 * 86400.0  # a (Julian) gigayear in seconds
Z_SUN = 0.0142  # the Sun's metal mass fraction (Asplund et al. 2009)
OH_SUN = 8.69  # the Sun's 12 + log(O/H) (Asplund et al. 2009)
T_YOUNG_GYR = 0.3  # mass-weighted age of the young (star-forming) population


def age_of_universe_gyr(z):
    """Cosmic time at redshift z (Gyr), flat LCDM without radiation (H0 = 70, Omega_m = 0.3):
    t(z) = 2 / (3 H0 sqrt(Omega_L)) asinh(sqrt(Omega_L / Omega_m) (1 + z)^-3/2)."""
    omega_l = 1.0 - OMEGA_M
    hubble_time_gyr = MPC_CM / 1e5 / H0 / GYR_S
    return (2.0 * hubble_time_gyr / (3.0 * np.sqrt(omega_l))
            * np.arcsinh(np.sqrt(omega_l / OMEGA_M) * (1.0 + np.asarray(z)) ** -1.5))


def stellar_population(p):
    """Mass-weighted stellar age and metallicity of parameter rows `p` (PROVABGS's TAGE_MW, Z_MW).

    Age: the old population's formation is set by the same `age` (0..1) that sets its temperature,
    4000 A break and M/L: it is t_old = t_U(z) (0.35 + 0.6 age) old, t_U(z) the age of the
    universe at the galaxy's redshift; the young one is T_YOUNG_GYR old. Their mass shares follow
    from the r-band light shares and M/L ratios (young light f_young at M/L ML_YOUNG, old light
    1 - f_young at `old_mass_to_light(age)`), so
        tage_mw = (1 - m_young) t_old + m_young T_YOUNG_GYR   (Gyr, < t_U(z)).
    Metallicity: the gas-phase oxygen abundance from the galaxy's N2 = log10([NII] 6584 / Halpha)
    (its emission lines) by the Pettini & Pagel (2004) calibration 12 + log(O/H) = 8.90 + 0.57 N2;
    stars formed earlier from less enriched gas, so the mass-weighted stellar metallicity lies
    below the gas by 0.1 + 0.3 age dex:
        log_z_mw = log10(Z_SUN) + (12 + log(O/H) - OH_SUN) - (0.1 + 0.3 age)
    (log10 of the metal mass fraction Z, as PROVABGS's Z_MW is a mass fraction).
    """
    age, f_young = p["age"], p["f_young"]
    t_old = age_of_universe_gyr(p["redshift"]) * (0.35 + 0.6 * age)
    young_mass = ML_YOUNG * f_young
    m_young = young_mass / (old_mass_to_light(age) * (1.0 - f_young) + young_mass)
    line = list(sspec.EMISSION_LINES)
    n2 = np.log10(p["line_lum"][:, line.index("NII_6584")] / p["line_lum"][:, line.index("Halpha")])
    oh_gas = 8.90 + 0.57 * n2
    return {"tage_mw": (1.0 - m_young) * t_old + m_young * T_YOUNG_GYR,
            "log_z_mw": np.log10(Z_SUN) + (oh_gas - OH_SUN) - (0.1 + 0.3 * age)}


_R_NODES = np.arange(5350.0, 7450.0 + 1.0, 25.0)  # r band with its edges, for the cheap pre-selection
PRESELECT_MARGIN = 0.15  # mag; far above the pre-selection's error (tested)


def approximate_mag_r(p):
    """Cheap r magnitude: continuum (no absorption: errs bright) on coarse nodes + exact lines."""
    old, young = sspec.observed_components(_R_NODES, p, lines=False, absorption=False)
    r = sspec.band_nanomaggies(_R_NODES, old + young)[:, 1] + sspec.line_band_nanomaggies(p)[:, 1]
    return sspec.nanomaggies_to_mag(r)


def _take(p, idx):
    return {k: v[idx] for k, v in p.items()}


def _concat(parts):
    return {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}


def block_parameters(seed, block):
    """The BLOCK flux-selected galaxies of one block: draw candidates in rounds, keep r < MAG_LIMIT."""
    rng = np.random.default_rng([seed, _PARAM_KEY, block])
    kept, count = [], 0
    while count < BLOCK:
        cand = draw_candidates(rng, 4 * BLOCK)
        cand = photometry(_take(cand, approximate_mag_r(cand) < MAG_LIMIT + PRESELECT_MARGIN))
        sel = np.flatnonzero(cand["mag_r"] < MAG_LIMIT)
        kept.append(_take(cand, sel))
        count += sel.size
    return _take(_concat(kept), slice(0, BLOCK))


def parameters(n, seed=0, start=0):
    """Ground-truth parameters of galaxies start .. start + n - 1 (dict of arrays)."""
    first, last = start // BLOCK, (start + n - 1) // BLOCK
    p = _concat([block_parameters(seed, b) for b in range(first, last + 1)])
    lo = start - first * BLOCK
    p = _take(p, slice(lo, lo + n))
    p.update(stellar_population(p))  # derived, no draws
    return p


# ---------------------------------------------------------------------------------------------------
# Rendering.

def spectrum_sigma(grid):
    """Per-pixel noise std on `grid`: the real DESI std, interpolated for other grids."""
    return shipped_files.pixel_std(grid)


def kpc_per_pixel(z):
    """Proper kpc spanned by one 0.262" pixel at redshift z (angular-diameter distance)."""
    return angular_diameter_distance_mpc(z) * 1e3 * simg.PIXEL_SCALE / simg.ARCSEC_PER_RAD


def r_eff_arcsec(r_eff_kpc, z):
    """The half-light radius on the sky (arcsec) of r_eff_kpc at redshift z."""
    return np.asarray(r_eff_kpc, np.float64) / kpc_per_pixel(np.asarray(z, np.float64)) * simg.PIXEL_SCALE


def noiseless_images(p, image_size):
    """Noiseless (m, S, S, 3) cutouts of parameter rows `p`: galaxy (PSF-convolved) + artefacts."""
    centre = image_size / 2.0
    geo = dict(p)
    geo["cx"], geo["cy"] = centre + p["offset_x"], centre + p["offset_y"]
    geo["r_eff_px"] = p["r_eff_kpc"] / kpc_per_pixel(p["redshift"])
    geo["art_x"], geo["art_y"] = centre + p["art_dx"], centre + p["art_dy"]
    return simg.add_artefacts(simg.render_galaxies(geo, image_size), geo)


def _render(p, seed, index, grid, image_size, return_noiseless):
    """Images and spectra for one chunk of parameter rows with global indices `index`."""
    wave = grids.wave(grid)
    old, young = sspec.observed_components(wave, p, dtype=np.float32)
    spec0 = old + young
    m = len(index)
    img0 = noiseless_images(p, image_size)

    sigma = spectrum_sigma(grid).astype(np.float32)
    image = np.empty((m, image_size, image_size, 3), np.float32)
    spectrum = np.empty((m, len(wave)), np.float32)
    for j, i in enumerate(index):
        rng = np.random.default_rng([seed, _NOISE_KEY, int(i)])
        sky = (simg.SKY_SIGMA * p["sky_scale"][j]).astype(np.float32)
        image[j] = img0[j] + sky * rng.standard_normal((image_size, image_size, 3), dtype=np.float32)
        spectrum[j] = spec0[j] + sigma * rng.standard_normal(len(wave), dtype=np.float32)
    out = {"image": image, "spectrum": spectrum}
    if return_noiseless:
        out["image_noiseless"] = img0
        out["spectrum_noiseless"] = spec0
    return out


CATALOGUE_KEYS = ("redshift", "log_mstar", "log_ssfr", "bulge_fraction", "r_eff_kpc", "axis_ratio",
                  "position_angle", "mag_g", "mag_r", "mag_z", "log_z_mw", "tage_mw")


def generate(n: int, seed: int = 0, *, start: int = 0, grid: str = "desi", image_size: int = 152,
             return_noiseless: bool = False) -> dict[str, np.ndarray]:
    """Synthetic galaxies start .. start + n - 1: images, spectra, ivar and ground truth.

    Returns `image` (n, S, S, 3) float32 g, r, z nanomaggies per 0.262" pixel; `spectrum` (n, L) float32
    in 1e-17 erg/s/cm^2/A on `grids.wave(grid)`; `ivar` (n, L); `targetid` int64; float32 `redshift`,
    `log_mstar`, `log_ssfr`, `bulge_fraction` (r-band B/T), `r_eff_kpc` (half-light semi-major axis),
    `axis_ratio`, `position_angle` (rad, major axis from the image x axis), `mag_g/r/z` (AB, of the
    noiseless spectrum), `log_z_mw` (log10 of the mass-weighted stellar metal mass fraction) and
    `tage_mw` (mass-weighted stellar age, Gyr; both `stellar_population`); `artefact` int8 (0 none,
    1 satellite trail, 2 bright star); Galaxy Zoo DECaLS votes, float32 `<question>_total-votes`
    and `<question>_<answer>_fraction` (`synthetic_votes`). With `return_noiseless`, also
    `image_noiseless` (artefacts included, no noise) and `spectrum_noiseless`.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    p = parameters(n, seed, start)
    index = np.arange(start, start + n)
    out = {}
    for a in range(0, n, RENDER_CHUNK):  # fill preallocated arrays: peak memory ~ the output itself
        part = _render(_take(p, slice(a, a + RENDER_CHUNK)), seed, index[a:a + RENDER_CHUNK], grid, image_size,
                       return_noiseless)
        for k, v in part.items():
            if k not in out:
                out[k] = np.empty((n,) + v.shape[1:], v.dtype)
            out[k][a:a + len(v)] = v
    sigma = spectrum_sigma(grid)
    out["ivar"] = np.broadcast_to((1.0 / sigma**2).astype(np.float32), out["spectrum"].shape).copy()
    out["targetid"] = (TARGETID_OFFSET + index).astype(np.int64)
    for k in CATALOGUE_KEYS:
        out[k] = p[k].astype(np.float32)
    out["artefact"] = p["artefact"].astype(np.int8)
    # Galaxy Zoo DECaLS votes from the catalogue values above, on their own random stream.
    size = r_eff_arcsec(out["r_eff_kpc"], out["redshift"])
    out.update(synthetic_votes.vote_columns({**out, "r_eff_arcsec": size}, seed, index))
    return out
