"""What a contrastive train step changes, and how: the TrainState, Adam, the plateau rule.

The learning rate lives in the optimiser state (`optax.inject_hyperparams`), so the plateau
rule (torch's ReduceLROnPlateau, run on the host once per epoch) can set it and a checkpoint
of the state holds it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from astroclip_jax.settings import TrainSettings


class TrainState(struct.PyTreeNode):
    """Everything a train step changes. Frozen tower weights are not in here."""

    step: jax.Array  # int32 scalar: number of updates done; also the data position
    params: Any  # the trainable partition
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32[2] base key; step keys are fold_in(rng, step)


def make_optimizer(train: TrainSettings, steps_per_epoch: int = 1
                   ) -> optax.GradientTransformation:
    """`train.schedule` "plateau": Adam whose learning rate lives in the optimiser state (so
    the plateau rule can set it); "warmup_cosine": AdamW on `warmup_cosine_schedule`. Either
    clipped to a global gradient norm of `train.clip_norm` when it is > 0."""
    if train.schedule == "plateau" and not train.clip_norm:
        return optax.inject_hyperparams(optax.adam)(
            learning_rate=train.learning_rate, b1=train.adam_b1, b2=train.adam_b2,
            eps=train.adam_eps)
    if train.schedule == "plateau":
        learning_rate = train.learning_rate

        def make(learning_rate):
            return optax.adam(learning_rate, b1=train.adam_b1, b2=train.adam_b2,
                              eps=train.adam_eps)
    else:
        learning_rate = warmup_cosine_schedule(
            train.learning_rate, train.warmup_steps,
            train.cosine_steps or steps_per_epoch * train.epochs)

        def make(learning_rate):
            return optax.adamw(learning_rate, b1=train.adam_b1, b2=train.adam_b2,
                               eps=train.adam_eps, weight_decay=train.weight_decay)
    return optax.inject_hyperparams(lambda learning_rate: optax.chain(
        *([optax.clip_by_global_norm(train.clip_norm)] if train.clip_norm else []),
        make(learning_rate)))(learning_rate=learning_rate)


def warmup_cosine_schedule(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """AstroCLIP's `CosineAnnealingWithWarmupLR` (astroclip/scheduler.py) stepped per update:
    peak * t / warmup, then a cosine from peak to 0 at `total_steps`, then 0. (Upstream's
    eta_min is `lr // 500`, a floor division: 0 for lr 1e-4.)"""
    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = peak * t / max(warmup_steps, 1)
        ratio = jnp.clip((t - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        cosine = 0.5 * peak * (1.0 + jnp.cos(jnp.pi * ratio))
        return jnp.where(t < warmup_steps, warm, cosine)
    return schedule


def init_state(tx: optax.GradientTransformation, trainable, rng: jax.Array) -> TrainState:
    """A fresh state for the trainable partition (pure: usable under `jax.eval_shape`)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                      opt_state=tx.init(trainable), rng=rng)


def learning_rate(state: TrainState) -> jax.Array:
    return state.opt_state.hyperparams["learning_rate"]


def set_learning_rate(state: TrainState, lr: float) -> TrainState:
    """The state with a new learning rate, on the same devices/sharding as the old one."""
    old = learning_rate(state)
    new = jax.device_put(np.asarray(lr, old.dtype), old.sharding)
    hyper = {**state.opt_state.hyperparams, "learning_rate": new}
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


class Plateau(NamedTuple):
    """torch ReduceLROnPlateau state (mode "min", relative threshold); host-side, JSON-able."""

    lr: float
    best: float = math.inf
    num_bad_epochs: int = 0


def plateau_update(p: Plateau, val_loss: float, factor: float, patience: int,
                   threshold: float, min_lr: float = 0.0, eps: float = 1e-8) -> Plateau:
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
