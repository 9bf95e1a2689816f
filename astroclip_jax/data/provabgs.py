"""The PROVABGS value-added catalogue (`BGS_ANY_full.provabgs.sv3.v0.hdf5`): read, cut, join.

Upstream opens the file with astropy's `Table.read`. astropy writes (and reads) an HDF5 table as
one dataset with a compound dtype, one field per column, by default at "__astropy_table__", with
its serialised column metadata beside it in "<path>.__table_column_meta__" (ignored here); a masked
column `X` is written as field `X` plus a boolean field `X.mask`. When no path is given astropy
reads the first compound dataset it meets while visiting the file; so does `read_catalog`.

Cuts (upstream): PROVABGS_LOGMSTAR_BF > 0 and MAG_G, MAG_R, MAG_Z > 0; NaN and masked values fail.

This file gives the redshift and log M*. The other PROVABGS properties (the mass-weighted
metallicity Z_MW and age TAGE_MW, and the SFR for sSFR = SFR / M*) are not in it: they are fits
of the `provabgs` package, stored by the Multimodal Universe in its `desi_provabgs` files
(`data/provabgs_mmu.py`).
"""

import dataclasses
import logging
import os

import h5py
import numpy as np

from astroclip_jax.data import hdf5_files
from astroclip_jax.errors import DataError

FILENAME = "BGS_ANY_full.provabgs.sv3.v0.hdf5"
DEFAULT_TABLE_PATH = "__astropy_table__"
COLUMNS = ("TARGETID", "Z_HP", "PROVABGS_LOGMSTAR_BF", "MAG_G", "MAG_R", "MAG_Z")
POSITIVE_COLUMNS = ("PROVABGS_LOGMSTAR_BF", "MAG_G", "MAG_R", "MAG_Z")


@dataclasses.dataclass(frozen=True)
class Catalog:
    """Rows that passed the cuts, sorted by TARGETID (for a searchsorted join)."""
    path: str
    targetid: np.ndarray   # int64, unique, sorted
    z_hp: np.ndarray       # float32
    log_mstar: np.ndarray  # float32
    n_rows: int            # rows in the file
    n_cut: int             # rows removed by the cuts


@dataclasses.dataclass(frozen=True)
class Join:
    """Per-target properties: NaN and has_props False where no catalogue row survives."""
    z_hp: np.ndarray
    log_mstar: np.ndarray
    has_props: np.ndarray
    counts: dict  # matched / unmatched targets, catalogue rows cut


def read_catalog(path: str, table_path: str | None = None) -> Catalog:
    """Read the catalogue table at `path` and apply the upstream cuts."""
    path = os.fspath(path)
    with hdf5_files.open_hdf5(path, "PROVABGS catalogue") as handle:
        name = _find_table(handle, path, table_path)
        table = hdf5_files.read_dataset(handle[name],
                                        f"PROVABGS catalogue {path!r}, table {name!r}")
    fields = table.dtype.names or ()
    missing = [c for c in COLUMNS if c not in fields]
    if missing:
        raise DataError(f"PROVABGS catalogue {path!r}, table {name!r}: missing column(s) "
                        f"{missing}; found {list(fields)}")
    if table.ndim != 1:
        raise DataError(f"PROVABGS catalogue {path!r}, table {name!r}: expected a 1-D table, "
                        f"got shape {table.shape}")
    if table["TARGETID"].dtype.kind not in "iu":
        raise DataError(f"PROVABGS catalogue {path!r}, column TARGETID: expected integers, got "
                        f"{table['TARGETID'].dtype}")

    keep = np.ones(len(table), dtype=bool)
    for column in POSITIVE_COLUMNS:
        values = _float_column(table, column)
        with np.errstate(invalid="ignore"):
            keep &= values > 0  # NaN fails too
    targetid = table["TARGETID"].astype(np.int64)[keep]
    z_hp = _float_column(table, "Z_HP")[keep].astype(np.float32)
    log_mstar = _float_column(table, "PROVABGS_LOGMSTAR_BF")[keep].astype(np.float32)

    order = np.argsort(targetid, kind="stable")
    targetid, z_hp, log_mstar = targetid[order], z_hp[order], log_mstar[order]
    duplicated = np.flatnonzero(targetid[1:] == targetid[:-1])
    if duplicated.size:
        dup = int(targetid[duplicated[0]])
        rows = np.flatnonzero((table["TARGETID"].astype(np.int64) == dup) & keep).tolist()
        raise DataError(f"PROVABGS catalogue {path!r}: TARGETID {dup} appears in rows {rows} "
                        f"after the cuts ({duplicated.size} duplicated id(s)); the join needs "
                        f"one row per target")
    return Catalog(path=path, targetid=targetid, z_hp=z_hp, log_mstar=log_mstar,
                   n_rows=len(table), n_cut=int((~keep).sum()))


