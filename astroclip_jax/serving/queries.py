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
        super().__init__(" ".join(message.split()))  # one line, whatever a library said
        self.status = status


# --------------------------------------------------------------------------------------------
# Uploads
# --------------------------------------------------------------------------------------------

# FITS BITPIX -> bytes per value (the standard's six); anything else is not a FITS image.
_BITPIX_BYTES = {8: 1, 16: 2, 32: 4, 64: 8, -32: 4, -64: 8}
_MAX_AXES = 999  # the FITS standard's NAXIS limit
# A cutout has 3 axes and a spectrum 1 or 2: more is no upload of this page (and NumPy itself
# stops at 64), refused before any data is decoded.
MAX_NDIM = 3
# HDUs read looking for the image: an image file has it first or second; thousands of empty
# HDUs would only cost header parsing.
MAX_HDUS = 64


def max_values(max_upload_bytes: int) -> int:
    """The most values an upload may decode to: as many as a float32 file (what the model
    takes) of ``serve.max_upload_bytes`` holds. A compressed FITS file can describe far more
    than it carries (a 216 KB tile-compressed file decodes to 32 MiB), so the bound is on what
    the headers say it decodes to, not on its own size."""
    return max(1, max_upload_bytes // 4)


def read_array(content: bytes, limit: int) -> np.ndarray:
    """The array in an uploaded ``.npy`` or FITS file (the first HDU holding an image array),
    recognised by its first bytes (never by a file name), holding at most ``limit`` values
    (`max_values`). Headers are read and checked first; no data is decoded (or decompressed)
    unless they describe a complete array of integer or floating-point values within the
    limit. Pickled objects are never read."""
    if content.startswith(NPY_MAGIC):
        return _read_npy(content, limit)
    if content.startswith(FITS_MAGIC):
        return _read_fits(content, limit)
    raise BadRequest("file: the upload is neither a .npy file nor a FITS file (expected one "
                     "written by numpy.save or a FITS writer)")


def _check_size(shape, limit: int, where: str) -> int:
    """The number of values of an array of ``shape`` (sizes already >= 0), refused when it has
    more than `MAX_NDIM` axes, no values, or more than ``limit``."""
    count = math.prod(shape)
    if len(shape) > MAX_NDIM:
        raise BadRequest(f"file: {where} holds {len(shape)} axes {tuple(shape)}; expected at "
                         f"most {MAX_NDIM} (a cutout or a spectrum)")
    if count == 0:
        raise BadRequest(f"file: {where} holds an empty array of shape {tuple(shape)}")
    if count > limit:
        raise BadRequest(f"file: {where} holds shape {tuple(shape)} = {count} values; at most "
                         f"{limit} are accepted (serve.max_upload_bytes of float32 values)",
                         status=413)
    return count


def _read_npy(content: bytes, limit: int) -> np.ndarray:
    from numpy.lib import format as npy

    buf = io.BytesIO(content)
    # NumPy tokenizes and evaluates the header text as a Python literal, which fails in many
    # ways on a crafted one (ValueError, SyntaxError, tokenize.TokenError, RecursionError...);
    # each is the file's fault, so every one becomes a 400 naming the file.
    try:
        version = npy.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(buf)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]}")
    except Exception as err:  # noqa: BLE001 (see above)
        raise BadRequest(f"file: the .npy header could not be read ({err}); expected a .npy "
                         "file of format 1.0 or 2.0 as numpy.save writes") from None
    if dtype.hasobject or dtype.fields is not None or dtype.shape or dtype.kind not in "iuf":
        raise BadRequest(f"file: the .npy file holds {dtype} values; expected integer or "
                         "floating-point flux")
    if any(isinstance(d, bool) or d < 0 for d in shape):
        raise BadRequest(f"file: the .npy header gives shape {shape}; expected sizes >= 0")
    count = _check_size(shape, limit, "the .npy file")
    data_bytes = count * dtype.itemsize
    if len(content) - buf.tell() != data_bytes:
        raise BadRequest(f"file: the .npy header gives shape {shape} of {dtype} "
                         f"({data_bytes} bytes of data) but the file holds "
                         f"{len(content) - buf.tell()}; expected a complete .npy file")
    array = np.frombuffer(content, dtype, count, offset=buf.tell())
    return array.reshape(shape, order="F" if fortran else "C")


def _card_int(header, name: str, low: int, high: int | None = None) -> int:
    value = header.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low \
            or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise BadRequest(f"file: the FITS header card {name} is {value!r}; expected an "
                         f"integer {bound}")
    return int(value)


def _bitpix(header, name: str) -> int:
    value = header.get(name)
    if isinstance(value, bool) or value not in _BITPIX_BYTES:
        raise BadRequest(f"file: the FITS header card {name} is {value!r}; expected one of "
                         f"{sorted(_BITPIX_BYTES)}")
    return int(value)


def _axes(header, prefix: str = "") -> list[int]:
    """NAXIS1..NAXISn (FITS order: the fastest axis first), each checked."""
    return [_card_int(header, f"{prefix}NAXIS{i}", 0)
            for i in range(1, _card_int(header, f"{prefix}NAXIS", 0, _MAX_AXES) + 1)]


