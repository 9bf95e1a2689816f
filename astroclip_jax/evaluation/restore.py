"""Use a trained model from a notebook: raw images and spectra in, normalised embeddings out.

    from astroclip_jax.evaluation.restore import load_embedder
    emb = load_embedder("runs/desi")                 # best checkpoint; or which="latest"
    z_img = emb.embed_images(images)                 # (N, 152, 152, 3) g, r, z flux -> (N, 128)
    z_spec = emb.embed_spectra(spectra)              # (N, 7781) flux on the DESI grid -> (N, 128)
    similarity = z_img @ z_spec.T                    # cosine similarity (rows are unit vectors)

The inputs get exactly the host preprocessing of training (centre crop to ``data.image_crop``,
``data.image_transform``, per-spectrum z-score), read from the checkpoint's own config, then the
deterministic centre crop of the evaluation step. The checkpoint is restored against an
abstract tree on one local device, so a run written on N GPUs opens on one CPU or GPU. The
frozen towers are reloaded from the converted-weight directories named in the checkpoint's
config (``model.*.weights``; relative paths resolve from the current directory) or, when the
run used random towers, re-initialised from its seed.
"""

from __future__ import annotations

import os

import numpy as np

_BATCH = 256  # rows per jitted call: bounded device memory for any N


def _workdir_and_step(path, which):
    """A work directory, its ``checkpoints`` folder, or one ``checkpoints/<step>`` folder."""
    path = os.path.abspath(path)
    base = os.path.basename(path)
    parent = os.path.dirname(path)
    if base.isdigit() and os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent), base
    if base == "checkpoints":
        return parent, which
    return path, which


class Embedder:
    """A restored AstroCLIP model with NumPy-in, NumPy-out embedding methods.

    Attributes: ``config`` (the run's config), ``step`` (checkpoint step), ``model``, ``params``.
    """

    def __init__(self, config, model, params, step):
        import jax

        from astroclip_jax import model as model_lib
        from astroclip_jax import train_step

        self.config, self.model, self.params, self.step = config, model, params, step
        size = model_lib.image_size(config)

        def image_fn(params, images):
            images = train_step.center_crop(images, size)
            features = model.image_features(params, images)
            # The image half of model.heads_from_features (one modality at a time here).
            return _normalise(model.image_head.apply(params["image_head"], features))

        def spectrum_fn(params, spectra):
            features = model.spectrum_features(params, spectra)
            return _normalise(model.spectrum_head.apply(params["spectrum_head"], features))

        self._image_fn = jax.jit(image_fn)
        self._spectrum_fn = jax.jit(spectrum_fn)

    # ---------------------------------------------------------------- host preprocessing
    def preprocess_images(self, images):
        """Raw (N, H, W, 3) g, r, z flux -> what the image tower saw in training (NumPy)."""
        from astroclip_jax.data import preprocess

        images = np.asarray(images, np.float32)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (N, H, W, 3) g, r, z images, got shape {images.shape}")
        crop = self.config.data.get("image_crop")
        if crop and images.shape[1] > crop:
            images = preprocess.center_crop(images, int(crop))
        return preprocess.transform_images(images, self.config.data.get("image_transform",
                                                                        "stein_rgb"))

    def preprocess_spectra(self, spectra):
        """Raw (N, L) or (N, L, 1) flux -> normalised spectra as in training (NumPy)."""
        from astroclip_jax.data import grids, preprocess

        spectra = np.asarray(spectra, np.float32)
        if spectra.ndim == 3 and spectra.shape[-1] == 1:  # upstream stores (N, L, 1)
            spectra = spectra[..., 0]
        if spectra.ndim == 1:
            spectra = spectra[None]
        length = len(grids.wave(self.config.data.get("grid", "desi")))
        if spectra.ndim != 2 or spectra.shape[1] != length:
            raise ValueError(f"expected (N, {length}) spectra on the "
                             f"{self.config.data.get('grid', 'desi')} grid, got {spectra.shape}")
        return preprocess.normalise_spectra(spectra, self.config.data.get("spectrum_norm",
                                                                          "zscore"))

    # ---------------------------------------------------------------- embedding
    def embed_images(self, images, preprocessed=False):
        """(N, D) L2-normalised image embeddings of raw flux images (NumPy float32)."""
        x = images if preprocessed else self.preprocess_images(images)
        return _batched(self._image_fn, self.params, np.asarray(x, np.float32))

    def embed_spectra(self, spectra, preprocessed=False):
        """(N, D) L2-normalised spectrum embeddings of raw flux spectra (NumPy float32)."""
        x = spectra if preprocessed else self.preprocess_spectra(spectra)
        return _batched(self._spectrum_fn, self.params, np.asarray(x, np.float32))


def _normalise(x):
    import jax.numpy as jnp

    from astroclip_jax import losses

    return losses.l2_normalize(jnp.asarray(x))


def _batched(fn, params, x):
    """Apply ``fn`` in fixed-size batches (the last one zero-padded: one compiled shape)."""
    import jax

    out = []
    for start in range(0, len(x), _BATCH):
        chunk = x[start:start + _BATCH]
        pad = _BATCH - len(chunk) if len(x) > _BATCH else 0
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(jax.device_get(fn(params, chunk)))[:len(chunk) - pad])
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def load_embedder(workdir_or_checkpoint, which="best"):
    """Restore a run for notebook use: an :class:`Embedder` on this machine's first device.

    ``workdir_or_checkpoint``: a work directory, its ``checkpoints/`` folder, or one
    ``checkpoints/<step>`` folder; ``which``: "best" (lowest validation loss), "latest" or a step.
    """
    from astroclip_jax import checkpoint as ckpt_lib
    from astroclip_jax.evaluation import embed

    workdir, which = _workdir_and_step(workdir_or_checkpoint, str(which))
    _, step = embed.resolve_checkpoint(workdir, which)
    config, model, params = ckpt_lib.restore_model(workdir, str(step))
    return Embedder(config, model, params, step)


def verify_round_trip(config, workdir, n=16, atol=1e-5):
    """Max |difference| between the embed mode's file and a fresh :class:`Embedder` on raw data.

    Reads the first ``n`` raw records of ``config.eval.split``, embeds them with
    :func:`load_embedder` (notebook path: host preprocessing here, one device) and compares with
    the rows of ``workdir/embeddings/<split>.h5`` (computed if missing: loader path, sharded).
    Raises AssertionError beyond ``atol`` (float32 on differently batched/sharded calls).
    """
    from astroclip_jax.data import pipeline
    from astroclip_jax.evaluation import embed

    arrays, _ = embed.load_or_compute_embeddings(config, workdir)
    source = pipeline.data_source(config.data, config.eval.split)
    n = min(n, len(source))
    records = [source[i] for i in range(n)]
    embedder = load_embedder(workdir, config.eval.checkpoint)
    got_img = embedder.embed_images(np.stack([r["image"] for r in records]))
    got_spec = embedder.embed_spectra(np.stack([r["spectrum"] for r in records]))
    diff = {"image": float(np.max(np.abs(got_img - arrays["image_embedding"][:n]))),
            "spectrum": float(np.max(np.abs(got_spec - arrays["spectrum_embedding"][:n])))}
    if max(diff.values()) > atol:
        path = embed.embeddings_path(workdir, config.eval.split)
        raise AssertionError(f"restored embeddings differ from {path} by {diff} (> {atol})")
    return diff
