"""The Multimodal Universe `desi_provabgs` files: PROVABGS's Z_MW, TAGE_MW and AVG_SFR by target.

The raw PROVABGS catalogue (`data/provabgs.py`) holds the redshift and the best-fit log M*, but
not the mass-weighted metallicity, the mass-weighted age or the SFR: those are computed from each
galaxy's best-fit parameters by the `provabgs` package's NMF model. The Multimodal Universe's
writer (MultimodalUniverse `scripts/desi_provabgs/build_parent_sample.py`) does that once and
stores the result, which is what this module reads.

The writer's layout: the catalogue cut as AstroCLIP cuts it (PROVABGS_LOGMSTAR_BF > 0 and
MAG_G, MAG_R, MAG_Z > 0), split by HEALPix index (nside 16, nested) into
`<root>/datafiles/healpix=<i>/001-of-001.h5`. Each file holds one top-level dataset per catalogue
column (every column but RA and DEC, under its catalogue name: TARGETID, Z_HP,
PROVABGS_LOGMSTAR_BF, PROVABGS_THETA_BF (n, k), PROVABGS_MCMC (n, 100, 13), MAG_*, ...), the
three computed columns Z_MW (the metal mass fraction, not log), TAGE_MW (Gyr) and AVG_SFR
(M_sun / yr), and `object_id` (= TARGETID), `ra`, `dec`, `healpix`. Its Hugging Face loader
(`desi_provabgs.py`) renames PROVABGS_LOGMSTAR_BF to LOG_MSTAR; the files keep the catalogue name.

What is returned per target: z_hp (Z_HP), log_mstar (PROVABGS_LOGMSTAR_BF, log10 M_sun),
z_mw (Z_MW as stored), log_z_mw = log10(Z_MW), tage_mw (TAGE_MW, Gyr) and
log_ssfr = log10(AVG_SFR) - PROVABGS_LOGMSTAR_BF (log10 of SFR / M*, per yr).

sSFR is SFR / M*. AstroCLIP's cross-match computes `log(AVG_SFR) - log(Z_MW)`, dividing by the
metallicity instead of the mass (a bug, not copied), and natural logs; here log10 throughout.
A non-positive or non-finite Z_MW or AVG_SFR gives NaN for its log (counted in `invalid`).
"""

import dataclasses
import glob
import logging
import os

import h5py
import numpy as np

from astroclip_jax.data import hdf5_files
from astroclip_jax.errors import DataError, MissingInput

DIRNAME = "desi_provabgs"  # where the files are looked for in the manual dir
PATTERNS = ("healpix=*/*.h5", "datafiles/healpix=*/*.h5")  # under the root the path names
ID_COLUMN = "object_id"
COLUMNS = ("Z_HP", "PROVABGS_LOGMSTAR_BF", "Z_MW", "TAGE_MW", "AVG_SFR")
PROPERTIES = ("log_z_mw", "tage_mw", "log_ssfr")  # what the Multimodal Universe files add


@dataclasses.dataclass(frozen=True)
class Properties:
    """Every row of every file, sorted by target id (for a searchsorted join)."""
    path: str
    files: tuple              # the files read, sorted
    targetid: np.ndarray      # int64, unique, sorted
    z_hp: np.ndarray          # float32 (the arrays below too)
    log_mstar: np.ndarray     # log10 M_sun
    z_mw: np.ndarray          # metal mass fraction
    log_z_mw: np.ndarray      # log10 of z_mw; NaN where z_mw <= 0
    tage_mw: np.ndarray       # Gyr
    log_ssfr: np.ndarray      # log10(AVG_SFR / M*) per yr; NaN where AVG_SFR <= 0
    invalid: dict             # {"Z_MW": rows, "AVG_SFR": rows} without a finite log


@dataclasses.dataclass(frozen=True)
class Join:
    """log_z_mw, tage_mw, log_ssfr per target: NaN where no row matches."""
    values: dict              # {name in PROPERTIES: float32 array}
    matched: np.ndarray       # bool
    counts: dict


