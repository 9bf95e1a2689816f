"""Embed every galaxy of a split, or of a one-modality survey, once, streamed to disk in chunks;
the other evaluators read the result.

    python main.py --config=configs/spender.py --mode=embed --workdir=runs/default
    python main.py --config=configs/spender.py --mode=embed --workdir=runs/default \\
        --config.eval.survey_file=/data/legacysurvey/south/ --config.eval.embed_inputs=False

Writes ``workdir/embeddings/<name>/`` (``<name>``: the split, or ``survey-<file name>``), a
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
The pooled inputs (``eval.embed_inputs``; 3.5 KB a galaxy, the k-NN evaluator's PCA baseline)
are for evaluation-sized splits; leave them off for surveys.

Streaming: rows are cut into chunks of ``eval.embed_chunk_rows``; each chunk is embedded batch
by batch (the next batch read on a thread while the devices compute) and written as one file
the moment it is complete, so memory is one chunk's outputs plus a batch's inputs whatever N is.
With several processes (`astroclip_jax.launch`, or a cluster's launcher) process p of P embeds
chunks p, p + P, ... on its own devices (no cross-process traffic: each process runs at its own
pace), the processes meet once at the end, and process 0 writes the manifest. A killed embed
rerun with the same checkpoint keeps every chunk written with the same key and computes only
the rest, so the result equals an uninterrupted run's.

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

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from tqdm import tqdm

from astroclip_jax import files, flat_tree, processes
from astroclip_jax import settings as settings_lib
from astroclip_jax import wavelength_grids
from astroclip_jax.data import pipeline, preprocess
from astroclip_jax.data.survey_files import SurveyFiles
from astroclip_jax.errors import DataError
from astroclip_jax.evaluation import embedding_files, restore
from astroclip_jax.settings import DataSettings
from astroclip_jax.training import sharding

EMBEDDINGS_DIR = "embeddings"
FORMAT_VERSION = embedding_files.FORMAT_VERSION
IMAGE_POOL = 4  # pooled input images for the PCA baseline: 96 px -> 24 px
SPECTRUM_BIN = 8  # binned input spectra: 7781 px -> 972 bins
_PROPERTY_COLUMNS = ("targetid", "redshift", "z_hp", "log_mstar", "has_props")


# --------------------------------------------------------------------------------------------
# Files (the table format lives in embedding_files)
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------

def pool_images(images, factor=IMAGE_POOL):
    """(N, H, W, C) -> (N, H//f, W//f, C) block means (edge pixels beyond a full block dropped)."""
    n, h, w, c = images.shape
    h2, w2 = h // factor, w // factor
    x = np.asarray(images[:, :h2 * factor, :w2 * factor], np.float32)
    return x.reshape(n, h2, factor, w2, factor, c).mean(axis=(2, 4))


def bin_spectra(spectra, factor=SPECTRUM_BIN):
    """(N, L) -> (N, L//f) bin means (the last L % f pixels dropped)."""
    n, length = spectra.shape
    m = length // factor
    return np.asarray(spectra[:, :m * factor], np.float32).reshape(n, m, factor).mean(axis=2)


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


# --------------------------------------------------------------------------------------------
# What to embed: rows of a split, or of a survey
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rows:
    """Rows to embed. `read(start, stop)` gives the preprocessed model inputs (`image` and/or
    `spectrum`) and the per-row columns to carry (targetid, index, catalogue); `identity` is
    what the key hashes besides the parameters and the preprocessing."""

    name: str
    n: int
    modalities: tuple[str, ...]
    read: Callable[[int, int], dict[str, np.ndarray]]
    identity: Any
    meta: dict[str, Any]


def _scalar_extras(source):
    """Names of the scalar per-galaxy fields a data source holds beyond the Batch contract."""
    features = source.dataset_info.features
    return [name for name in features.keys()
            if name not in pipeline.BATCH_FIELDS and tuple(features[name].shape) == ()]


def split_rows(data: DataSettings, split: str) -> Rows:
    """The records of `split` of the (paired) dataset, preprocessed as `data` says."""
    source = pipeline.data_source(data, split)
    extras = _scalar_extras(source)
    dtypes = {name: source.dataset_info.features[name].np_dtype for name in extras}
    if len(source) == 0:
        raise DataError(f"split {split!r} of {data.name}/{data.builder_config} is empty")

    def read(start: int, stop: int) -> dict[str, np.ndarray]:
        # Only the fields written out are decoded (not e.g. the synthetic ivar).
        raw = pipeline.read_records(source, range(start, stop), (*pipeline.BATCH_FIELDS, *extras))
        out = preprocess.preprocess_batch({k: raw[k] for k in pipeline.BATCH_FIELDS}, data)
        out = {k: out[k] for k in ("image", "spectrum", *_PROPERTY_COLUMNS)}
        out.update({k: raw[k].astype(dtypes[k], copy=False) for k in extras})
        out["index"] = np.arange(start, stop, dtype=np.int64)
        return out

    return Rows(name=split, n=len(source), modalities=("image", "spectrum"), read=read,
                identity=split, meta={"split": split,
                                      "dataset": f"{data.name}/{data.builder_config}",
                                      "synthetic": data.is_synthetic})


def survey_rows(data: DataSettings, path: str, spectrum_length: int) -> Rows:
    """The rows of an image-only or spectrum-only survey (`data.survey_files`)."""
    survey = SurveyFiles(path)
    if survey.modality == "spectrum":
        if survey.row_shape != (spectrum_length,):
            raise DataError(f"survey {path}: spectra have {survey.row_shape[0]} pixels, the "
                            f"run's spectrum tower reads {spectrum_length} ({data.grid} grid)")
        if survey.wave() is not None:
            preprocess.check_grid(survey.wave(), wavelength_grids.wave(data.grid))

    def read(start: int, stop: int) -> dict[str, np.ndarray]:
        out = survey.read(start, stop)
        if survey.modality == "image":
            out["image"] = preprocess.preprocess_images(out["image"], data)
        else:
            out["spectrum"], _ = preprocess.preprocess_spectra(out["spectrum"], data)
        return out

    name = "survey-" + os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    return Rows(name=name, n=survey.n, modalities=(survey.modality,), read=read,
                identity={"survey": survey.stamp},
                meta={"split": name, "survey": os.path.abspath(path), "files": len(survey.files),
                      "modality": survey.modality, "synthetic": False})


def rows_for(settings: settings_lib.RunSettings, data: DataSettings,
             trained: restore.TrainedModel) -> Rows:
    if settings.eval.survey_file:
        return survey_rows(data, settings.eval.survey_file,
                           trained.settings.model.spectrum_length)
    return split_rows(data, settings.eval.split)


# --------------------------------------------------------------------------------------------
# Computing, chunk by chunk
# --------------------------------------------------------------------------------------------

def _embed_fn(model, modalities: tuple[str, ...]):
    """jit(params, untrained, inputs) -> {column: device array} for the modalities there."""

    def fn(params, untrained, inputs):
        out = {}
        for kind in modalities:
            features = (model.image_features(params, inputs["image"]) if kind == "image"
                        else model.spectrum_features(params, inputs["spectrum"]))
            head = model.image_embedding if kind == "image" else model.spectrum_embedding
            out[f"{kind}_embedding"] = head(params, features)
            out[f"{kind}_features"] = features
            out[f"untrained_{kind}_embedding"] = head(untrained, features)
        return out

    return jax.jit(fn)


def _host_inputs(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """The pooled model inputs of a batch (float16), for the PCA baseline."""
    out = {}
    if "image" in batch:
        images = preprocess.center_crop(batch["image"], image_size)
        out["image_inputs"] = pool_images(images).astype(np.float16)
    if "spectrum" in batch:
        out["spectrum_inputs"] = bin_spectra(batch["spectrum"]).astype(np.float16)
    return out


class _ChunkEmbedder:
    """Embeds row ranges on this process's devices: a batch per call, padded to one shape."""

    def __init__(self, trained: restore.TrainedModel, rows: Rows, batch_size: int,
                 inputs: bool):
        self.mesh = sharding.make_mesh(jax.local_devices())
        n_dev = self.mesh.devices.size
        self.batch_size = -(-batch_size // n_dev) * n_dev  # whole rows per device
        self.params = sharding.replicate(trained.params, self.mesh)
        # The same frozen towers with the heads as they were before training: a baseline for
        # what training added.
        self.untrained = sharding.replicate(
            {**trained.params, "image_head": trained.initial_params["image_head"],
             "spectrum_head": trained.initial_params["spectrum_head"]}, self.mesh)
        self.fn = _embed_fn(trained.model, rows.modalities)
        self.rows, self.inputs, self.image_size = rows, inputs, trained.model.image_size

    def batches(self, start: int, stop: int) -> Iterator[tuple[int, dict]]:
        """(rows, host batch) of [start, stop), each read on a thread while the previous one
        is being embedded."""
        bounds = [(s, min(s + self.batch_size, stop)) for s in range(start, stop,
                                                                     self.batch_size)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.rows.read, *bounds[0]) if bounds else None
            for i, (s, e) in enumerate(bounds):
                batch = pending.result()
                pending = pool.submit(self.rows.read, *bounds[i + 1]) if i + 1 < len(bounds) \
                    else None
                yield e - s, batch

    def chunk(self, start: int, stop: int, bar) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        for count, batch in self.batches(start, stop):
            model_inputs = {k: sharding.shard_batch({k: pipeline.pad_rows(batch[k], self.batch_size)},
                                                    self.mesh)[k]
                            for k in self.rows.modalities}
            out = {k: np.asarray(v)[:count].astype(np.float32)
                   for k, v in self.fn(self.params, self.untrained, model_inputs).items()}
            if self.inputs:
                out.update(_host_inputs(batch, self.image_size))
            # Host columns stay on the host (int64 target ids would not survive a 32-bit device).
            out.update({k: v for k, v in batch.items() if k not in ("image", "spectrum",
                                                                       "spectrum_scale")})
            for name, value in out.items():
                parts.setdefault(name, []).append(value)
            bar.update(count)
        return {name: np.concatenate(values) for name, values in parts.items()}


def _my_chunks(n: int, chunk_rows: int) -> list[int]:
    chunks = range(-(-n // chunk_rows))
    return [c for c in chunks if c % jax.process_count() == jax.process_index()]


def _done(directory: str, chunk: int, key: str, start: int, rows: int) -> bool:
    """Whether a whole chunk with these rows, made with this key, is already on disk."""
    meta = embedding_files.chunk_meta(embedding_files.chunk_path(directory, chunk))
    return (meta is not None and meta.get("embeddings_key") == key and meta.get("start") == start
            and meta.get("rows") == rows)


def embed_to_directory(trained: restore.TrainedModel, rows: Rows, directory: str, key: str,
                       batch_size: int, chunk_rows: int, inputs: bool,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Embed `rows` into the table `directory` (resuming at the chunks already there with
    `key`), every process its share of the chunks; process 0 seals it. The manifest."""
    n_chunks = -(-rows.n // chunk_rows)
    first = jax.process_index() == 0
    if first:
        os.makedirs(directory, exist_ok=True)
        for path in files.remove_leftovers(directory):
            log(f"embed: removed {path}, left by an interrupted embed")
    processes.barrier("embeddings directory ready")
    mine = _my_chunks(rows.n, chunk_rows)
    todo = [c for c in mine if not _done(directory, c, key, c * chunk_rows,
                                         min(chunk_rows, rows.n - c * chunk_rows))]
    if len(todo) < len(mine):
        log(f"embed: {len(mine) - len(todo)} of this process's {len(mine)} chunks in "
            f"{directory} are done; computing the other {len(todo)}")
    if todo:
        embedder = _ChunkEmbedder(trained, rows, batch_size, inputs)
        total = sum(min(chunk_rows, rows.n - c * chunk_rows) for c in todo)
        with tqdm(total=total, unit="galaxy", desc=f"embed {rows.name}",
                  disable=not first) as bar:
            for c in todo:
                start, stop = c * chunk_rows, min((c + 1) * chunk_rows, rows.n)
                columns = embedder.chunk(start, stop, bar)
                embedding_files.write_chunk(directory, c, columns, {
                    "embeddings_key": key, "start": start, "rows": stop - start,
                    "process": jax.process_index()})
    processes.barrier("embedding chunks written")
    meta = {**rows.meta, "n": rows.n, "checkpoint": {"step": trained.step,
                                                     "directory": trained.checkpoint_dir},
            "image_transform": trained.settings.data.image_transform,
            "grid": trained.settings.data.grid, "image_size": trained.model.image_size,
            "image_pool": IMAGE_POOL, "spectrum_bin": SPECTRUM_BIN,
            "inputs": inputs, "chunk_rows": chunk_rows, "processes": jax.process_count(),
            "towers": {"image": dataclasses.asdict(trained.settings.model.image_tower),
                       "spectrum": dataclasses.asdict(trained.settings.model.spectrum_tower)}}
    manifest = None
    if first:
        for c, path in embedding_files.existing_chunks(directory).items():
            if c >= n_chunks:  # of an earlier embed with other chunk sizes
                os.remove(path)
        manifest = embedding_files.write_manifest(directory, key, meta, range(n_chunks))
    processes.barrier("embeddings sealed")
    return manifest or embedding_files.read_manifest(directory)


# --------------------------------------------------------------------------------------------
# Reuse, or compute
# --------------------------------------------------------------------------------------------

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
    trained = restore.restore_trained_model(workdir, settings.eval.checkpoint)
    data = data_for_run(settings.data, trained.settings)
    rows = rows_for(settings, data, trained)
    directory = embeddings_path(workdir, rows.name)
    key = embeddings_key(trained.params, data, rows.identity,
                         {"inputs": settings.eval.embed_inputs})
    if _reusable(directory, key, log):
        return directory, embedding_files.read_manifest(directory), data
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


def read_examples(data: DataSettings, split: str, rows, image_size: int):
    """Display images and model-input spectra of records ``rows``, for figures.

    Returns ``{"image": (n, S, S, 3) RGB in [0, 1], "spectrum": (n, L), "wave": (L,)}``: the
    cutouts cropped as the towers saw them, in Stein's RGB (the project's display, whatever the
    model transform), and the normalised spectra the spectrum tower saw, on their grid.
    """
    from astroclip_jax.evaluation import plots

    raw = pipeline.read_records(pipeline.data_source(data, split), rows, ("image", "spectrum"))
    images = plots.display_cutouts(raw["image"], data.image_crop, image_size)
    spectra, _ = preprocess.preprocess_spectra(raw["spectrum"], data)
    return {"image": images, "spectrum": spectra, "wave": wavelength_grids.wave(data.grid)}


def run(settings: settings_lib.RunSettings, workdir: str):
    """``--mode=embed``: write (or confirm up to date) ``workdir/embeddings/<name>/``.

    Under several processes each embeds its share (module docstring); the first holds the
    work directory's evaluation lock for all."""
    from astroclip_jax.evaluation import runner  # the runner builds on this module

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
