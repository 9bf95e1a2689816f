"""Restore a trained model: the one way, for `--mode=embed` and for a notebook.

    from astroclip_jax.evaluation.restore import load_embedder
    emb = load_embedder("runs/desi")                 # best checkpoint; or which="latest"
    emb = load_embedder("runs/desi/export")          # an exported folder (--mode=export)
    z_img = emb.embed_images(images)                 # (N, 152, 152, 3) g, r, z flux -> (N, 128)
    z_spec = emb.embed_spectra(spectra)              # (N, 7781) flux on the DESI grid -> (N, 128)
    similarity = z_img @ z_spec.T                    # cosine similarity (rows are unit vectors)

`restore_trained_model` reads the checkpoint against an abstract tree on one local device (so a
run written on N GPUs opens on one CPU or GPU), resolves the run's own config, and rebuilds
the frozen towers from the converted-weight directories it names (`model.*.weights`; relative
paths resolve from the current directory) or, when the run used random towers, from its seed.
An exported folder (`export.py`) holds the towers, the heads and the config itself:
`load_export` opens it with nothing else present (no work directory, tower folders, dataset or
Orbax), after checking every file against its checksum.
The `Embedder` applies the run's own host preprocessing (`data.preprocess`) and the model's
embedding methods, so its output equals the embed mode's file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from astroclip_jax import files, flat_tree
from astroclip_jax import settings as settings_lib
from astroclip_jax.data import preprocess
from astroclip_jax.errors import DamagedCheckpoint, DataError, MissingInput
from astroclip_jax.models import astroclip, partition
from astroclip_jax.training import checkpoint as checkpoint_lib

EXPORT_FILE = "export.json"  # what marks an exported folder (export.py)
CHECKSUMS_FILE = "checksums.json"
_BUCKETS = (8, 32, 128, 256)  # rows per jitted call: few compiled shapes, bounded memory


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A restored run: its settings, model and params, and its params before training."""

    settings: settings_lib.RunSettings  # the run's own (its checkpoint's config)
    config: ml_collections.ConfigDict
    model: astroclip.AstroCLIP
    params: dict[str, Any]  # frozen towers + trained heads
    initial_params: dict[str, Any]  # the same towers with the heads before any training step
    step: int
    checkpoint_dir: str


def _workdir_and_which(path: str, which: str) -> tuple[str, str]:
    """A work directory, its `checkpoints` folder, or one `checkpoints/<step>` folder."""
    path = os.path.abspath(path)
    base, parent = os.path.basename(path), os.path.dirname(path)
    if base.isdigit() and os.path.basename(parent) == checkpoint_lib.CHECKPOINT_DIR:
        return os.path.dirname(parent), base
    if base == checkpoint_lib.CHECKPOINT_DIR:
        return parent, which
    return path, which


def _stored_config(stored: dict[str, Any]) -> ml_collections.ConfigDict:
    """A contrastive run's stored config, completed with configs/spender.py's defaults for the
    fields added since it was written (so older checkpoints and exports keep restoring)."""
    from configs import spender as spender_config

    return settings_lib.with_missing_fields(stored, spender_config.get_config(""))


INITIAL = "initial"  # eval.checkpoint: the model as the config builds it, no training


def run_model(settings: settings_lib.RunSettings, workdir: str) -> TrainedModel:
    """The model a mode evaluates: the work directory's checkpoint `eval.checkpoint`, or with
    "initial" the model the config builds (converted towers and heads, e.g. the released
    AstroCLIP's, as published: nothing trained, no checkpoint needed)."""
    if settings.eval.checkpoint != INITIAL:
        return restore_trained_model(workdir, settings.eval.checkpoint)
    model, params = astroclip.build(settings.model, jax.random.PRNGKey(settings.seed))
    return TrainedModel(settings=settings, config=ml_collections.ConfigDict(settings.config),
                        model=model, params=params, initial_params=params, step=0,
                        checkpoint_dir=INITIAL)


def restore_trained_model(workdir_or_checkpoint: str, which: str = "best") -> TrainedModel:
    """The run in `workdir_or_checkpoint` (a work directory, its `checkpoints/` folder, or one
    `checkpoints/<step>` folder) at checkpoint `which`: "best", "latest" or a step number."""
    workdir, which = _workdir_and_which(workdir_or_checkpoint, str(which))
    try:
        ckpt = checkpoint_lib.Checkpointer(workdir, read_only=True)
    except FileNotFoundError as err:
        raise MissingInput(
            f"{err}; train first: python main.py --config=... --mode=train --workdir={workdir}"
        ) from None
    try:
        try:
            step = ckpt.step_for(which)
        except MissingInput as err:
            raise MissingInput(f"{err}; train first (--mode=train --workdir={workdir})") from None
        state, meta = ckpt.restore(step)
    finally:
        ckpt.close()
    config = _stored_config(meta["config"])
    settings = settings_lib.resolve(config)
    model, initial = astroclip.build(settings.model, jax.random.PRNGKey(settings.seed))
    _, frozen = partition.partition(initial, settings.train.trainable)
    return TrainedModel(settings=settings, config=config, model=model,
                        params=partition.merge(state["params"], frozen), initial_params=initial,
                        step=int(step), checkpoint_dir=ckpt.directory)


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, EXPORT_FILE))


