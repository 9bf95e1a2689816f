"""Embed every galaxy of a split once; the other evaluators read the result.

    python main.py --config=configs/spender.py --mode=embed --workdir=runs/default

Writes ``workdir/embeddings/<split>.h5`` with one row per galaxy, in the split's record order:

    image_embedding, spectrum_embedding  (N, D) float32   L2-normalised head outputs
    image_features, spectrum_features    (N, F) float32   frozen tower features (baselines)
    image_inputs                         (N, h, w, 3) f16 model input images mean-pooled 4x4
    spectrum_inputs                      (N, L/8) f16     model input spectra mean-binned by 8
    targetid int64, redshift, z_hp, log_mstar float32 (NaN where unknown), has_props bool,
    index int64 (record index in the split), and any scalar extras the dataset holds
    (synthetic: artefact, log_ssfr, ...)

and attributes: ``meta`` (JSON: split, dataset, checkpoint step/directory, ...) and
``embeddings_key`` (a hash of what the rows depend on: the trained parameters, the dataset and
split, and the host preprocessing; not where the files sit, so a copied run directory or a
moved dataset reuses its file).

What the model saw comes from the run itself: the model, its parameters and the host
preprocessing (crop, transform, normalisation, grid) are the checkpoint's; the command line
chooses only which dataset and split to embed and where its files are.

Why HDF5: one self-describing file of named, typed columns that h5py, astropy
(``Table.read(path, path=...)``) and pandas (via h5py) open without this package, on any
machine, and that can be read partially (one column) when it is large. The pooled inputs feed the
"PCA of the raw inputs" k-NN baseline without re-reading the dataset.

The file is written atomically (tmp file + ``os.replace``). Re-running reuses it while its
``embeddings_key`` matches; when the checkpoint changed, the stale file is kept under
``<split>-step<old step>-<old key>.h5`` and a new one is computed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import h5py
import jax
import numpy as np
from tqdm import tqdm

from astroclip_jax import files, flat_tree
from astroclip_jax import settings as settings_lib
from astroclip_jax.data import pipeline, preprocess
from astroclip_jax.errors import DataError
from astroclip_jax.evaluation import restore
from astroclip_jax.settings import DataSettings
from astroclip_jax.training import sharding

EMBEDDINGS_DIR = "embeddings"
FORMAT_VERSION = 2
IMAGE_POOL = 4  # pooled input images for the PCA baseline: 96 px -> 24 px
SPECTRUM_BIN = 8  # binned input spectra: 7781 px -> 972 bins
_PROPERTY_COLUMNS = ("targetid", "redshift", "z_hp", "log_mstar", "has_props")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def embeddings_path(workdir, split):
    return os.path.join(workdir, EMBEDDINGS_DIR, f"{split}.h5")


def _content_digest(arrays) -> str:
    """sha256 over every column's name, dtype, shape and bytes (what `read_embeddings` checks)."""
    digest = hashlib.sha256()
    flat_tree.update_digest(digest, arrays)
    return digest.hexdigest()


def write_embeddings(path, arrays, meta, key):
    """Write ``arrays`` (name -> array) and ``meta`` to ``path`` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    with files.atomic_path(path, suffix=".h5.tmp") as tmp, h5py.File(tmp, "w") as f:
        for name, value in arrays.items():
            f.create_dataset(name, data=value)
        f.attrs["meta"] = json.dumps(meta)
        f.attrs["embeddings_key"] = key
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["content_sha256"] = _content_digest(arrays)


def read_embeddings(path):
    """(arrays, meta, key) of an embeddings file, verified against its recorded checksum.

    Raises DataError naming the file when it is truncated, not HDF5, incomplete or altered."""
    try:
        with h5py.File(path, "r") as f:
            arrays = {name: f[name][()] for name in f.keys()}
            meta = json.loads(f.attrs["meta"])
            key = str(f.attrs["embeddings_key"])
            recorded = str(f.attrs["content_sha256"])
    except (OSError, KeyError, ValueError) as err:  # h5py's errors for damaged files
        raise DataError(f"embeddings file {path} is damaged or incomplete ({err})") from None
    if _content_digest(arrays) != recorded:
        raise DataError(f"embeddings file {path} does not match its checksum (corrupted)")
    return arrays, meta, key


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


def embeddings_key(params, data: DataSettings, split: str) -> str:
    """Hash of what the rows depend on: the parameter values, the dataset, split and host
    preprocessing (`DataSettings.preprocessing_key`), and this file format."""
    digest = hashlib.sha256(json.dumps({"data": data.preprocessing_key(), "split": split,
                                        "format": FORMAT_VERSION}, sort_keys=True).encode())
    flat_tree.update_digest(digest, params)
    return digest.hexdigest()[:20]


# --------------------------------------------------------------------------------------------
# Computing
# --------------------------------------------------------------------------------------------

def data_for_run(data: DataSettings, run: settings_lib.RunSettings) -> DataSettings:
    """The dataset the command line names, preprocessed as the run's model saw its data."""
    return dataclasses.replace(data, grid=run.data.grid, image_crop=run.data.image_crop,
                               image_transform=run.data.image_transform,
                               spectrum_norm=run.data.spectrum_norm)


