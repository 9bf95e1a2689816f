"""The jitted contrastive train and eval steps, the optimiser, and the plateau schedule.

The steps are pure functions of global arrays: under a data-parallel mesh the batch is
sharded and the parameters replicated, and the same code runs on 1 or N devices; the
InfoNCE loss sees the whole global batch of negatives because it is written on global
arrays (XLA inserts the gathers).

    train_step(state, frozen, batch) -> (state, metrics)
      key      = fold_in(state.rng, state.step)             (per-step randomness, resumable)
      images   = augment_images(fold_in(key, 0), ...)       (on device)
      spectra  = augment_spectra(fold_in(key, 1), ...)
      loss     = InfoNCE(heads(towers(frozen), trainable))  (grad w.r.t. trainable only)
      Adam update of the trainable partition

The frozen partition is an argument (not a closed-over constant, so a 100 MB ResNet is not
baked into the program) and enters behind `stop_gradient`: no gradient w.r.t. it is formed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from astroclip_jax import augment, losses
from astroclip_jax import model as model_lib

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
    """Everything a train step changes. Frozen tower weights are not in here."""

    step: jax.Array  # int32 scalar: number of updates done
    params: Any  # the trainable partition
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32[2] base key; step keys are fold_in(rng, step)


# --------------------------------------------------------------------------- optimiser

def make_optimizer(config) -> optax.GradientTransformation:
    """Adam whose learning rate lives in the optimiser state (so the plateau rule can set it)."""
    t = config.train
    return optax.inject_hyperparams(optax.adam)(
        learning_rate=t.learning_rate, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps)


def learning_rate(state: TrainState) -> jax.Array:
    return state.opt_state.hyperparams["learning_rate"]


def set_learning_rate(state: TrainState, lr: float) -> TrainState:
    """The state with a new learning rate, on the same devices/sharding as the old one."""
    old = state.opt_state.hyperparams["learning_rate"]
    new = jax.device_put(np.asarray(lr, old.dtype), old.sharding)
    hyper = {**state.opt_state.hyperparams, "learning_rate": new}
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def init_state(config, trainable, rng: jax.Array) -> TrainState:
    """A fresh state for the trainable partition (pure: usable under `jax.eval_shape`)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                      opt_state=make_optimizer(config).init(trainable), rng=rng)


class Plateau(NamedTuple):
    """torch ReduceLROnPlateau state (mode "min", relative threshold); host-side, JSON-able."""

    lr: float
    best: float = math.inf
    num_bad_epochs: int = 0


def plateau_update(p: Plateau, val_loss: float, factor: float = 0.5, patience: int = 5,
                   threshold: float = 1e-4, min_lr: float = 0.0, eps: float = 1e-8) -> Plateau:
    """One epoch of torch.optim.lr_scheduler.ReduceLROnPlateau (mode min, threshold_mode rel).

    An epoch improves when val_loss < best * (1 - threshold). After more than `patience`
    epochs without improvement the rate is multiplied by `factor` (not below `min_lr`, and
    only if it changes by more than `eps`) and the count restarts. No cooldown.
    """
    val_loss = float(val_loss)
    if val_loss < p.best * (1.0 - threshold):
        best, bad = val_loss, 0
    else:
        best, bad = p.best, p.num_bad_epochs + 1
    lr = p.lr
    if bad > patience:
        new_lr = max(lr * factor, min_lr)
        if lr - new_lr > eps:
            lr = new_lr
        bad = 0
    return Plateau(lr=lr, best=best, num_bad_epochs=bad)


# --------------------------------------------------------------------------------- steps

def center_crop(images: jax.Array, size: int) -> jax.Array:
    return images if images.shape[1] == size else augment.center_crop(images, size)


def make_train_step(model: model_lib.AstroCLIP, config,
                    pixel_std: np.ndarray | None = None) -> Callable:
    """`train_step(state, frozen, batch) -> (state, metrics)`, pure, ready for `jax.jit`.

    `batch` needs "image" (B, H, W, 3) and "spectrum" (B, L); B is the global batch.
    `pixel_std` (L,) is needed only when `augment.spectrum_noise_scale` > 0.
    """
    tx = make_optimizer(config)
    aug = config.augment.to_dict() if hasattr(config.augment, "to_dict") else dict(config.augment)
    if aug.get("spectrum_noise_scale", 0.0) > 0 and pixel_std is None:
        raise ValueError("augment.spectrum_noise_scale > 0 needs the per-pixel std (pixel_std)")
    pixel_std = None if pixel_std is None else jnp.asarray(pixel_std, jnp.float32)

    def train_step(state: TrainState, frozen, batch: Batch) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(state.rng, state.step)
        images = augment.augment_images(jax.random.fold_in(key, 0), batch["image"], aug)
        spectra = augment.augment_spectra(jax.random.fold_in(key, 1), batch["spectrum"],
                                          pixel_std, aug)
        return contrastive_update(state, tx, model, frozen,
                                  lambda params: model.embed(params, images, spectra))

    return train_step


def contrastive_update(state: TrainState, tx: optax.GradientTransformation,
                       model: model_lib.AstroCLIP, frozen,
                       embed: Callable[[Any], tuple[jax.Array, jax.Array]]
                       ) -> tuple[TrainState, Metrics]:
    """One optimiser step on the InfoNCE loss of `embed(params) -> (image_emb, spectrum_emb)`.

    The gradient is w.r.t. the trainable partition (`state.params`) only; `frozen` enters
    behind `stop_gradient`. Shared by the online and the cached steps, so both produce the
    same state and metrics and a run can switch between them.
    """
    frozen = jax.lax.stop_gradient(frozen)

    def loss_fn(trainable):
        params = model_lib.merge(trainable, frozen)
        image_emb, spectrum_emb = embed(params)
        return losses.infonce_with_metrics(image_emb, spectrum_emb, model.scale(params))

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads),
               "learning_rate": opt_state.hyperparams["learning_rate"]}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_eval_steps(model: model_lib.AstroCLIP, config) -> tuple[Callable, Callable, Callable]:
    """Pure eval functions (no augmentation except the deterministic centre crop):

      eval_step(trainable, frozen, batch) -> metrics        masked InfoNCE on a padded batch
      features_step(frozen, batch) -> (img_f, spec_f)       the frozen towers alone
      heads_step(trainable, frozen, img_f, spec_f, mask) -> metrics   the heads alone

    `features_step` + `heads_step` equal `eval_step` when the towers are frozen, so the
    validation set's tower features can be computed once per run and reused every epoch.
    """
    size = model_lib.image_size(config)

    def features_step(frozen, batch: Batch):
        return model.tower_features(frozen, center_crop(batch["image"], size), batch["spectrum"])

    def heads_step(trainable, frozen, image_features, spectrum_features, mask) -> Metrics:
        params = model_lib.merge(trainable, frozen)
        image_emb, spectrum_emb = model.heads_from_features(params, image_features,
                                                            spectrum_features)
        return losses.infonce_with_metrics(image_emb, spectrum_emb, model.scale(params),
                                           mask=mask)[1]

    def eval_step(trainable, frozen, batch: Batch) -> Metrics:
        params = model_lib.merge(trainable, frozen)
        return heads_step(trainable, frozen, *features_step(params, batch), batch["mask"])

    return eval_step, features_step, heads_step