def _image_shape(header, compressed: bool):
    """The shape (NumPy order) of the image an HDU header describes, or None when it
    describes no image (no axes, or one of size 0); checked card by card (FITS standard 4.0
    section 4.4, and the tiled image convention's Z keywords)."""
    z = "Z" if compressed else ""
    _bitpix(header, f"{z}BITPIX")
    axes = _axes(header, z)
    if compressed:  # a tile larger than the image would make the reader allocate beyond it
        for i, size in enumerate(axes, start=1):
            if f"ZTILE{i}" in header:
                _card_int(header, f"ZTILE{i}", 1, max(size, 1))
    return tuple(reversed(axes)) if axes and math.prod(axes) else None


def _raw_bytes(header) -> int:
    """Bytes of data an HDU's header says follow it in the file (FITS standard eq. 2)."""
    size = _BITPIX_BYTES[_bitpix(header, "BITPIX")]
    axes = _axes(header)
    if not axes:
        return 0
    gcount = _card_int(header, "GCOUNT", 0) if "GCOUNT" in header else 1
    pcount = _card_int(header, "PCOUNT", 0) if "PCOUNT" in header else 0
    return size * gcount * (pcount + math.prod(axes))


def _read_fits(content: bytes, limit: int) -> np.ndarray:
    from astropy.io import fits

    # astropy raises many kinds of error (OSError, TypeError, VerifyError, ...) on malformed
    # headers; each is the file's fault, so every one becomes a 400 naming the file.
    try:
        # Headers only: compressed HDUs stay binary tables (nothing decompressed), and the
        # HDUs are read lazily, data skipped.
        with fits.open(io.BytesIO(content), memmap=False,
                       disable_image_compression=True) as hdus:
            chosen = None
            for i, hdu in enumerate(hdus):
                if i == MAX_HDUS:
                    raise BadRequest(f"file: the FITS file has no image in its first "
                                     f"{MAX_HDUS} HDUs; expected an image HDU")
                header = hdu.header
                end = hdus.fileinfo(i)["datLoc"] + _raw_bytes(header)
                if end > len(content):
                    raise BadRequest(f"file: FITS HDU {i} needs {end} bytes, the file has "
                                     f"{len(content)}; expected a complete FITS file")
                compressed = header.get("XTENSION") == "BINTABLE" and header.get("ZIMAGE") is True
                if i == 0 or header.get("XTENSION") == "IMAGE" or compressed:
                    shape = _image_shape(header, compressed)
                    if shape is not None:
                        chosen = (i, shape)
                        break
    except BadRequest:
        raise
    except Exception as err:  # noqa: BLE001 (see above)
        raise BadRequest(f"file: the FITS file could not be read ({type(err).__name__}: "
                         f"{err}); expected a FITS file with an image HDU") from None
    if chosen is None:
        raise BadRequest("file: the FITS file holds no image array (expected an image HDU, "
                         "plain or tile-compressed)")
    index, shape = chosen
    _check_size(shape, limit, f"FITS HDU {index}")
    try:
        with fits.open(io.BytesIO(content), memmap=False) as hdus:
            array = np.array(hdus[index].data)
    except Exception as err:  # noqa: BLE001 (as above: the data did not decode)
        raise BadRequest(f"file: the data of FITS HDU {index} could not be read "
                         f"({type(err).__name__}: {err})") from None
    if array.shape != shape:
        raise BadRequest(f"file: FITS HDU {index} decoded to shape {array.shape}, its header "
                         f"says {shape}")
    if array.dtype.kind not in "iuf":
        raise BadRequest(f"file: the FITS image holds {array.dtype} values; expected integer "
                         "or floating-point flux")
    return array


def _finite(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array, np.float32)
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise BadRequest(f"file: the {what} has {bad} NaN or infinite values (or values beyond "
                         "float32); every value must be finite")
    return array


def cutout(array: np.ndarray, min_size: int) -> np.ndarray:
    """A (H, W, 3) g, r, z flux cutout (also accepted as (3, H, W), the FITS cube order) with
    H, W >= ``min_size`` (what the model crops), finite, as float32."""
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise BadRequest(f"file: expected a (H, W, 3) g, r, z cutout (or (3, H, W)), got shape "
                         f"{tuple(array.shape)}")
    if min(array.shape[:2]) < min_size:
        raise BadRequest(f"file: the cutout is {array.shape[0]}x{array.shape[1]} pixels; the model "
                         f"needs at least {min_size}x{min_size} (it crops the centre)")
    return _finite(array, "cutout")


def spectrum(array: np.ndarray, length: int, grid: str) -> np.ndarray:
    """A (L,) flux spectrum on the run's grid (also (L, 1) or (1, L)), finite, float32."""
    flat = np.squeeze(array) if array.ndim == 2 and 1 in array.shape else array
    if flat.ndim != 1 or flat.shape[0] != length:
        raise BadRequest(f"file: expected a spectrum of {length} flux values on the {grid} "
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
