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
``checkpoint_key`` (a hash of the checkpoint and the data settings the embeddings depend on).

Why HDF5: one self-describing file of named, typed columns that h5py, astropy
(``Table.read(path, path=...)``) and pandas (via h5py) open without this package, on any
machine, and that can be read partially (one column) when it is large. The pooled inputs feed the
"PCA of the raw inputs" k-NN baseline without re-reading the dataset.

The file is written atomically (tmp file + ``os.replace``). Re-running reuses it while its
``checkpoint_key`` matches; when the checkpoint changed, the stale file is kept under
``<split>-step<old step>.h5`` and a new one is computed.
"""

from __future__ import annotations

import hashlib
import json
import os

import h5py
import numpy as np

from astroclip_jax import io_utils

EMBEDDINGS_DIR = "embeddings"
FORMAT_VERSION = 1
IMAGE_POOL = 4  # pooled input images for the PCA baseline: 96 px -> 24 px
SPECTRUM_BIN = 8  # binned input spectra: 7781 px -> 972 bins
_PROPERTY_COLUMNS = ("targetid", "redshift", "z_hp", "log_mstar", "has_props")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def embeddings_path(workdir, split):
    return os.path.join(workdir, EMBEDDINGS_DIR, f"{split}.h5")


def write_embeddings(path, arrays, meta, key):
    """Write ``arrays`` (name -> array) and ``meta`` to ``path`` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with io_utils.atomic_path(path, suffix=".h5.tmp") as tmp, h5py.File(tmp, "w") as f:
        for name, value in arrays.items():
            f.create_dataset(name, data=np.asarray(value))
        f.attrs["meta"] = json.dumps(meta)
        f.attrs["checkpoint_key"] = key
        f.attrs["format_version"] = FORMAT_VERSION


def read_embeddings(path):
    """(arrays, meta, key) of an embeddings file."""
    with h5py.File(path, "r") as f:
        arrays = {name: f[name][()] for name in f.keys()}
        meta = json.loads(f.attrs["meta"])
        key = str(f.attrs.get("checkpoint_key", ""))
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


def checkpoint_key(checkpoint_dir, step, data_config):
    """Hash of what the embeddings depend on: the checkpoint and the host preprocessing."""
    fields = {k: data_config.get(k) for k in ("name", "builder_config", "data_dir", "grid",
                                             "image_crop", "image_transform", "spectrum_norm")}
    text = json.dumps({"checkpoint": os.path.abspath(checkpoint_dir), "step": int(step),
                       "data": fields, "format": FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def is_synthetic(data_config):
    return str(data_config.get("name", "")).startswith("synthetic")


# --------------------------------------------------------------------------------------------
# Computing
# --------------------------------------------------------------------------------------------

def resolve_checkpoint(workdir, which):
    """(checkpoint directory, step) of ``which`` in ``workdir``, with a clear error if none."""
    from astroclip_jax import checkpoint as ckpt_lib

    try:
        ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}; train first: python main.py --config=... --mode=train --workdir={workdir}"
        ) from None
    try:
        step = ckpt.step_for(which)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {which!r} checkpoint in {ckpt.directory}; train first "
            f"(--mode=train --workdir={workdir})") from None
    finally:
        ckpt.close()
    return ckpt.directory, step


def make_embed_fn(model, config):
    """Jitted (params, images, spectra) -> (image_emb, spectrum_emb, image_feat, spectrum_feat)."""
    import jax

    from astroclip_jax import model as model_lib
    from astroclip_jax import train_step

    size = model_lib.image_size(config)

    @jax.jit
    def embed_fn(params, images, spectra):
        # Same deterministic crop as the validation step, then towers, then heads.
        img_f, spec_f = model.tower_features(params, train_step.center_crop(images, size), spectra)
        img_e, spec_e = model.heads_from_features(params, img_f, spec_f)
        return img_e, spec_e, img_f, spec_f

    return embed_fn


def _gather(x):
    """Global array -> host NumPy of all rows (all processes' shares on multi-host)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _gather_host(x):
    """This process's host rows -> all processes' rows, in process order (the global batch)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))
    return np.asarray(x)


def _scalar_extras(source):
    """Names of the scalar per-galaxy fields a data source holds beyond the Batch contract."""
    from astroclip_jax.data import pipeline

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


