"""The run's embeddings table: where it lives, what it is keyed by, and reusing it or computing
it (`embed_stream`) once for every evaluator.

Keyed by content: ``embeddings_key`` hashes the trained parameters, the dataset and split (or
the survey files' names, sizes and times and the data policies), the host preprocessing and the
options (inputs or not). A finished table with the same key is reused; one made with another
checkpoint is kept as ``<name>-step<old step>-<old key>``; a damaged one (a chunk that does not
match its checksum) is set aside and recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from astroclip_jax import flat_tree, processes
from astroclip_jax import settings as settings_lib
from astroclip_jax.errors import DataError
from astroclip_jax.evaluation import embedding_files, restore
from astroclip_jax.evaluation.embed_rows import rows_for
from astroclip_jax.evaluation.embed_stream import embed_to_directory
from astroclip_jax.settings import DataSettings

EMBEDDINGS_DIR = "embeddings"
FORMAT_VERSION = embedding_files.FORMAT_VERSION


def embeddings_path(workdir: str, name: str) -> str:
    """The table directory of split (or survey) `name`."""
    return os.path.join(workdir, EMBEDDINGS_DIR, name)


def write_embeddings(path: str, arrays, meta, key: str, chunk_rows: int | None = None) -> None:
    """Write in-memory ``arrays`` (name -> per-row array) and ``meta`` as a sealed table."""
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    n = len(next(iter(arrays.values())))
    rows = chunk_rows or max(n, 1)
    chunks = list(range(max(1, -(-n // rows))))
    for c in chunks:
        embedding_files.write_chunk(path, c, {k: v[c * rows:(c + 1) * rows]
                                              for k, v in arrays.items()},
                                    {"embeddings_key": key, "start": c * rows})
    embedding_files.write_manifest(path, key, meta, chunks)


def read_embeddings(path: str, verify: bool = True):
    """(arrays, meta, key) of a table, all rows in memory, every chunk verified against its
    checksum (DataError naming the file otherwise) unless `verify=False`."""
    return embedding_files.read_table(path, verify_each=verify)


def iter_embedding_chunks(path: str, columns: Sequence[str] | None = None
                          ) -> Iterator[dict[str, np.ndarray]]:
    """The table chunk by chunk ({column: array}, rows in order), for survey-scale readers
    (an index builder): memory is one chunk. `embedding_manifest(path)` has n and meta."""
    return embedding_files.iter_chunks(path, columns)


def embedding_manifest(path: str) -> dict[str, Any]:
    """The table's manifest: ``n``, ``meta``, ``embeddings_key``, ``columns``, ``chunks``."""
    return embedding_files.read_manifest(path)


def embeddings_key(params, data: DataSettings, split, options: dict | None = None) -> str:
    """Hash of what the rows depend on: the parameter values, the dataset, split (or survey
    identity) and host preprocessing (`DataSettings.preprocessing_key`), the options (which
    columns), and this format."""
    what = {"data": data.preprocessing_key(), "split": split, "format": FORMAT_VERSION}
    if options:
        what["options"] = options
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    flat_tree.update_digest(digest, params)
    return digest.hexdigest()[:20]


def data_for_run(data: DataSettings, run: settings_lib.RunSettings) -> DataSettings:
    """The dataset the command line names, preprocessed as the run's model saw its data."""
    return dataclasses.replace(data, grid=run.data.grid, image_crop=run.data.image_crop,
                               image_transform=run.data.image_transform,
                               spectrum_norm=run.data.spectrum_norm)


def _reusable(directory: str, key: str, log) -> bool:
    """Whether a finished table with `key` is there. A stale one (another checkpoint) is kept
    as ``<name>-step<N>-<key8>``, a damaged one set aside; every process looks, then process 0
    moves, so no process reads a table while it is being moved."""
    move_to = None
    if os.path.exists(os.path.join(directory, embedding_files.MANIFEST)):
        try:
            manifest = embedding_files.verify(directory)
        except DataError as err:  # set the damaged table aside (never delete it), recompute
            move_to = f"{directory}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
            log(f"embed: {err}; set it aside as {move_to} and recomputing")
        else:
            if manifest["embeddings_key"] == key:
                return True
            step = manifest["meta"].get("checkpoint", {}).get("step", "unknown")
            move_to = f"{directory}-step{step}-{manifest['embeddings_key'][:8]}"
            log(f"embed: {directory} was made with another checkpoint; kept it as {move_to}")
    # (no manifest: nothing yet, or an unfinished embed, resumed chunk by chunk)
    processes.barrier("embeddings checked")
    if move_to is not None and jax.process_index() == 0:
        os.replace(directory, move_to)
    return False


def ensure_embeddings(settings: settings_lib.RunSettings, workdir: str,
                      log: Callable[[str], None] = print):
    """(directory, manifest, data): the table of ``eval.split`` (or ``eval.survey_file``)
    embedded with the ``eval.checkpoint`` checkpoint, computed (or finished) first if needed;
    ``data`` is the dataset as embedded. Nothing is loaded into memory.

    Raises MissingInput (saying what to run) when the work directory has no checkpoint."""
    trained = restore.run_model(settings, workdir)
    data = data_for_run(settings.data, trained.settings)
    rows = rows_for(settings, data, trained)
    directory = embeddings_path(workdir, rows.name)
    key = embeddings_key(trained.params, data, rows.identity,
                         {"inputs": settings.eval.embed_inputs})
    if _reusable(directory, key, log):
        return directory, embedding_files.read_manifest(directory), data
    repeated = rows.meta.get("dropped", {}).get("duplicate_policy")
    if repeated:
        log(f"embed: {rows.meta['survey']}: leaving out {repeated} row(s) whose targetid "
            "repeats or is not a non-negative integer (data.duplicate_policy='drop')")
    manifest = embed_to_directory(trained, rows, directory, key, settings.eval.batch_size,
                                  settings.eval.embed_chunk_rows, settings.eval.embed_inputs,
                                  log)
    log(f"embed: wrote {manifest['n']} galaxies in {len(manifest['chunks'])} chunks to "
        f"{directory}")
    return directory, manifest, data


def load_or_compute_embeddings(settings: settings_lib.RunSettings, workdir: str):
    """(arrays, meta, data) of the embeddings table (`ensure_embeddings`), all rows in memory
    (the evaluators' input at evaluation scale; survey-scale readers use
    `iter_embedding_chunks` on `ensure_embeddings`' directory)."""
    directory, _, data = ensure_embeddings(settings, workdir)
    # ensure_embeddings has just verified every chunk (a reused table) or sealed the table
    # from the files it wrote: hashing each chunk again would only double the reading.
    arrays, meta, _ = read_embeddings(directory, verify=False)
    return arrays, meta, data
