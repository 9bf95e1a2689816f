"""Small files in the Multimodal Universe HDF5 layouts, for tests.

What each writer stores was read in MultimodalUniverse (commit 2dcff3dd, 2025-08-29):

- `scripts/desi/build_parent_sample.py`: `h5py.File.create_dataset(key, data=catalog[key])`
  for every column of an astropy table = DESI's zall-pix catalogue (read from FITS, so its
  numeric columns are big-endian) joined on TARGETID (so rows sorted by TARGETID) with the
  spectra (native float32 / bool); `ra`, `dec`, `object_id` are copies of TARGET_RA, TARGET_DEC,
  TARGETID; `healpix` comes from healpy (native int64). Not chunked, not compressed. Path
  `dr1_main/healpix=<i>/001-of-001.hdf5`.
- `scripts/legacysurvey/build_parent_sample.py` (dr10_south_21): images and ivar cut from FITS
  coadds (big-endian float32), `image_band` as `h5py.string_dtype("utf-8", 5)` of the lowercased
  "DES-G" ..., `object_id` as `h5py.string_dtype("utf-8", 16)` of "<BRICKNAME>-<OBJID>",
  `image_mask` bool (one plane), `image_psf_fwhm` (from the catalogue's PSFSIZE_*),
  `image_scale` float32 0.262, `image_rgb`/`blobmodel` uint8 (160, 160, 3), `object_mask`
  uint8, `catalog_<KEY>` (n, 20), `gid`, and the sweep columns; chunked, lzf, maxshape None.
- `scripts/ssl_legacysurvey/build_parent_sample.py`: `object_id` = internal_inds (native int64),
  `image_array` float32 (n, 3, 152, 152), `image_band` utf-8 length 5, `image_psf_fwhm` and
  `image_scale` float32; the catalogue columns read back from a FITS file (big-endian).

Exact dtypes of the catalogue columns the writers copy from DESI's and the Legacy Survey's FITS
tables are not in the writers; the ones here follow those surveys' data models (e.g. TARGETID
>i8, Z >f8, FLUX_G >f4) and are a stated guess. The readers return whatever h5py reads, and
the tests compare them with h5py, so a different dtype upstream changes nothing they check.
"""

import os

import h5py
import numpy as np

from astroclip_jax import wavelength_grids as grids

DESI_FLOATS = ("ZERR", "EBV", "FLUX_G", "FLUX_R", "FLUX_Z", "FLUX_IVAR_G", "FLUX_IVAR_R",
               "FLUX_IVAR_Z", "FIBERFLUX_G", "FIBERFLUX_R", "FIBERFLUX_Z", "FIBERTOTFLUX_G",
               "FIBERTOTFLUX_R", "FIBERTOTFLUX_Z")
DR10_FLOATS = ("EBV", "FLUX_G", "FLUX_R", "FLUX_I", "FLUX_Z", "FLUX_W1", "FLUX_W2", "FLUX_W3",
               "FLUX_W4", "SHAPE_R", "SHAPE_E1", "SHAPE_E2")
SSL_FLOATS = ("ebv", "flux_g", "flux_r", "flux_z", "fiberflux_g", "fiberflux_r", "fiberflux_z",
              "psfdepth_g", "psfdepth_r", "psfdepth_z", "z_spec")
CATALOG_KEYS = ("FLUX_G", "FLUX_R", "FLUX_I", "FLUX_Z", "SHAPE_R", "SHAPE_E1", "SHAPE_E2",
                "TYPE", "X", "Y")


def _path(root, config, healpix):
    path = os.path.join(root, config, f"healpix={healpix}", "001-of-001.hdf5")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def write_desi(root, healpix: int, targetid, ra, dec, z, seed: int = 0,
               config: str = "dr1_main", wavelength=None) -> str:
    """A DESI dr1_main partition with these targets; rows sorted by TARGETID as the writer's
    join leaves them. Spectra are random (seeded); the path."""
    rng = np.random.default_rng(seed)
    order = np.argsort(np.asarray(targetid, np.int64), kind="stable")
    tid = np.asarray(targetid, np.int64)[order]
    n = tid.size
    wave = grids.wave("desi").astype(np.float32) if wavelength is None else wavelength
    length = wave.size
    cols = {
        "TARGETID": tid.astype(">i8"),
        "TARGET_RA": np.asarray(ra, np.float64)[order].astype(">f8"),
        "TARGET_DEC": np.asarray(dec, np.float64)[order].astype(">f8"),
        "Z": np.asarray(z, np.float64)[order].astype(">f8"),
        "ZWARN": rng.choice([0, 0, 4], n).astype(">i8"),
        "SURVEY": np.array([b"main"] * n, "S7"),
        "PROGRAM": np.array([b"bright", b"dark"] * n, "S6")[:n],
        "OBJTYPE": np.array([b"TGT"] * n, "S3"),
        "MAIN_PRIMARY": np.ones(n, bool),
        "COADD_FIBERSTATUS": np.zeros(n, ">i4"),
        "HEALPIX": rng.integers(0, 40000, n).astype(">i4"),  # DESI's own nside-64 pixel
    }
    for c in DESI_FLOATS:
        cols[c] = rng.normal(10, 3, n).astype(">f4")
    cols["ra"], cols["dec"], cols["object_id"] = (cols["TARGET_RA"], cols["TARGET_DEC"],
                                                  cols["TARGETID"])
    ivar = rng.uniform(0, 4, (n, length)).astype(np.float32)
    ivar[:, :5] = 0.0  # a masked edge
    mask = (rng.random((n, length)) < 0.01) | (ivar < 1e-6)
    cols.update({
        "healpix": np.full(n, healpix, np.int64),
        "spectrum_lambda": np.repeat(wave.reshape(1, -1), n, 0).astype(np.float32),
        "spectrum_flux": rng.normal(1, 0.5, (n, length)).astype(np.float32),
        "spectrum_ivar": ivar,
        "spectrum_mask": mask,
        "spectrum_lsf_sigma": np.full((n, length), 0.9, np.float32),
        "spectrum_lsf": rng.random((n, 11, length)).astype(np.float32),
    })
    path = _path(root, config, healpix)
    with h5py.File(path, "w") as f:
        for key, value in cols.items():
            f.create_dataset(key, data=value)
    return path