def compute_embeddings(config, workdir, split, which):
    """(arrays, meta) for every galaxy of ``split`` with the ``which`` checkpoint of ``workdir``."""
    import jax
    from tqdm import tqdm

    from astroclip_jax import checkpoint as ckpt_lib
    from astroclip_jax import sharding
    from astroclip_jax.data import pipeline

    ckpt_dir, step = resolve_checkpoint(workdir, which)
    # `init_params`: the run's own initialisation, rebuilt from its seed. The same frozen towers
    # with the heads as they were before training are a baseline for what training added.
    run_config, model, params, init_params = ckpt_lib.restore_model_and_init(workdir, str(step))
    mesh = sharding.make_mesh()
    params = sharding.replicate(params, mesh)
    embed_fn = make_embed_fn(model, run_config)
    untrained = sharding.replicate({**params, "image_head": init_params["image_head"],
                                    "spectrum_head": init_params["spectrum_head"]}, mesh)
    heads_fn = jax.jit(model.heads_from_features)

    batch_size = int(config.eval.batch_size)
    n_dev = mesh.devices.size
    batch_size = -(-batch_size // n_dev) * n_dev  # whole rows per device
    loader = pipeline.eval_loader(config.data, split, batch_size, jax.process_index(),
                                  jax.process_count())
    source = pipeline.data_source(config.data, split)
    n_total = len(source)

    parts = {k: [] for k in ("image_embedding", "spectrum_embedding", "image_features",
                             "spectrum_features", "untrained_image_embedding",
                             "untrained_spectrum_embedding", "image_inputs", "spectrum_inputs",
                             *_PROPERTY_COLUMNS)}
    with tqdm(total=n_total, unit="galaxy", desc=f"embed {split}",
              disable=jax.process_index() != 0) as bar:
        for batch in loader:
            glob = sharding.shard_batch(batch, mesh, ["image", "spectrum"])
            outs = embed_fn(params, glob["image"], glob["spectrum"])
            outs = (*outs, *heads_fn(untrained, outs[2], outs[3]))
            mask = _gather_host(batch["mask"])
            for name, value in zip(("image_embedding", "spectrum_embedding", "image_features",
                                    "spectrum_features", "untrained_image_embedding",
                                    "untrained_spectrum_embedding"), outs):
                parts[name].append(_gather(value)[mask].astype(np.float32))
            # Host columns stay on the host (int64 target ids would not survive a 32-bit device).
            host = {"image_inputs": pool_images(batch["image"]).astype(np.float16),
                    "spectrum_inputs": bin_spectra(batch["spectrum"]).astype(np.float16),
                    **{k: batch[k] for k in _PROPERTY_COLUMNS}}
            for name, value in host.items():
                parts[name].append(_gather_host(value)[mask])
            bar.update(int(mask.sum()))

    arrays = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    arrays["index"] = np.arange(len(arrays["targetid"]), dtype=np.int64)
    extras = _scalar_extras(source)
    if extras:
        arrays.update(read_scalar_fields(source, extras, len(arrays["targetid"])))
    meta = {
        "split": split, "n": int(len(arrays["targetid"])),
        "dataset": f"{config.data.name}/{config.data.builder_config}",
        "synthetic": is_synthetic(config.data),
        "checkpoint": {"which": which, "step": int(step), "directory": ckpt_dir},
        "image_transform": config.data.get("image_transform"),
        "grid": config.data.get("grid", "desi"),
        "image_pool": IMAGE_POOL, "spectrum_bin": SPECTRUM_BIN,
        "n_devices": int(n_dev),
        "towers": {"image": dict(run_config.model.image_tower),
                   "spectrum": dict(run_config.model.spectrum_tower)},
    }
    return arrays, meta


def load_or_compute_embeddings(config, workdir, split=None, which=None):
    """(arrays, meta) of ``workdir/embeddings/<split>.h5``, computed first if missing or stale.

    ``split`` and ``which`` default to ``config.eval.split`` and ``config.eval.checkpoint``.
    Raises FileNotFoundError (saying what to run) when the work directory has no checkpoint.
    """
    import jax

    split = split or config.eval.split
    which = which or config.eval.checkpoint
    path = embeddings_path(workdir, split)
    ckpt_dir, step = resolve_checkpoint(workdir, which)
    key = checkpoint_key(ckpt_dir, step, config.data)
    if os.path.exists(path):
        arrays, meta, old_key = read_embeddings(path)
        if old_key == key:
            return arrays, meta
        # A different checkpoint: keep the old file under its step, never overwrite it.
        old = os.path.join(os.path.dirname(path),
                           f"{split}-step{meta.get('checkpoint', {}).get('step', 'unknown')}.h5")
        if jax.process_index() == 0:
            os.replace(path, old)
        print(f"embed: {path} was made with another checkpoint; kept it as {old}")
    arrays, meta = compute_embeddings(config, workdir, split, which)
    if jax.process_index() == 0:
        write_embeddings(path, arrays, meta, key)
        print(f"embed: wrote {meta['n']} galaxies to {path}")
    return arrays, meta


def read_examples(data_config, split, rows):
    """Display images and model-input spectra of records ``rows``, for figures.

    Returns ``{"image": (n, H, W, 3) RGB in [0, 1], "spectrum": (n, L), "wave": (L,)}``: the
    cropped cutouts in Stein's RGB (the project's display, whatever the model transform) and the
    normalised spectra the spectrum tower saw, on their wavelength grid.
    """
    from astroclip_jax.data import grids, pipeline, preprocess
    from astroclip_jax.evaluation import plots

    source = pipeline.data_source(data_config, split)
    records = [source[int(i)] for i in rows]
    images = np.stack([np.asarray(r["image"], np.float32) for r in records])
    crop = data_config.get("image_crop")
    if crop:
        images = preprocess.center_crop(images, int(crop))
    images = plots.display_rgb(images)
    spectra = np.stack([np.asarray(r["spectrum"], np.float32).reshape(-1) for r in records])
    spectra = preprocess.normalise_spectra(spectra, data_config.get("spectrum_norm", "zscore"))
    return {"image": images, "spectrum": spectra,
            "wave": grids.wave(data_config.get("grid", "desi"))}


def run(config, workdir):
    """``--mode=embed``: write (or confirm up to date) ``workdir/embeddings/<split>.h5``."""
    arrays, meta = load_or_compute_embeddings(config, workdir)
    path = embeddings_path(workdir, meta["split"])
    print(f"embed: {path}: {meta['n']} galaxies, embedding dim "
          f"{arrays['image_embedding'].shape[1]}, checkpoint step {meta['checkpoint']['step']}, "
          f"{int(np.sum(arrays['has_props']))} with properties")
    return path
