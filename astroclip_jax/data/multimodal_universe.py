"""Readers of the Multimodal Universe (MMU) DESI and Legacy Survey HDF5 files.

The layout, as the MMU writers make it (MultimodalUniverse `scripts/desi/build_parent_sample.py`,
`scripts/legacysurvey/build_parent_sample.py`, `scripts/ssl_legacysurvey/build_parent_sample.py`):

- One folder per dataset configuration (`dr1_main`, `dr10_south_21`, `north` / `south` of the
  Stein et al. sample), holding one folder per HEALPix pixel (nside 16, nested, of the object's
  ra, dec), named `healpix=<i>`, holding `001-of-001.hdf5`. The Hugging Face loaders read every
  `healpix=*/*.hdf5` under the configuration's folder.
- Each file has one top-level dataset per column, first axis = rows.
- DESI (`dr1_main`): every column of DESI's `zall-pix-iron.fits` catalogue that survived the
  writer's cut, under its FITS name (TARGETID, Z, ZERR, ZWARN, EBV, FLUX_G, ..., SURVEY, PROGRAM
  as fixed-length bytes); `ra`, `dec` (= TARGET_RA, TARGET_DEC) and `object_id` (= TARGETID, an
  int64, not a string); `healpix`; and the coadded spectra `spectrum_flux`, `spectrum_ivar`,
  `spectrum_lsf_sigma`, `spectrum_lambda` (float32, (n, 7781)), `spectrum_mask` (bool, (n, 7781):
  a nonzero DESI mask bit or ivar < 1e-6), `spectrum_lsf` (float32, (n, 11, 7781), the
  resolution matrix diagonals). The catalogue columns come from a FITS table through astropy,
  so they keep FITS' big-endian byte order (`>i8`, `>f4`, ...); the spectra are native floats.
  Rows are sorted by TARGETID (the writer's astropy join).
- Legacy Survey DR10 south (`dr10_south_21`, 160 px, bands DES-G, DES-R, DES-I, DES-Z):
  `image_array`, `image_ivar` (n, 4, 160, 160), `image_band` (n, 4) 5-byte strings
  (b"des-g", ...), `image_mask` (n, 160, 160) bool, one plane for all bands (True = clean),
  `image_psf_fwhm`, `image_scale` (n, 4), `image_rgb`, `blobmodel` (n, 160, 160, 3) uint8,
  `object_mask` (n, 160, 160) uint8, `catalog_<FLUX_G|...|X|Y>` (n, 20) of the 20 brightest
  neighbours, `object_id` = "<BRICKNAME>-<OBJID>" as 16-byte strings, `gid`, and every sweep
  catalogue column (RA, DEC, FLUX_*, SHAPE_*, TYPE, EBV, ...), `ra`, `dec`, `healpix`. Written
  chunked with lzf compression.
- Stein et al.'s sample (`ssl_legacysurvey`, 152 px, DES-G, DES-R, DES-Z): `image_array` (n, 3,
  152, 152) float32, `image_band` (n, 3), `image_psf_fwhm`, `image_scale` (n, 3), `object_id`
  (int64: the writer's internal row index), and the catalogue columns inds, ra, dec, release,
  brickid, objid, z_spec, ebv, flux_g/r/z, fiberflux_g/r/z, psfdepth_g/r/z, healpix,
  internal_inds. No ivar, no mask.

Every reader here returns exactly what h5py reads (dtype, byte order, bytes strings); only the
band selection (`bands`) picks planes. A file that lacks a dataset the reader needs, or whose
datasets disagree in length or shape, is a DataError naming the file and the dataset.
"""

import dataclasses
import os
import re

import h5py
import numpy as np

from astroclip_jax.data import hdf5_files
from astroclip_jax.errors import DataError, MissingInput

NSIDE = 16  # the writers' HEALPix resolution (nested)
PARTITION = re.compile(r"healpix=(\d+)")  # a partition folder's whole name (fullmatch)
FILE_SUFFIX = ".hdf5"  # the loaders read healpix=*/*.hdf5; the writers name it 001-of-001.hdf5
FILENAME = "001-of-001.hdf5"

