"""Supervised upper bounds: networks trained end to end on the labels, on the shared loop.

    image       the image tower's architecture (ResNet, `probe.supervised_image_size`) from
                scratch -> Dense(T)
    spectrum    the Spender encoder's conv + attention from scratch -> Dense(T)
    photometry  an MLP (64, 64) on the g, r, z magnitudes -> Dense(T)

Each regresses all T targets at once, standardised by the training rows (AstroCLIP v2's
baselines: MSE on standardised targets, Adam 5e-4, best epoch by validation loss). The rows are
given by the caller (`evaluation/probe.py`: the labelled fit rows; the validation slice is
taken from them, never from the held-out rows). Each is a `loop.Trainer`, so it resumes,
checkpoints (latest + best by validation loss), logs metrics and draws its curves like the
contrastive trainer. The loop's "accuracy" is 1 - MSE of the standardised targets (about the
mean R^2 over targets).

The ResNet's BatchNorm layers always use their running statistics (as the frozen towers): from
scratch they are fixed affine maps (mean 0, variance 1 at init) whose scale and bias train.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from astroclip_jax import settings as settings_lib
from astroclip_jax.data import pipeline
from astroclip_jax.models import heads, towers
from astroclip_jax.training import checkpoint as checkpoint_lib
from astroclip_jax.training import loop, metrics, optimizer

MODALITIES = ("image", "spectrum", "photometry")


class TowerRegressor(nn.Module):
    """A tower's features -> Dense(out): the tower architecture trained on the labels."""

    kind: str  # "resnet" | "spender"
    tower: tuple  # (name, value) pairs of the tower's config
    out: int

    @nn.compact
    def __call__(self, x):
        module = towers.build_tower(self.kind, dict(self.tower))
        if self.kind == "resnet":
            features = module(x)["features"]
        else:
            features = module(x, features_only=True)["features"]
        return nn.Dense(self.out, name="regressor")(features)


def network(modality: str, probe: settings_lib.ProbeSettings, n_targets: int) -> nn.Module:
    """The supervised network of a modality, at the probe settings' sizes."""
    if modality == "image":
        cfg = {**towers.tower_config("resnet", probe.supervised_image_size), "head_hidden": None}
        return TowerRegressor("resnet", _as_field(cfg), n_targets)
    if modality == "spectrum":
        cfg = towers.tower_config("spender", probe.supervised_spectrum_size)
        return TowerRegressor("spender", _as_field(cfg), n_targets)
    if modality == "photometry":
        return heads.MLPHead(hidden=(64, 64), out=n_targets)
    raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")


def _as_field(cfg: dict) -> tuple:
    """A tower config as a hashable module field: sorted (name, value) pairs, lists as tuples."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()))


def mse(module: nn.Module, params, fixed, x, y) -> jax.Array:
    """Mean squared error of standardised targets (all targets, all rows)."""
    pred = module.apply({"params": params, **fixed}, x)
    return jnp.mean(jnp.square(pred - y))


def make_train_step(module: nn.Module, tx, fixed) -> Callable:
    """(state, {"x", "y"}) -> (state, metrics): one Adam step on the batch's MSE (pure)."""
    def train_step(state, batch):
        loss, grads = jax.value_and_grad(mse, argnums=1)(module, state.params, fixed,
                                                         batch["x"], batch["y"])
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, {"loss": loss, "accuracy": 1.0 - loss,
                     "learning_rate": optimizer.learning_rate(state)}
    return train_step


@dataclasses.dataclass(frozen=True)
class SupervisedData:
    """Inputs and standardised targets of the training and validation rows."""

    x_train: np.ndarray
    y_train: np.ndarray  # (N, T) standardised
    x_val: np.ndarray
    y_val: np.ndarray


def epochs_of(modality: str, probe: settings_lib.ProbeSettings) -> int:
    if modality == "photometry":
        return probe.supervised_photometry_epochs
    return probe.supervised_epochs


def key_of(modality: str, rows: SupervisedData, probe: settings_lib.ProbeSettings, seed: int) -> str:
    """What a trained bound depends on: its inputs, targets and settings (its folder name)."""
    digest = hashlib.sha256(json.dumps(
        [modality, seed, probe.supervised_image_size, probe.supervised_spectrum_size,
         epochs_of(modality, probe), probe.supervised_batch_size,
         probe.supervised_learning_rate]
    ).encode())
    for a in (rows.x_train, rows.y_train, rows.x_val, rows.y_val):
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:12]


