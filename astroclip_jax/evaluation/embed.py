"""Embed every galaxy of a split, or of a one-modality survey, once, streamed to disk in chunks;
the other evaluators read the result.

    python main.py --config=configs/spender.py --mode=embed --workdir=runs/default
    python main.py --config=configs/spender.py --mode=embed --workdir=runs/default \\
        --config.eval.survey_file=/data/legacysurvey/south/ --config.eval.embed_inputs=False

Writes ``workdir/embeddings/<name>/`` (``<name>``: the split, or ``survey-<file name>-<hash>``,
the hash of the survey's resolved path and its files' names, sizes and times), a
table of Parquet chunks plus a manifest (`embedding_files`), one row per galaxy in record
order:

    image_embedding, spectrum_embedding  (N, D) float32   L2-normalised head outputs
    image_features, spectrum_features    (N, F) float32   frozen tower features (baselines)
    untrained_image_embedding, ...       (N, D) float32   the heads before training (baseline)
    image_inputs                         (N, h, w, 3) f16 model input images mean-pooled 4x4
    spectrum_inputs                      (N, L/8) f16     model input spectra mean-binned by 8
    targetid int64, index int64 (the row in the split or survey), and the catalogue:
    split: redshift, z_hp, log_mstar float32 (NaN where unknown), has_props bool and any
    scalar extras the dataset holds (synthetic: artefact, log_ssfr, ...); survey: its columns
    (ra, dec, z_phot_median, ...)

A survey of images alone has the image columns only, one of spectra the spectrum columns.
Survey rows follow the dataset's policies: repeated or invalid targetids ``data.duplicate_policy``,
non-finite flux ``data.nan_policy`` ("raise": one line naming the file and row; "drop"/"mask":
the rows are left out, counted in the table's ``meta["dropped"]``); a survey without rows, or
with cutouts smaller than the run's crop, is one line before anything is written.
The pooled inputs (``eval.embed_inputs``; 3.5 KB a galaxy, the k-NN evaluator's PCA baseline)
are for evaluation-sized splits; leave them off for surveys.

Streaming: rows are cut into chunks of ``eval.embed_chunk_rows``; each chunk is embedded batch
by batch (the next batch read on a thread while the devices compute) and written as one file
the moment it is complete, so memory is one chunk's outputs plus a batch's inputs whatever N is.
With several processes (`astroclip_jax.launch`, or a cluster's launcher) process p of P embeds
chunks p, p + P, ... on its own devices (no cross-process traffic: each process runs at its own
pace), the processes meet once at the end, and process 0 writes the manifest. A killed embed
rerun with the same checkpoint keeps every chunk written with the same key that still matches
the checksum recorded when it was written, and computes only the rest (a chunk damaged since is
said in one line and computed again), so the result equals an uninterrupted run's.

Keyed by content as before: ``embeddings_key`` hashes the trained parameters, the dataset and
split (or the survey files' names, sizes and times), the host preprocessing and the options
(inputs or not). A finished table with the same key is reused; one made with another checkpoint
is kept as ``<name>-step<old step>-<old key>``; a damaged one (a chunk that does not match its
checksum) is set aside and recomputed.

What the model saw comes from the run itself: the model, its parameters and the host
preprocessing (crop, transform, normalisation, grid) are the checkpoint's; the command line
chooses only which dataset and split (or survey file) to embed and where its files are.
"""

from __future__ import annotations

import contextlib

import jax

from astroclip_jax import processes
from astroclip_jax import settings as settings_lib
from astroclip_jax.evaluation import runner
# The table's API, for the modes, tests and notebooks that use `embed.<name>`; the code lives
# in embed_rows (what is embedded), embed_stream (computing it) and embeddings (reuse).
from astroclip_jax.evaluation.embed_rows import (
    RowsToEmbed, read_examples, rows_for, split_rows, survey_rows, survey_table_name)
from astroclip_jax.evaluation.embed_stream import (
    IMAGE_POOL, SPECTRUM_BIN, bin_spectra, embed_to_directory, pool_images)
from astroclip_jax.evaluation.embeddings import (
    EMBEDDINGS_DIR, FORMAT_VERSION, data_for_run, embedding_manifest, embeddings_key,
    embeddings_path, ensure_embeddings, iter_embedding_chunks, load_or_compute_embeddings,
    read_embeddings, write_embeddings)

__all__ = [
    "RowsToEmbed", "read_examples", "rows_for", "split_rows", "survey_rows", "survey_table_name",
    "IMAGE_POOL", "SPECTRUM_BIN", "bin_spectra", "embed_to_directory", "pool_images",
    "EMBEDDINGS_DIR", "FORMAT_VERSION", "data_for_run", "embedding_manifest", "embeddings_key",
    "embeddings_path", "ensure_embeddings", "iter_embedding_chunks", "load_or_compute_embeddings",
    "read_embeddings", "write_embeddings", "run"]


def run(settings: settings_lib.RunSettings, workdir: str):
    """``--mode=embed``: write (or confirm up to date) ``workdir/embeddings/<name>/``.

    Under several processes each embeds its share (module docstring); the first holds the
    work directory's evaluation lock for all."""
    processes.initialize(settings.multihost)
    lock = (runner.evaluation_directory(workdir, "embed") if jax.process_index() == 0
            else contextlib.nullcontext())
    with lock:
        directory, manifest, _ = ensure_embeddings(settings, workdir)
    if jax.process_index() == 0:
        columns = manifest["columns"]
        dims = ", ".join(f"{k} {v[1][0]}" for k, v in columns.items() if k.endswith("_embedding")
                         and not k.startswith("untrained"))
        print(f"embed: {directory}: {manifest['n']} galaxies ({dims}), checkpoint step "
              f"{manifest['meta']['checkpoint']['step']}")
    return directory
