"""HATS catalogues (the Multimodal Universe's coming format, v1.5): import, read, cross-match.

HATS stores a catalogue as Parquet files partitioned by adaptive HEALPix tiles; `lsdb` reads
and cross-matches them lazily with dask, tile by tile, so catalogues larger than memory work.
For catalogues a user already has in HATS form, `match` pairs two of them with lsdb's
nearest-neighbour cross-match and then applies the same one-to-one rule as
`crossmatch.match_one_to_one` (lsdb's, like the MMU's own `cross_match_datasets`, lets two left
rows take one right row). Without a margin cache of the right catalogue, a pair whose rows sit
in two neighbouring tiles can be missed (lsdb warns); `hats-import`'s margin pipeline makes one.

lsdb, hats and hats-import are imported inside the functions: they pull in dask and take
seconds to import, and nothing else in the package needs them.
"""

import os

import numpy as np

from astroclip_jax.errors import DataError, MissingInput

DIST_COLUMN = "_dist_arcsec"  # lsdb's separation column of a cross-match


def import_catalog(input_files, output_dir: str, name: str, *, ra_column: str = "ra",
                   dec_column: str = "dec", file_reader: str = "parquet",
                   pixel_threshold: int = 1_000_000, highest_healpix_order: int = 10) -> str:
    """Make a HATS catalogue `output_dir/name` from Parquet (or CSV) files with hats-import,
    on an in-process dask client (one worker thread); its path."""
    from dask.distributed import Client  # pylint: disable=import-outside-toplevel
    from hats_import import ImportArguments, pipeline_with_client  # pylint: disable=W0611

    files = [os.fspath(f) for f in input_files]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise MissingInput(f"HATS import input {missing[0]} does not exist")
    args = ImportArguments(output_path=os.fspath(output_dir), output_artifact_name=name,
                           input_file_list=files, file_reader=file_reader,
                           ra_column=ra_column, dec_column=dec_column,
                           pixel_threshold=pixel_threshold,
                           highest_healpix_order=highest_healpix_order,
                           progress_bar=False, resume=False,
                           tmp_dir=os.path.join(os.fspath(output_dir), f".tmp-{name}"))
    with Client(processes=False, n_workers=1, threads_per_worker=1,
                dashboard_address=None) as client:
        pipeline_with_client(args, client)
    return os.path.join(os.fspath(output_dir), name)


def read(path: str, columns=None):
    """The lazy lsdb catalogue at `path` (a HATS catalogue directory)."""
    import lsdb  # pylint: disable=import-outside-toplevel

    if not os.path.isdir(os.fspath(path)):
        raise MissingInput(f"HATS catalogue {path} does not exist (expected a directory with "
                           "hats.properties)")
    try:
        return lsdb.read_hats(os.fspath(path), columns=columns)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"HATS catalogue {path}: {' '.join(str(err).split())}") from err


def match(left_path: str, right_path: str, *, left_id: str, right_id: str,
          radius_arcsec: float = 1.0) -> dict[str, np.ndarray]:
    """One-to-one sky match of two HATS catalogues: {"left": left ids, "right": right ids,
    "separation_arcsec"}, sorted by left id. Each left row's nearest right row within
    `radius_arcsec` (lsdb's k-d tree, n_neighbors=1); of several left rows on one right row the
    closest keeps it (ties: the lowest left id), as `crossmatch.match_one_to_one` does."""
    if not np.isfinite(radius_arcsec) or radius_arcsec <= 0:
        raise DataError(f"HATS cross-match radius_arcsec: expected a positive number, got "
                        f"{radius_arcsec!r}")
    for col, path in ((left_id, left_path), (right_id, right_path)):
        cat = read(path)  # lazy: only the schema is read
        names = list(getattr(cat, "all_columns", cat.columns))
        if col not in names:
            raise DataError(f"HATS catalogue {path}: no column {col!r} (has {names[:12]})")
    left = read(left_path, columns=[left_id])
    right = read(right_path, columns=[right_id])
    joined = left.crossmatch(right, n_neighbors=1, radius_arcsec=float(radius_arcsec),
                             suffixes=("_left", "_right"), suffix_method="all_columns",
                             log_changes=False)
    frame = joined.compute()
    lcol = next(c for c in (f"{left_id}_left", left_id) if c in frame.columns)
    rcol = next(c for c in (f"{right_id}_right", right_id) if c in frame.columns)
    li = frame[lcol].to_numpy()
    ri = frame[rcol].to_numpy()
    sep = frame[DIST_COLUMN].to_numpy(np.float64)
    keep = sep < radius_arcsec  # strict, as the in-memory match
    li, ri, sep = li[keep], ri[keep], sep[keep]
    order = np.lexsort((li, sep, ri))  # per right id: the closest, then the lowest left id
    first = np.ones(order.size, bool)
    first[1:] = ri[order][1:] != ri[order][:-1]
    chosen = order[first]
    chosen = chosen[np.argsort(li[chosen], kind="stable")]
    return {"left": li[chosen], "right": ri[chosen], "separation_arcsec": sep[chosen]}