def _verify_export(path: str) -> None:
    """Every file the export lists matches its size and sha256 (DamagedCheckpoint names the first)."""
    problem = files.damage(path, CHECKSUMS_FILE)
    if problem is not None:
        raise DamagedCheckpoint(f"exported model {path}: {problem} (copy the folder again)")


def _load_heads(path: str) -> dict[str, Any]:
    with np.load(path) as npz:
        return flat_tree.unflatten({k: jax.numpy.asarray(npz[k]) for k in npz.files})


def load_export(path: str) -> TrainedModel:
    """The model of an exported folder (`--mode=export`), verified; needs nothing else."""
    path = os.path.abspath(path)
    if not is_export(path):
        raise MissingInput(f"{path} is not an exported model ({EXPORT_FILE} is missing); make "
                           "one with --mode=export")
    _verify_export(path)
    with open(os.path.join(path, EXPORT_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    config = _stored_config(meta["config"])
    for name in ("image_tower", "spectrum_tower"):  # stored relative to the folder
        config.model[name].weights = os.path.join(path, config.model[name].weights)
    settings = settings_lib.resolve(config)
    model, built = astroclip.build(settings.model, jax.random.PRNGKey(settings.seed))
    heads = _load_heads(os.path.join(path, "heads.npz"))
    initial = _load_heads(os.path.join(path, "initial_heads.npz"))
    towers = {k: built[k] for k in ("image_tower", "spectrum_tower")}
    return TrainedModel(settings=settings, config=config, model=model,
                        params={**towers, **heads}, initial_params={**towers, **initial},
                        step=int(meta["step"]), checkpoint_dir=path)


class Embedder:
    """A restored AstroCLIP model with NumPy-in, NumPy-out embedding methods.

    Attributes: `trained` (the `TrainedModel`), `config` (the run's), `step`, `model`, `params`.
    """

    def __init__(self, trained: TrainedModel):
        self.trained = trained
        self.config, self.step = trained.config, trained.step
        self.model, self.params = trained.model, trained.params
        self._data = trained.settings.data
        self._image_fn = jax.jit(trained.model.embed_images)
        self._spectrum_fn = jax.jit(trained.model.embed_spectra)

    # ---------------------------------------------------------------- host preprocessing
    def preprocess_images(self, images) -> np.ndarray:
        """Raw (N, H, W, 3) g, r, z flux -> what the image tower saw in training (NumPy)."""
        images = np.asarray(images, np.float32)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"expected (N, H, W, 3) g, r, z images, got shape {images.shape}")
        return preprocess.preprocess_images(images, self._data)

    def preprocess_spectra(self, spectra) -> np.ndarray:
        """Raw (N, L) or (N, L, 1) flux -> normalised spectra as in training (NumPy)."""
        spectra = np.asarray(spectra, np.float32)
        if spectra.ndim == 3 and spectra.shape[-1] == 1:  # upstream stores (N, L, 1)
            spectra = spectra[..., 0]
        if spectra.ndim == 1:
            spectra = spectra[None]
        length = self.trained.settings.model.spectrum_length
        if spectra.ndim != 2 or spectra.shape[1] != length:
            raise DataError(f"expected (N, {length}) spectra on the {self._data.grid} grid, "
                             f"got shape {spectra.shape}")
        return preprocess.preprocess_spectra(spectra, self._data)[0]

    # ---------------------------------------------------------------- embedding
    def embed_images(self, images, preprocessed: bool = False) -> np.ndarray:
        """(N, D) L2-normalised image embeddings of raw flux images (NumPy float32)."""
        x = np.asarray(images, np.float32) if preprocessed else self.preprocess_images(images)
        return self._batched(self._image_fn, x, self.trained.settings.model.image_head.out)

    def embed_spectra(self, spectra, preprocessed: bool = False) -> np.ndarray:
        """(N, D) L2-normalised spectrum embeddings of raw flux spectra (NumPy float32)."""
        x = np.asarray(spectra, np.float32) if preprocessed else self.preprocess_spectra(spectra)
        return self._batched(self._spectrum_fn, x,
                             self.trained.settings.model.spectrum_head.out)

    def _batched(self, fn, x: np.ndarray, dim: int) -> np.ndarray:
        """`fn` over rows of `x` in chunks zero-padded to a few fixed sizes (one compile each)."""
        out = [np.zeros((0, dim), np.float32)]
        largest = _BUCKETS[-1]
        for start in range(0, len(x), largest):
            chunk = x[start:start + largest]
            size = next(b for b in _BUCKETS if b >= len(chunk))
            padded = np.concatenate([chunk, np.zeros((size - len(chunk),) + chunk.shape[1:],
                                                     chunk.dtype)])
            out.append(np.asarray(jax.device_get(fn(self.params, padded)))[:len(chunk)])
        return np.concatenate(out).astype(np.float32)


def load_embedder(workdir_or_checkpoint: str, which: str = "best") -> Embedder:
    """Restore a run for notebook use: an `Embedder` on this machine's first device.

    `workdir_or_checkpoint`: an exported folder (`--mode=export`; `which` is ignored), a work
    directory, its `checkpoints/` folder, or one `checkpoints/<step>` folder; `which`: "best"
    (lowest validation loss), "latest" or a step.
    """
    if is_export(workdir_or_checkpoint):
        return Embedder(load_export(workdir_or_checkpoint))
    return Embedder(restore_trained_model(workdir_or_checkpoint, which))