def find_files(path: str) -> list:
    """The `.h5` files at `path`: the file itself, or the HEALPix files under a directory
    (`healpix=*/` directly under it, or under its `datafiles/`)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise MissingInput(f"Multimodal Universe desi_provabgs path {path!r} does not exist")
    found = sorted({f for pattern in PATTERNS
                    for f in glob.glob(os.path.join(glob.escape(path), pattern))})
    if not found:
        raise DataError(f"Multimodal Universe desi_provabgs directory {path!r} holds no "
                        f"{' or '.join(PATTERNS)} files")
    return found


def read_properties(path: str) -> Properties:
    """Read every desi_provabgs file at `path` (`find_files`); one row per target id."""
    files = find_files(path)
    parts = [_read_file(f) for f in files]
    ids = np.concatenate([p["id"] for p in parts])
    columns = {c: np.concatenate([p[c] for p in parts]) for c in COLUMNS}
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    columns = {c: v[order] for c, v in columns.items()}
    duplicated = np.flatnonzero(ids[1:] == ids[:-1])
    if duplicated.size:
        dup = int(ids[duplicated[0]])
        where = [f for f, p in zip(files, parts) if np.any(p["id"] == dup)]
        raise DataError(f"Multimodal Universe desi_provabgs {path!r}: object_id {dup} appears "
                        f"more than once (in {where}; {duplicated.size} duplicated id(s)); the "
                        f"join needs one row per target")
    z_mw, sfr, log_mstar = columns["Z_MW"], columns["AVG_SFR"], columns["PROVABGS_LOGMSTAR_BF"]
    with np.errstate(divide="ignore", invalid="ignore"):
        good_z = np.isfinite(z_mw) & (z_mw > 0)
        good_sfr = np.isfinite(sfr) & (sfr > 0)
        log_z_mw = np.where(good_z, np.log10(np.where(good_z, z_mw, 1.0)), np.nan)
        # sSFR = SFR / M* (upstream's cross-match divides by Z_MW: a bug).
        log_ssfr = np.where(good_sfr, np.log10(np.where(good_sfr, sfr, 1.0)) - log_mstar, np.nan)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return Properties(path=os.fspath(path), files=tuple(files), targetid=ids,
                      z_hp=f32(columns["Z_HP"]), log_mstar=f32(log_mstar), z_mw=f32(z_mw),
                      log_z_mw=f32(log_z_mw), tage_mw=f32(columns["TAGE_MW"]),
                      log_ssfr=f32(log_ssfr),
                      invalid={"Z_MW": int((~good_z).sum()), "AVG_SFR": int((~good_sfr).sum())})


def join(properties: Properties, targetids: np.ndarray) -> Join:
    """log_z_mw, tage_mw and log_ssfr of each target (NaN where unmatched); counts logged.
    Files matching none of the targets raise: they are surely the wrong ones."""
    targetids = np.asarray(targetids, dtype=np.int64)
    values = {name: np.full(targetids.shape, np.nan, np.float32) for name in PROPERTIES}
    matched = np.zeros(targetids.shape, dtype=bool)
    if len(properties.targetid):
        position = np.minimum(np.searchsorted(properties.targetid, targetids),
                              len(properties.targetid) - 1)
        matched = properties.targetid[position] == targetids
        for name in PROPERTIES:
            values[name][matched] = getattr(properties, name)[position[matched]]
    counts = {"matched": int(matched.sum()), "unmatched": int((~matched).sum()),
              "rows": len(properties.targetid), "files": len(properties.files),
              "invalid": dict(properties.invalid)}
    if targetids.size and counts["matched"] == 0:
        raise DataError(f"Multimodal Universe desi_provabgs {properties.path!r} matches none of "
                        f"the {targetids.size} targets (ids {targetids[:3].tolist()}...); "
                        f"{counts['rows']} rows in {counts['files']} file(s)")
    logging.info("desi_provabgs join with %s: %d matched, %d unmatched targets; %d rows in %d "
                 "file(s); non-positive Z_MW / AVG_SFR: %s", properties.path, counts["matched"],
                 counts["unmatched"], counts["rows"], counts["files"], counts["invalid"])
    return Join(values=values, matched=matched, counts=counts)


def _read_file(path: str) -> dict:
    """object_id (int64) and the COLUMNS (float64) of one file, checked."""
    with hdf5_files.open_hdf5(path, "desi_provabgs file") as handle:
        missing = [c for c in (ID_COLUMN, *COLUMNS)
                   if c not in handle or not isinstance(handle[c], h5py.Dataset)]
        if missing:
            raise DataError(f"desi_provabgs file {path!r}: missing dataset(s) {missing}; "
                            f"found {sorted(handle.keys())}")
        raw = {c: hdf5_files.read_dataset(handle[c], f"desi_provabgs file {path!r}, dataset {c!r}")
               for c in (ID_COLUMN, *COLUMNS)}
    if np.ndim(raw[ID_COLUMN]) != 1:
        raise DataError(f"desi_provabgs file {path!r}, dataset {ID_COLUMN!r}: expected one id "
                        f"per row (1-D), got shape {np.shape(raw[ID_COLUMN])}")
    n = len(raw[ID_COLUMN])
    for column, values in raw.items():
        if np.ndim(values) != 1 or len(values) != n:
            raise DataError(f"desi_provabgs file {path!r}, dataset {column!r}: expected shape "
                            f"({n},) like {ID_COLUMN!r}, got {np.shape(values)}")
        if column != ID_COLUMN and values.dtype.kind not in "fiu":
            raise DataError(f"desi_provabgs file {path!r}, dataset {column!r}: expected numbers, "
                            f"got {values.dtype}")
    out = {c: np.asarray(raw[c], np.float64) for c in COLUMNS}
    out["id"] = _ids(raw[ID_COLUMN], path)
    return out


def _ids(values: np.ndarray, path: str) -> np.ndarray:
    """object_id as int64: the writer stores TARGETID (integers); digits as strings are read too."""
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind in "SUO":
        text = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
        if all(t.strip().lstrip("-").isdigit() for t in text):
            return np.array([int(t) for t in text], dtype=np.int64)
    raise DataError(f"desi_provabgs file {path!r}, dataset {ID_COLUMN!r}: expected integer "
                    f"target ids, got {values.dtype} (e.g. {values[:2].tolist()})")