def _gather(x):
    """Global array -> host NumPy of all rows (all processes' shares on multi-host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _gather_host(x):
    """This process's host rows -> all processes' rows, in process order (the global batch)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))
    return np.asarray(x)


def _scalar_extras(source):
    """Names of the scalar per-galaxy fields a data source holds beyond the Batch contract."""
    features = source.dataset_info.features
    return [name for name in features.keys()
            if name not in pipeline.BATCH_FIELDS and tuple(features[name].shape) == ()]


def read_scalar_fields(source, names, n):
    """Columns ``names`` of the first ``n`` records, in their stored dtypes."""
    features = source.dataset_info.features
    out = {name: [] for name in names}
    for i in range(n):
        record = source[i]
        for name in names:
            out[name].append(record[name])
    return {name: np.asarray(values, dtype=features[name].np_dtype) for name, values in out.items()}


_DEVICE_COLUMNS = ("image_embedding", "spectrum_embedding", "image_features", "spectrum_features",
                   "untrained_image_embedding", "untrained_spectrum_embedding")


def compute_embeddings(trained: restore.TrainedModel, data: DataSettings, split: str,
                       batch_size: int):
    """(arrays, meta) for every galaxy of ``split`` of ``data`` with ``trained``'s model."""
    model = trained.model
    mesh = sharding.make_mesh()
    params = sharding.replicate(trained.params, mesh)
    # The same frozen towers with the heads as they were before training: a baseline for what
    # training added.
    untrained = sharding.replicate({**trained.params,
                                    "image_head": trained.initial_params["image_head"],
                                    "spectrum_head": trained.initial_params["spectrum_head"]},
                                   mesh)

    @jax.jit
    def embed_fn(params, untrained, images, spectra):
        image_features, spectrum_features = model.tower_features(params, images, spectra)
        return (*model.heads_from_features(params, image_features, spectrum_features),
                image_features, spectrum_features,
                *model.heads_from_features(untrained, image_features, spectrum_features))

    n_dev = mesh.devices.size
    batch_size = -(-batch_size // n_dev) * n_dev  # whole rows per device
    loader = pipeline.EvalLoader(data, split, batch_size, jax.process_index(),
                                 jax.process_count())
    n_total = len(loader.source)
    parts = {k: [] for k in (*_DEVICE_COLUMNS, "image_inputs", "spectrum_inputs",
                             *_PROPERTY_COLUMNS)}
    with tqdm(total=n_total, unit="galaxy", desc=f"embed {split}",
              disable=jax.process_index() != 0) as bar:
        for batch in loader:
            glob = sharding.shard_batch(batch, mesh, ["image", "spectrum"])
            outs = embed_fn(params, untrained, glob["image"], glob["spectrum"])
            mask = _gather_host(batch["mask"])
            for name, value in zip(_DEVICE_COLUMNS, outs):
                parts[name].append(_gather(value)[mask].astype(np.float32))
            # Host columns stay on the host (int64 target ids would not survive a 32-bit device).
            images = preprocess.center_crop(batch["image"], model.image_size)
            host = {"image_inputs": pool_images(images).astype(np.float16),
                    "spectrum_inputs": bin_spectra(batch["spectrum"]).astype(np.float16),
                    **{k: batch[k] for k in _PROPERTY_COLUMNS}}
            for name, value in host.items():
                parts[name].append(_gather_host(value)[mask])
            bar.update(int(mask.sum()))

    arrays = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    arrays["index"] = np.arange(len(arrays["targetid"]), dtype=np.int64)
    extras = _scalar_extras(loader.source)
    if extras:
        arrays.update(read_scalar_fields(loader.source, extras, len(arrays["targetid"])))
    run = trained.settings
    meta = {
        "split": split, "n": int(len(arrays["targetid"])),
        "dataset": f"{data.name}/{data.builder_config}",
        "synthetic": data.is_synthetic,
        "checkpoint": {"step": trained.step, "directory": trained.checkpoint_dir},
        "image_transform": data.image_transform, "grid": data.grid,
        "image_size": model.image_size, "image_pool": IMAGE_POOL, "spectrum_bin": SPECTRUM_BIN,
        "n_devices": int(n_dev),
        "towers": {"image": dataclasses.asdict(run.model.image_tower),
                   "spectrum": dataclasses.asdict(run.model.spectrum_tower)},
    }
    return arrays, meta


def load_or_compute_embeddings(settings: settings_lib.RunSettings, workdir: str):
    """(arrays, meta, data) of ``workdir/embeddings/<eval.split>.h5``, computed first if missing
    or stale, with the ``eval.checkpoint`` checkpoint; ``data`` is the dataset as embedded.

    Raises MissingInput (saying what to run) when the work directory has no checkpoint.
    """
    split = settings.eval.split
    trained = restore.restore_trained_model(workdir, settings.eval.checkpoint)
    data = data_for_run(settings.data, trained.settings)
    path = embeddings_path(workdir, split)
    key = embeddings_key(trained.params, data, split)
    if os.path.exists(path):
        try:
            arrays, meta, old_key = read_embeddings(path)
        except DataError as err:  # set the damaged file aside (never delete it), recompute
            aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
            if jax.process_index() == 0:
                os.replace(path, aside)
            print(f"embed: {err}; set it aside as {aside} and recomputing")
        else:
            if old_key == key:
                return arrays, meta, data
            # Made by another checkpoint: keep the old file under its step and key.
            step = meta.get("checkpoint", {}).get("step", "unknown")
            old = os.path.join(os.path.dirname(path), f"{split}-step{step}-{old_key[:8]}.h5")
            if jax.process_index() == 0:
                os.replace(path, old)
            print(f"embed: {path} was made with another checkpoint; kept it as {old}")
    arrays, meta = compute_embeddings(trained, data, split, settings.eval.batch_size)
    if jax.process_index() == 0:
        write_embeddings(path, arrays, meta, key)
        print(f"embed: wrote {meta['n']} galaxies to {path}")
    return arrays, meta, data


def read_examples(data: DataSettings, split: str, rows, image_size: int):
    """Display images and model-input spectra of records ``rows``, for figures.

    Returns ``{"image": (n, S, S, 3) RGB in [0, 1], "spectrum": (n, L), "wave": (L,)}``: the
    cutouts cropped as the towers saw them, in Stein's RGB (the project's display, whatever the
    model transform), and the normalised spectra the spectrum tower saw, on their grid.
    """
    from astroclip_jax import wavelength_grids
    from astroclip_jax.evaluation import plots

    raw = pipeline.read_records(pipeline.data_source(data, split), rows, ("image", "spectrum"))
    images = raw["image"]
    if data.image_crop:  # the host crop, then the model's own (as the towers saw them)
        images = preprocess.center_crop(images, data.image_crop)
    images = plots.display_rgb(preprocess.center_crop(images, image_size))
    spectra, _ = preprocess.preprocess_spectra(raw["spectrum"], data)
    return {"image": images, "spectrum": spectra, "wave": wavelength_grids.wave(data.grid)}


def run(config, workdir):
    """``--mode=embed``: write (or confirm up to date) ``workdir/embeddings/<split>.h5``."""
    from astroclip_jax.evaluation import runner  # the runner builds on this module

    settings = settings_lib.resolve(config)
    with runner.evaluation_directory(workdir, "embed"):
        arrays, meta, _ = load_or_compute_embeddings(settings, workdir)
    path = embeddings_path(workdir, meta["split"])
    print(f"embed: {path}: {meta['n']} galaxies, embedding dim "
          f"{arrays['image_embedding'].shape[1]}, checkpoint step {meta['checkpoint']['step']}, "
          f"{int(np.sum(arrays['has_props']))} with properties")
    return path
