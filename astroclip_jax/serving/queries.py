"""What a search request may hold, checked before any work: uploads, near-duplicates, tables.

Pure functions of bytes and arrays (no web framework here): an upload becomes a validated
float32 array or a `BadRequest` whose message says what was wrong and what was expected.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np

NPY_MAGIC = b"\x93NUMPY"
FITS_MAGIC = b"SIMPLE  ="
TABLE_COLUMNS = ("rank", "targetid", "similarity", "redshift", "log_mstar", "ra", "dec")


class BadRequest(ValueError):
    """A request the server refuses with a 4xx status and this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------
# Uploads
# --------------------------------------------------------------------------------------------

def read_array(content: bytes) -> np.ndarray:
    """The array in an uploaded ``.npy`` or FITS file (the first HDU holding an image array),
    recognised by its first bytes (never by a file name). Pickled objects are refused."""
    if content.startswith(NPY_MAGIC):
        try:
            array = np.load(io.BytesIO(content), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise BadRequest(f"the .npy file could not be read ({err})") from None
    elif content.startswith(FITS_MAGIC):
        array = _read_fits(content)
    else:
        raise BadRequest("the upload is neither a .npy file nor a FITS file")
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "iuf":
        raise BadRequest(f"the upload holds {getattr(array, 'dtype', type(array))} values; "
                         "expected integer or floating-point flux")
    return array


def _read_fits(content: bytes) -> np.ndarray:
    from astropy.io import fits

    try:
        with fits.open(io.BytesIO(content), memmap=False) as hdus:
            for hdu in hdus:
                if hdu.is_image and hdu.data is not None:
                    return np.array(hdu.data)
    except (OSError, ValueError, TypeError, IndexError) as err:
        raise BadRequest(f"the FITS file could not be read ({err})") from None
    raise BadRequest("the FITS file holds no image array")


def _finite(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array, np.float32)
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise BadRequest(f"the {what} has {bad} NaN or infinite values (or values beyond "
                         "float32); every value must be finite")
    return array


def cutout(array: np.ndarray, min_size: int) -> np.ndarray:
    """A (H, W, 3) g, r, z flux cutout (also accepted as (3, H, W), the FITS cube order) with
    H, W >= ``min_size`` (what the model crops), finite, as float32."""
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise BadRequest(f"expected a (H, W, 3) g, r, z cutout (or (3, H, W)), got shape "
                         f"{tuple(array.shape)}")
    if min(array.shape[:2]) < min_size:
        raise BadRequest(f"the cutout is {array.shape[0]}x{array.shape[1]} pixels; the model "
                         f"needs at least {min_size}x{min_size} (it crops the centre)")
    return _finite(array, "cutout")


def spectrum(array: np.ndarray, length: int, grid: str) -> np.ndarray:
    """A (L,) flux spectrum on the run's grid (also (L, 1) or (1, L)), finite, float32."""
    flat = np.squeeze(array) if array.ndim == 2 and 1 in array.shape else array
    if flat.ndim != 1 or flat.shape[0] != length:
        raise BadRequest(f"expected a spectrum of {length} flux values on the {grid} "
                         f"wavelength grid, got shape {tuple(array.shape)}")
    return _finite(flat, "spectrum")


# --------------------------------------------------------------------------------------------
# Near-duplicates
# --------------------------------------------------------------------------------------------

def separation_arcsec(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle distance in arcsec between points given in degrees (haversine: exact to
    rounding at small separations, where the cosine formula loses digits)."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(v, np.float64)) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))) * 3600.0


def keep_distinct(targetids, radec=None, query_targetid=None, query_radec=None,
                  arcsec: float = 0.0) -> np.ndarray:
    """Which neighbours (in rank order) to keep: a neighbour is dropped when it has the query's
    target id or one already kept, or (with ``radec`` (n, 2) degrees) lies within ``arcsec`` of
    the query's position or of a better-ranked kept neighbour. NaN positions match nothing."""
    targetids = np.asarray(targetids, np.int64)
    keep = np.zeros(len(targetids), bool)
    seen = set() if query_targetid is None else {int(query_targetid)}
    kept_pos = [] if query_radec is None or radec is None else [tuple(query_radec)]
    for i, tid in enumerate(targetids.tolist()):
        if tid in seen:
            continue
        if radec is not None and arcsec > 0 and kept_pos:
            ra, dec = np.asarray(kept_pos).T
            if np.any(separation_arcsec(ra, dec, radec[i, 0], radec[i, 1]) <= arcsec):
                continue
        keep[i] = True
        seen.add(tid)
        if radec is not None:
            kept_pos.append(tuple(radec[i]))
    return keep


# --------------------------------------------------------------------------------------------
# Result tables
# --------------------------------------------------------------------------------------------

def json_number(value):
    """A float for JSON, None where it is NaN or infinite (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def table_csv(neighbours) -> str:
    """The neighbours as CSV (header `TABLE_COLUMNS`); unknown values are empty cells."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    for row in neighbours:
        writer.writerow(["" if row.get(c) is None else row[c] for c in TABLE_COLUMNS])
    return out.getvalue()