# Train and validation MSE per epoch (standardised targets).
CURVES = metrics.Curves(figsize=(6, 4), panels=(metrics.Panel("MSE of standardised targets", (
    ("train/loss", "train"), ("val/loss", "validation (from the fit rows)"))),))


def build_trainer(module: nn.Module, rows: SupervisedData, train: settings_lib.TrainSettings, seed: int
                  ) -> tuple[loop.Trainer, Any, Callable]:
    """(Trainer, fixed variables, init) for `module` on `rows` (one device)."""
    tx = optimizer.make_optimizer(train)
    key = jax.random.PRNGKey(seed)
    variables = jax.jit(module.init)(jax.random.fold_in(key, 0),
                                     jnp.asarray(rows.x_train[:1], jnp.float32))
    params = variables["params"]
    fixed = {k: v for k, v in variables.items() if k != "params"}  # BatchNorm statistics
    state_rng = jax.random.fold_in(key, 1)
    init = jax.jit(lambda p, k: optimizer.init_state(tx, p, k))
    abstract = jax.eval_shape(init, params, state_rng)
    step_fn = jax.jit(make_train_step(module, tx, fixed))
    n, batch = len(rows.x_train), train.batch_size
    loss_fn = jax.jit(lambda p, x, y, w: jnp.sum(
        jnp.square(module.apply({"params": p, **fixed}, x) - y) * w[:, None]))

    batches = loop.step_batches(n, seed, batch, lambda idx, t: {"x": rows.x_train[idx],
                                                               "y": rows.y_train[idx]},
                                rows=slice(None))
    # Padded batches, each row weighted by its mask (one compiled shape).
    val = loop.fixed_batches(len(rows.x_val), batch,
                             lambda idx: {"x": rows.x_val[idx], "y": rows.y_val[idx]})

    def validate(state):
        total = sum(float(loss_fn(state.params, b["x"], b["y"], b["mask"])) for b in val)
        loss = total / (len(rows.x_val) * rows.y_val.shape[1])
        return {"loss": loss, "accuracy": 1.0 - loss}

    trainer = loop.Trainer(
        abstract_state=abstract, init_state=lambda: init(params, state_rng),
        steps_per_epoch=pipeline.steps_per_epoch(n, batch), batches=batches,
        train_step=step_fn, validate=validate, curves=CURVES)
    return trainer, fixed, abstract


def train_and_predict(modality: str, rows: SupervisedData, query_x: np.ndarray,
                      run: settings_lib.RunSettings, workdir: str, seed: int
                      ) -> tuple[np.ndarray, dict[str, Any]]:
    """Train (or reuse, or resume) the bound in `workdir`; its best epoch's standardised
    predictions for `query_x` (n, T) and a summary."""
    probe = run.probe
    module = network(modality, probe, rows.y_train.shape[1])
    batch = min(probe.supervised_batch_size, len(rows.x_train))
    epochs = epochs_of(modality, probe)
    train = dataclasses.replace(
        run.train, batch_size=batch, epochs=epochs,
        learning_rate=probe.supervised_learning_rate, keep_checkpoints=1,
        log_every_steps=max(1, pipeline.steps_per_epoch(len(rows.x_train), batch) // 4),
        adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8)
    trainer, fixed, abstract = build_trainer(module, rows, train, seed)
    config_json = {"supervised": {"modality": modality, "seed": seed,
                                  "probe": dataclasses.asdict(probe)}}
    with loop.work_directory(workdir, run, purpose=f"supervised {modality}"):
        loop.run(trainer, train, workdir, config_json)
    ckpt = checkpoint_lib.Checkpointer(workdir, read_only=True)
    try:
        best = ckpt.best_step()
        state, meta = ckpt.restore(best, abstract)
    finally:
        ckpt.close()
    predict = jax.jit(lambda p, x: module.apply({"params": p, **fixed}, x))
    pred = np.concatenate([np.asarray(predict(state.params, pipeline.pad_rows(query_x[i:i + batch], batch)))
                           for i in range(0, len(query_x), batch)])[:len(query_x)]
    summary = {"best_step": int(best), "best_epoch": int(meta["epoch"]),
               "val_mse": float(meta["val_loss"]), "epochs": epochs,
               "n_train": len(rows.x_train), "n_val": len(rows.x_val), "batch_size": batch,
               "parameters": int(sum(np.size(x) for x in jax.tree.leaves(state.params)))}
    return pred.astype(np.float64), summary