DESI_SPECTRUM = ("spectrum_flux", "spectrum_ivar", "spectrum_mask", "spectrum_lsf_sigma",
                 "spectrum_lambda")
DESI_SPECTRUM_LENGTH = 7781
# Per band (second axis = band) and per image datasets of the Legacy Survey files.
IMAGE_PER_BAND = ("image_array", "image_ivar", "image_psf_fwhm", "image_scale", "image_band")
IMAGE_OTHER = ("image_mask", "image_rgb", "blobmodel", "object_mask")
POSITION = ("object_id", "ra", "dec")

# The two Legacy Survey configurations upstream writes (cutout size, bands in file order).
LAYOUTS = {"dr10_south_21": (160, ("g", "r", "i", "z")),
           "ssl_legacysurvey": (152, ("g", "r", "z"))}


@dataclasses.dataclass(frozen=True)
class Partition:
    healpix: int
    path: str


def partitions(root: str) -> list[Partition]:
    """The files of a configuration folder, by HEALPix index (ascending), then file name.

    Only folders whose whole name is `healpix=<digits>` count (`healpix=12` and `healpix=123`
    are different pixels; `healpix=12_old` is not a partition), and in them the `*.hdf5` files.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise MissingInput(f"Multimodal Universe folder {root} does not exist (expected the "
                           f"configuration folder holding healpix=<i>/{FILENAME})")
    out = []
    for name in os.listdir(root):
        m = PARTITION.fullmatch(name)
        folder = os.path.join(root, name)
        if m is None or not os.path.isdir(folder):
            continue
        for f in sorted(os.listdir(folder)):
            if f.endswith(FILE_SUFFIX) and os.path.isfile(os.path.join(folder, f)):
                out.append(Partition(int(m.group(1)), os.path.join(folder, f)))
    if not out:
        raise MissingInput(f"Multimodal Universe folder {root} has no healpix=<i>/*{FILE_SUFFIX} "
                           "files (give the configuration folder, e.g. .../dr1_main)")
    return sorted(out, key=lambda p: (p.healpix, p.path))


def partition_file(root: str, healpix: int) -> str:
    """The file of pixel `healpix` under `root` (the folder named exactly `healpix=<i>`)."""
    found = [p.path for p in partitions(root) if p.healpix == int(healpix)]
    if len(found) != 1:
        raise MissingInput(f"Multimodal Universe folder {root}: expected one file in "
                           f"healpix={int(healpix)}/, found {len(found)}")
    return found[0]


# ------------------------------------------------------------------------------- low level


def _dataset(f: h5py.File, key: str) -> h5py.Dataset:
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise DataError(f"{f.filename}: no dataset {key!r} (a Multimodal Universe file has "
                        f"{sorted(f.keys())[:12]}...)")
    return f[key]


def _rows_of(f: h5py.File) -> int:
    return int(_dataset(f, "object_id").shape[0])


def _read(ds: h5py.Dataset, rows: np.ndarray | None, n: int) -> np.ndarray:
    """`ds[rows]` as h5py reads it (rows in any order, repeats allowed); all rows when None."""
    if ds.shape[:1] != (n,):
        raise DataError(f"{ds.file.filename}: dataset {ds.name.lstrip('/')!r} has shape "
                        f"{ds.shape}; expected {n} rows (as object_id)")
    where = f"Multimodal Universe file {ds.file.filename!r}, dataset {ds.name.lstrip('/')!r}"
    if rows is None:
        return hdf5_files.read_dataset(ds, where)
    if rows.size == 0:
        return ds[0:0]
    # h5py wants increasing, unique indices: read those, then put them in the order asked.
    uniq, inverse = np.unique(rows, return_inverse=True)
    return hdf5_files.read_dataset(ds, where, uniq)[inverse]


def _check_rows(path: str, rows, n: int) -> np.ndarray | None:
    if rows is None:
        return None
    rows = np.asarray(rows)
    if rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise DataError(f"{path}: rows must be a 1-D integer array, got {rows.dtype} "
                        f"{rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise DataError(f"{path}: row {int(rows.max() if rows.max() >= n else rows.min())} "
                        f"out of range (the file has {n} rows)")
    return rows.astype(np.int64)


def _open(path: str) -> h5py.File:
    return hdf5_files.open_hdf5(path, "Multimodal Universe file")


def columns(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{dataset name: (shape, dtype)} of a file, as h5py reports them."""
    with _open(path) as f:
        return {k: (v.shape, v.dtype) for k, v in f.items() if isinstance(v, h5py.Dataset)}


