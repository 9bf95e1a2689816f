"""The contrastive train steps, side by side, and the eval steps. Pure functions, ready for jit.

Both train steps end in the same `contrastive_update` (InfoNCE on the global batch, gradient
w.r.t. the trainable partition only, Adam), so they produce the same TrainState and metrics
and a run may switch between them on resume. Both take their data from `state.step`:

    online_train_step(state, frozen, batch) -> (state, metrics)       feature_cache.enabled=False
      key      = fold_in(state.rng, state.step)             (per-step randomness, resumable)
      images   = augment_images(fold_in(key, 0), ...)       (on device)
      spectra  = augment_spectra(fold_in(key, 1), ...)
      loss     = InfoNCE(heads(towers(augmented batch)))

    cached_train_step(state, frozen, cache, index) -> (state, metrics)   feature_cache.enabled
      views    = sample_cached_features(fold_in(key, 2), cache, index)   (on device)
      loss     = InfoNCE(heads(cached tower features of those views))

`batch` holds the rows and `index` the record indices of global step `state.step` of
`data.pipeline.step_indices`. The frozen partition is an argument (not a closed-over constant,
so a 100 MB ResNet is not baked into the program) and enters behind `stop_gradient`.

The steps are written on global arrays: under a data-parallel mesh the batch is sharded and
the parameters replicated, the same code runs on 1 or N devices, and the loss sees every
negative of the global batch (XLA inserts the gathers).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from astroclip_jax.models import partition
from astroclip_jax.models.astroclip import AstroCLIP
from astroclip_jax.settings import AugmentSettings
from astroclip_jax.training import augment, losses
from astroclip_jax.training.feature_store import FeatureCache, sample_cached_features
from astroclip_jax.training.optimizer import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# fold_in(fold_in(rng, step), STREAM): the independent random streams of one step.
IMAGE_AUGMENT_STREAM, SPECTRUM_AUGMENT_STREAM, CACHED_VIEW_STREAM = 0, 1, 2


def step_key(rng: jax.Array, step, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(rng, step), stream)


def contrastive_update(state: TrainState, tx: optax.GradientTransformation, model: AstroCLIP,
                       frozen, embed: Callable[[Any], tuple[jax.Array, jax.Array]]
                       ) -> tuple[TrainState, Metrics]:
    """One optimiser step on the InfoNCE loss of `embed(params) -> (image_emb, spectrum_emb)`.

    The gradient is w.r.t. the trainable partition (`state.params`) only; `frozen` enters
    behind `stop_gradient`.
    """
    frozen = jax.lax.stop_gradient(frozen)

    def loss_fn(trainable):
        params = partition.merge(trainable, frozen)
        image_emb, spectrum_emb = embed(params)
        return losses.infonce_with_metrics(image_emb, spectrum_emb, model.scale(params))

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads),
               "learning_rate": opt_state.hyperparams["learning_rate"]}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# ------------------------------------------------------------------------------- the online step

def make_online_train_step(model: AstroCLIP, tx: optax.GradientTransformation,
                           aug: AugmentSettings, pixel_std: np.ndarray | None) -> Callable:
    """`online_train_step(state, frozen, batch) -> (state, metrics)`.

    `batch` needs "image" (B, H, W, 3), "spectrum" (B, L) and "spectrum_scale" (B,); B is the
    global batch. `pixel_std` (L,), the per-pixel flux std on the spectra's grid, is needed
    only when `aug.spectrum_noise_scale` > 0.
    """
    if aug.spectrum_noise_scale > 0 and pixel_std is None:
        raise ValueError("augment.spectrum_noise_scale > 0 needs the per-pixel std (pixel_std)")
    pixel_std = None if pixel_std is None else jnp.asarray(pixel_std, jnp.float32)

    def online_train_step(state: TrainState, frozen, batch: Batch) -> tuple[TrainState, Metrics]:
        images = augment.augment_images(step_key(state.rng, state.step, IMAGE_AUGMENT_STREAM),
                                        batch["image"], aug)
        spectra = augment.augment_spectra(
            step_key(state.rng, state.step, SPECTRUM_AUGMENT_STREAM), batch["spectrum"],
            batch["spectrum_scale"], pixel_std, aug)
        return contrastive_update(state, tx, model, frozen,
                                  lambda params: model.embed(params, images, spectra))

    return online_train_step


# ------------------------------------------------------------------------------- the cached step

def _heads_update(state, tx, model: AstroCLIP, frozen, image_features, spectrum_features):
    image_features = jnp.asarray(image_features, jnp.float32)
    spectrum_features = jnp.asarray(spectrum_features, jnp.float32)
    return contrastive_update(
        state, tx, model, frozen,
        lambda params: model.heads_from_features(params, image_features, spectrum_features))


def make_cached_train_step(model: AstroCLIP, tx: optax.GradientTransformation) -> Callable:
    """`cached_train_step(state, frozen, cache, index) -> (state, metrics)`.

    `cache` is a `FeatureCache` of JAX arrays on the devices; the views are sampled inside
    the step, so a step moves only `index` (B,) to the device.
    """

    def cached_train_step(state: TrainState, frozen, cache: FeatureCache, index
                          ) -> tuple[TrainState, Metrics]:
        key = step_key(state.rng, state.step, CACHED_VIEW_STREAM)
        return _heads_update(state, tx, model, frozen,
                             *sample_cached_features(key, cache, index))

    return cached_train_step


def make_features_train_step(model: AstroCLIP, tx: optax.GradientTransformation) -> Callable:
    """`features_train_step(state, frozen, features) -> (state, metrics)`: the cached step when
    the views were gathered on the host (`feature_cache.on_device=False`: a memory-mapped cache
    larger than the devices), with the same keys (`step_key(..., CACHED_VIEW_STREAM)`);
    `features` = {"image_features" (B, D_i), "spectrum_features" (B, D_s)}."""

    def features_train_step(state: TrainState, frozen, features: Batch):
        return _heads_update(state, tx, model, frozen, features["image_features"],
                             features["spectrum_features"])

    return features_train_step


# ------------------------------------------------------------------------------- evaluation

def make_eval_steps(model: AstroCLIP) -> tuple[Callable, Callable]:
    """Pure eval functions (no augmentation except the model's deterministic centre crop):

      features_step(frozen, batch) -> (img_f, spec_f)                  the frozen towers alone
      heads_step(trainable, frozen, img_f, spec_f, mask) -> metrics    masked InfoNCE, heads only

    The towers are frozen, so the validation set's tower features are computed once per run
    and `heads_step` reuses them every epoch.
    """

    def features_step(frozen, batch: Batch):
        return model.tower_features(frozen, batch["image"], batch["spectrum"])

    def heads_step(trainable, frozen, image_features, spectrum_features, mask) -> Metrics:
        params = partition.merge(trainable, frozen)
        image_emb, spectrum_emb = model.heads_from_features(params, image_features,
                                                            spectrum_features)
        return losses.infonce_with_metrics(image_emb, spectrum_emb, model.scale(params),
                                           mask=mask)[1]

    return features_step, heads_step