def join(catalog: Catalog, targetids: np.ndarray) -> Join:
    """Look up each target's Z_HP and PROVABGS_LOGMSTAR_BF; counts are logged.

    counts: "matched" / "unmatched" targets (a target whose row was cut is unmatched), and "cut",
    the catalogue rows removed by the cuts. A catalogue matching no target raises: it is surely
    the wrong file.
    """
    targetids = np.asarray(targetids, dtype=np.int64)
    z_hp = np.full(targetids.shape, np.nan, dtype=np.float32)
    log_mstar = np.full(targetids.shape, np.nan, dtype=np.float32)
    has_props = np.zeros(targetids.shape, dtype=bool)
    if len(catalog.targetid):
        position = np.minimum(np.searchsorted(catalog.targetid, targetids),
                              len(catalog.targetid) - 1)
        has_props = catalog.targetid[position] == targetids
        z_hp[has_props] = catalog.z_hp[position[has_props]]
        log_mstar[has_props] = catalog.log_mstar[position[has_props]]
    counts = {"matched": int(has_props.sum()), "unmatched": int((~has_props).sum()),
              "cut": catalog.n_cut}
    if targetids.size and counts["matched"] == 0:
        raise DataError(f"PROVABGS catalogue {catalog.path!r} matches none of the "
                        f"{targetids.size} targets (ids {targetids[:3].tolist()}...); "
                        f"{catalog.n_rows} rows, {catalog.n_cut} removed by the cuts")
    logging.info("PROVABGS join with %s: %d matched, %d unmatched targets; %d of %d rows cut",
                 catalog.path, counts["matched"], counts["unmatched"], catalog.n_cut,
                 catalog.n_rows)
    return Join(z_hp=z_hp, log_mstar=log_mstar, has_props=has_props, counts=counts)


def _find_table(handle: h5py.File, path: str, table_path: str | None) -> str:
    """The compound dataset holding the table, as astropy's reader would pick it."""
    if table_path is None and DEFAULT_TABLE_PATH in handle:
        table_path = DEFAULT_TABLE_PATH
    if table_path is not None:
        if table_path not in handle:
            raise DataError(f"PROVABGS catalogue {path!r}: no dataset at {table_path!r}; "
                            f"top level holds {sorted(handle.keys())}")
        obj = handle[table_path]
        if isinstance(obj, h5py.Dataset):
            if obj.dtype.kind != "V":
                raise DataError(f"PROVABGS catalogue {path!r}: {table_path!r} is not a table "
                                f"(dtype {obj.dtype}, expected a compound dtype)")
            return table_path
        found = _compound_datasets(obj)
        if not found:
            raise DataError(f"PROVABGS catalogue {path!r}: no table in group {table_path!r}")
        return f"{table_path}/{found[0]}"
    found = _compound_datasets(handle)
    if not found:
        raise DataError(f"PROVABGS catalogue {path!r}: no table (compound dataset) in the file; "
                        f"top level holds {sorted(handle.keys())}")
    if len(found) > 1:
        logging.warning("PROVABGS catalogue %s holds tables %s; reading %s", path, found, found[0])
    return found[0]


def _compound_datasets(group: h5py.Group) -> list:
    found = []
    group.visititems(lambda name, obj: found.append(name)
                     if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "V" else None)
    return found


def _float_column(table: np.ndarray, column: str) -> np.ndarray:
    """A column as native float64 with masked entries (astropy's `<col>.mask`) set to NaN."""
    values = np.asarray(table[column], dtype=np.float64)
    mask_field = f"{column}.mask"
    if mask_field in (table.dtype.names or ()):
        values = np.where(np.asarray(table[mask_field], dtype=bool), np.nan, values)
    return values
