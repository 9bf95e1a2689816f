"""A table of embeddings on disk: a directory of Parquet chunk files plus one manifest.

    <directory>/chunk-000000.parquet   rows [0, C)        written by whichever process
    <directory>/chunk-000001.parquet   rows [C, 2C)       embedded them, as they are done
    ...
    <directory>/_manifest.json         written last, once every chunk is there: the key,
                                       the metadata, the columns (dtype, row shape), and per
                                       chunk its rows, byte size and sha256

Why Parquet: it is columnar and compressed, a chunk is one self-contained file (written
atomically, so a killed writer leaves whole chunks or none), and pandas
(``pd.read_parquet(directory)``), astropy (``Table.read(chunk)``), pyarrow, polars, DuckDB and
Spark read it without this package. Vector columns (embeddings, features) are fixed-size lists,
which astropy reads as (N, D) columns and pandas as one array per row; columns with more than
one axis per row (pooled images) are stored flat, with their row shape in the manifest and in
each file's schema metadata (``shapes``), and `iter_chunks` gives them back in shape. One
HDF5 per chunk would serve h5py users, but not pandas without this package.

Every chunk carries its own checksum from the moment it is written: its size and sha256, taken
of the bytes written, go to ``_chunk-000000.parquet.sha256`` beside it (atomically, after the
chunk; "_" keeps pandas/pyarrow from reading it as data). An unfinished table is resumed only
from chunks that match their record (`chunk_problem`), so a chunk altered, truncated or replaced
after it was written is computed again, never sealed as good. Sealing checks every chunk
against its record once more, copies the records into the manifest and removes them.

Reading verifies: a chunk whose size or sha256 differs from the manifest (truncated, altered),
a missing chunk or a damaged manifest is a `DataError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from astroclip_jax import files
from astroclip_jax.errors import DataError

MANIFEST = "_manifest.json"  # "_": skipped by pandas/pyarrow reading the directory
FORMAT_VERSION = 3
_CHUNK = re.compile(r"^chunk-(\d{6})\.parquet$")


def chunk_path(directory: str, chunk: int) -> str:
    return os.path.join(directory, f"chunk-{chunk:06d}.parquet")


def checksum_path(chunk_file: str) -> str:
    """The record of a chunk's size and sha256, written with it, until the table is sealed."""
    return os.path.join(os.path.dirname(chunk_file), f"_{os.path.basename(chunk_file)}.sha256")


def _to_arrow(value: np.ndarray) -> pa.Array:
    value = np.ascontiguousarray(value)
    if value.ndim == 1:
        return pa.array(value)
    width = int(np.prod(value.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)), width)


def _from_arrow(column: pa.ChunkedArray, dtype: str, shape: Sequence[int]) -> np.ndarray:
    column = column.combine_chunks()
    if shape:
        flat = column.flatten().to_numpy(zero_copy_only=False)
        return flat.astype(dtype, copy=False).reshape((len(column), *shape))
    return column.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def write_chunk(directory: str, chunk: int, columns: Mapping[str, np.ndarray],
                file_meta: Mapping[str, Any]) -> str:
    """Write one chunk atomically; `file_meta` (JSON-able) goes into its schema metadata."""
    os.makedirs(directory, exist_ok=True)
    columns = {k: np.asarray(v) for k, v in columns.items()}
    table = pa.table({k: _to_arrow(v) for k, v in columns.items()})
    shapes = {k: [str(v.dtype), list(v.shape[1:])] for k, v in columns.items()}
    table = table.replace_schema_metadata({"astroclip": json.dumps(
        {**file_meta, "chunk": chunk, "shapes": shapes})})
    path = chunk_path(directory, chunk)
    record = checksum_path(path)
    if os.path.exists(record):  # an earlier chunk's record must not vouch for this one
        os.remove(record)
    with files.atomic_path(path, suffix=".parquet.tmp") as tmp:
        pq.write_table(table, tmp)
        written = files.file_record(tmp)  # the bytes as written, before anything can touch them
    with files.atomic_path(record, suffix=".json.tmp") as tmp, \
            open(tmp, "w", encoding="utf-8") as f:
        json.dump(written, f)
    return path


def chunk_meta(path: str) -> dict[str, Any] | None:
    """The metadata a chunk file was written with, or None if it is not a whole chunk."""
    try:
        schema = pq.read_schema(path)
        return json.loads(schema.metadata[b"astroclip"])
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowInvalid):
        return None