def read_columns(path: str, keys, rows=None) -> dict[str, np.ndarray]:
    """The datasets `keys` of one file, for `rows` (None: all), exactly as h5py reads them."""
    with _open(path) as f:
        return _read_open(f, path, keys, rows)


def read_catalog(path: str, keys=None, rows=None) -> dict[str, np.ndarray]:
    """The catalogue of one file: every 1-D dataset (one value per row), or those named."""
    with _open(path) as f:
        if keys is None:
            keys = [k for k, v in f.items() if isinstance(v, h5py.Dataset) and v.ndim == 1]
        return _read_open(f, path, keys, rows)


def _read_open(f: h5py.File, path: str, keys, rows) -> dict[str, np.ndarray]:
    n = _rows_of(f)
    rows = _check_rows(path, rows, n)
    return {k: _read(_dataset(f, k), rows, n) for k in keys}


def read_positions(path: str) -> dict[str, np.ndarray]:
    """object_id, ra, dec of every row (what a cross-match needs)."""
    return read_columns(path, POSITION)


# ------------------------------------------------------------------------------- DESI


def read_desi(path: str, rows=None, extra=()) -> dict[str, np.ndarray]:
    """Spectra (flux, ivar, mask, LSF sigma, wavelength), object_id, ra, dec and the catalogue
    columns `extra` of a DESI `dr1_main` file, exactly as h5py reads them.

    Every spectrum dataset must be (n, L) with one L; L need not be 7781 here (see
    `check_wavelength` for the grid)."""
    out = read_columns(path, (*POSITION, *DESI_SPECTRUM, *extra), rows)
    length = out["spectrum_flux"].shape[1:]
    for key in DESI_SPECTRUM:
        if out[key].ndim != 2 or out[key].shape[1:] != length:
            raise DataError(f"{path}: dataset {key!r} has shape {out[key].shape}; expected "
                            f"(rows, L) like spectrum_flux {out['spectrum_flux'].shape}")
    return out


def check_wavelength(path: str, wavelength: np.ndarray, grid: np.ndarray,
                     tolerance: float = 0.01) -> None:
    """Each row of `wavelength` (Angstrom) is `grid` to within `tolerance` Angstrom (1/80 of a
    DESI pixel: float32 storage of 3600 + 0.8 i is exact to ~5e-4), else a DataError."""
    wavelength = np.asarray(wavelength, np.float64)
    if wavelength.ndim != 2 or wavelength.shape[1] != grid.size:
        raise DataError(f"{path}: spectrum_lambda has shape {wavelength.shape}; expected "
                        f"(rows, {grid.size}) on the DESI grid")
    off = np.abs(wavelength - grid[None, :]).max(axis=1) if wavelength.size else np.zeros(0)
    bad = np.nonzero(off > tolerance)[0]
    if bad.size:
        raise DataError(f"{path}: spectrum_lambda of row {int(bad[0])} differs from the DESI grid "
                        f"linspace({grid[0]:g}, {grid[-1]:g}, {grid.size}) by up to "
                        f"{off[bad[0]]:.3g} A ({bad.size} such rows)")


# ------------------------------------------------------------------------------- Legacy Survey