def write_dr10(root, healpix: int, brick: str, objid, ra, dec, seed: int = 0,
               config: str = "dr10_south_21", size: int = 160) -> str:
    """A Legacy Survey dr10_south_21 partition (4 bands DES-G/R/I/Z, `size` px; upstream 160)."""
    rng = np.random.default_rng(seed)
    n = len(objid)
    filters = ["DES-G", "DES-R", "DES-I", "DES-Z"]
    cols = {
        "RA": np.asarray(ra, np.float64).astype(">f8"),
        "DEC": np.asarray(dec, np.float64).astype(">f8"),
        "BRICKNAME": np.array([brick.encode()] * n, "S8"),
        "OBJID": np.asarray(objid).astype(">i4"),
        "TYPE": np.array([b"SER", b"EXP", b"DEV", b"REX"] * n, "S3")[:n],
        "MASKBITS": np.zeros(n, ">i2"),
        "ra": np.asarray(ra, np.float64).astype(">f8"),
        "dec": np.asarray(dec, np.float64).astype(">f8"),
        "healpix": np.full(n, healpix, np.int64),
        "gid": np.arange(n, dtype=np.int64),
        "object_id": np.array([f"{brick}-{o}".encode() for o in objid],
                              dtype=h5py.string_dtype("utf-8", 16)),
        "image_band": np.array([[f.lower().encode() for f in filters]] * n,
                               dtype=h5py.string_dtype("utf-8", 5)),
        "image_ivar": rng.uniform(0, 3, (n, 4, size, size)).astype(">f4"),
        "image_array": rng.normal(0, 1, (n, 4, size, size)).astype(">f4"),
        "image_mask": rng.random((n, size, size)) < 0.9,
        "image_psf_fwhm": rng.uniform(0.8, 1.6, (n, 4)).astype(np.float32),
        "image_scale": np.full((n, 4), 0.262, np.float32),
        "image_rgb": rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8),
        "blobmodel": rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8),
        "object_mask": rng.integers(0, 6, (n, size, size)).astype(np.uint8),
    }
    for c in DR10_FLOATS:
        cols[c] = rng.normal(5, 1, n).astype(">f4")
    for c in ("PSFSIZE_G", "PSFSIZE_R", "PSFSIZE_I", "PSFSIZE_Z"):
        cols[c] = rng.uniform(0.8, 1.6, n).astype(">f4")
    for k in CATALOG_KEYS:
        cols[f"catalog_{k}"] = rng.normal(0, 1, (n, 20)).astype(np.float64)
    path = _path(root, config, healpix)
    with h5py.File(path, "w") as f:
        for key, value in cols.items():
            f.create_dataset(key, data=value, compression="lzf", chunks=True,
                             maxshape=(None, *value.shape[1:]))
    return path


def write_ssl(root, healpix: int, object_id, ra, dec, seed: int = 0, config: str = "south",
              size: int = 152) -> str:
    """A Stein et al. (ssl_legacysurvey) partition: 3 bands DES-G/R/Z, `size` px (upstream 152)."""
    rng = np.random.default_rng(seed)
    n = len(object_id)
    filters = ["DES-G", "DES-R", "DES-Z"]
    cols = {
        "inds": (np.asarray(object_id, np.int64) + 7).astype(">i8"),
        "ra": np.asarray(ra, np.float64).astype(">f8"),
        "dec": np.asarray(dec, np.float64).astype(">f8"),
        "release": np.full(n, 9010, ">i2"),
        "brickid": rng.integers(0, 10**6, n).astype(">i4"),
        "objid": rng.integers(0, 5000, n).astype(">i4"),
        "healpix": np.full(n, healpix, ">i8"),
        "internal_inds": np.asarray(object_id, np.int64).astype(">i8"),
        "object_id": np.asarray(object_id, np.int64),
        "image_band": np.array([[f.lower().encode() for f in filters]] * n,
                               dtype=h5py.string_dtype("utf-8", 5)),
        "image_array": rng.normal(0, 1, (n, 3, size, size)).astype(np.float32),
        "image_psf_fwhm": rng.uniform(0.8, 1.6, (n, 3)).astype(np.float32),
        "image_scale": np.full((n, 3), 0.262, np.float32),
    }
    for c in SSL_FLOATS:
        cols[c] = rng.normal(5, 1, n).astype(">f4")
    path = _path(root, config, healpix)
    with h5py.File(path, "w") as f:
        for key, value in cols.items():
            f.create_dataset(key, data=value)
    return path