def _written_record(path: str) -> dict[str, Any] | None:
    try:
        with open(checksum_path(path), encoding="utf-8") as f:
            record = json.load(f)
        return {"bytes": int(record["bytes"]), "sha256": str(record["sha256"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def chunk_problem(path: str) -> str | None:
    """Why chunk file `path` of an unfinished table is not the whole chunk that was written
    (no record or not matching it, unreadable metadata, rows or columns other than its
    metadata says), or None."""
    record = _written_record(path)
    if record is None:
        return "has no readable checksum record (its writer was interrupted)"
    problem = files.file_problem(path, record["bytes"], record["sha256"])
    if problem is not None:
        return problem
    meta = chunk_meta(path)
    try:
        stored = pq.read_metadata(path)
        names = set(stored.schema.to_arrow_schema().names)
    except (OSError, pa.ArrowInvalid) as err:
        return f"is not readable Parquet ({err})"
    if meta is None or stored.num_rows != meta.get("rows", stored.num_rows) \
            or names != set(meta.get("shapes", ())):
        return "has rows or columns other than its metadata says"
    return None


def existing_chunks(directory: str) -> dict[int, str]:
    """Chunk index -> path of the chunk files in `directory`."""
    if not os.path.isdir(directory):
        return {}
    return {int(m.group(1)): os.path.join(directory, name) for name in os.listdir(directory)
            if (m := _CHUNK.match(name))}


def write_manifest(directory: str, key: str, meta: Mapping[str, Any], chunks: Sequence[int],
                   ) -> dict[str, Any]:
    """Seal a directory whose chunks `chunks` are all written: the manifest, atomically."""
    entries, columns, start = [], None, 0
    for chunk in chunks:
        path = chunk_path(directory, chunk)
        problem = chunk_problem(path) if os.path.exists(path) else "is missing"
        if problem is not None:
            raise DataError(f"embeddings chunk {path} {problem}")
        info, record = chunk_meta(path), _written_record(path)
        if columns is not None and info["shapes"] != columns:
            raise DataError(f"embeddings chunk {path} has columns {info['shapes']}, the "
                            f"table's first chunk {columns}")
        rows = pq.read_metadata(path).num_rows
        entries.append({"file": os.path.basename(path), "start": start, "rows": rows, **record})
        columns = columns or info["shapes"]
        start += rows
    manifest = {"format_version": FORMAT_VERSION, "embeddings_key": key, "n": start,
                "meta": dict(meta), "columns": columns or {}, "chunks": entries}
    with files.atomic_path(os.path.join(directory, MANIFEST), suffix=".json.tmp") as tmp, \
            open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    for chunk in chunks:  # the manifest holds the records now
        os.remove(checksum_path(chunk_path(directory, chunk)))
    return manifest


def remove_chunk(path: str) -> None:
    """Remove a chunk file and its checksum record (a chunk of an earlier, other embed)."""
    for name in (path, checksum_path(path)):
        if os.path.exists(name):
            os.remove(name)


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of a sealed directory; DataError when it is unreadable or incomplete."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        manifest["embeddings_key"], manifest["chunks"], manifest["meta"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"embeddings manifest {path} is damaged or incomplete ({err})") from None
    return manifest


def verify(directory: str, manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest, after checking every chunk's size and sha256 against it."""
    manifest = manifest or read_manifest(directory)
    for entry in manifest["chunks"]:
        _check_chunk(directory, entry)
    return manifest


def _check_chunk(directory: str, entry: Mapping[str, Any]) -> str:
    path = os.path.join(directory, entry["file"])
    problem = files.file_problem(path, entry["bytes"], entry["sha256"])
    if problem is not None:
        raise DataError(f"embeddings file {path} {problem}")
    return path


def iter_chunks(directory: str, columns: Sequence[str] | None = None, verify_each: bool = True,
                ) -> Iterator[dict[str, np.ndarray]]:
    """Chunk by chunk, in row order: {column: array} (all columns, or `columns`), each chunk
    verified against the manifest before it is read. Memory: one chunk."""
    manifest = read_manifest(directory)
    shapes = manifest["columns"]
    names = list(shapes) if columns is None else list(columns)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise DataError(f"embeddings in {directory} have no column(s) {unknown}; they have "
                        f"{sorted(shapes)}")
    for entry in manifest["chunks"]:
        path = _check_chunk(directory, entry) if verify_each else \
            os.path.join(directory, entry["file"])
        try:
            table = pq.read_table(path, columns=names)
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"embeddings file {path} is damaged ({err})") from None
        yield {n: _from_arrow(table.column(n), *shapes[n]) for n in names}


def read_table(directory: str, columns: Sequence[str] | None = None, verify_each: bool = True,
               ) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """(arrays, meta, key) of a sealed directory, all rows in memory, verified (unless the
    caller has just verified or sealed it: `verify_each=False`)."""
    manifest = read_manifest(directory)
    parts = list(iter_chunks(directory, columns, verify_each))
    shapes = manifest["columns"]
    names = list(shapes) if columns is None else list(columns)
    arrays = {n: (np.concatenate([p[n] for p in parts]) if parts else
                  np.zeros((0, *shapes[n][1]), shapes[n][0])) for n in names}
    return arrays, manifest["meta"], manifest["embeddings_key"]