def band_names(image_band: np.ndarray) -> tuple[str, ...]:
    """The short band names ("g", "r", ...) of an `image_band` row (b"des-g" -> "g")."""
    return tuple(b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in image_band)


def _short(name: str) -> str:
    return name.lower().rsplit("-", 1)[-1]


def band_indices(path: str, image_band: np.ndarray, bands) -> np.ndarray:
    """Positions of `bands` (short names "g" or full "des-g") on the band axis; every row of
    `image_band` must list the same bands."""
    if image_band.ndim != 2:
        raise DataError(f"{path}: image_band has shape {image_band.shape}; expected (rows, bands)")
    if image_band.shape[0] and not (image_band == image_band[:1]).all():
        row = int(np.nonzero(~(image_band == image_band[:1]).all(axis=1))[0][0])
        raise DataError(f"{path}: image_band of row {row} is {band_names(image_band[row])}, "
                        f"not {band_names(image_band[0])} as row 0 (one band order per file)")
    names = band_names(image_band[0]) if image_band.shape[0] else ()
    short = [_short(n) for n in names]
    out = []
    for b in bands:
        b = str(b).lower()
        hits = [i for i, n in enumerate(names) if n.lower() == b] or \
               [i for i, s in enumerate(short) if s == _short(b)]
        if len(hits) != 1:
            raise DataError(f"{path}: band {b!r} is not (once) in image_band {list(names)}")
        out.append(hits[0])
    return np.asarray(out, np.int64)


def read_legacysurvey(path: str, rows=None, bands=None, extra=()) -> dict[str, np.ndarray]:
    """Images of a Legacy Survey file (dr10_south_21 or ssl_legacysurvey layout), exactly as h5py
    reads them, with the band axis cut to `bands` (None: all, in file order).

    Returned: object_id, ra, dec; image_array (n, B, S, S), image_band (n, B), image_psf_fwhm,
    image_scale (n, B); and where the file has them image_ivar (n, B, S, S) and image_mask
    (n, S, S); plus the catalogue columns `extra`."""
    with h5py.File(path, "r") as f:
        n = _rows_of(f)
        rows = _check_rows(path, rows, n)
        keys = [k for k in IMAGE_PER_BAND if k in f or k != "image_ivar"]
        keys += [k for k in ("image_mask",) if k in f]
        out = {k: _read(_dataset(f, k), rows, n) for k in (*POSITION, *keys, *extra)}
    image = out["image_array"]
    if image.ndim != 4 or image.shape[2] != image.shape[3]:
        raise DataError(f"{path}: image_array has shape {image.shape}; expected (rows, bands, "
                        "S, S)")
    for k in keys:
        want = image.shape if k in ("image_array", "image_ivar") else image.shape[:2]
        if k == "image_mask":
            want = image.shape[:1] + image.shape[2:]
        if out[k].shape != want:
            raise DataError(f"{path}: dataset {k!r} has shape {out[k].shape}; expected {want} "
                            f"(image_array is {image.shape})")
    if bands is not None:
        with h5py.File(path, "r") as f:  # the band order of all rows, not only those asked
            idx = band_indices(path, _dataset(f, "image_band")[()], bands)
        for k in IMAGE_PER_BAND:
            if k in out:
                out[k] = out[k][:, idx]
    return out


def layout(path: str) -> str:
    """"dr10_south_21" or "ssl_legacysurvey": which writer's layout a Legacy Survey file has
    (by its cutout size and bands)."""
    shapes = columns(path)
    if "image_array" not in shapes or "image_band" not in shapes:
        raise DataError(f"{path}: no dataset 'image_array'/'image_band'; not a Multimodal "
                        "Universe Legacy Survey file")
    size = shapes["image_array"][0][-1]
    for name, (s, b) in LAYOUTS.items():
        if size == s and shapes["image_array"][0][1] == len(b):
            return name
    raise DataError(f"{path}: image_array {shapes['image_array'][0]} matches neither the "
                    f"dr10_south_21 (4 x 160 px) nor the ssl_legacysurvey (3 x 152 px) layout")
