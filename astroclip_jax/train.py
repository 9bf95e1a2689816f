"""`--mode=train`: contrastive training of the AstroCLIP heads.

    python main.py --config=configs/spender.py --mode=train --workdir=runs/default

Reads top to bottom: mesh -> data -> model -> shard -> resume or init -> validation features
-> loop over epochs (train, validate, plateau, metrics, checkpoint) -> training-curve figure.

Deterministic given the seed: step t uses the key fold_in(rng, t) and the batch the data
pipeline derives from (seed, t); checkpoints (every epoch) hold the step, the optimiser state
with its learning rate, the plateau state and the data position. So a run killed at any
point and restarted on the same work directory ends bitwise identical (on CPU) to one that
was never interrupted.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import time
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

from astroclip_jax import checkpoint as checkpoint_lib
from astroclip_jax import metrics as metrics_lib
from astroclip_jax import model as model_lib
from astroclip_jax import sharding
from astroclip_jax import train_step as ts
from astroclip_jax.data import pipeline
from astroclip_jax.data import prepare as prepare_lib

_STEP_KEYS = ("image", "spectrum")  # what the train step reads from a batch
_EVAL_KEYS = ("image", "spectrum", "mask")


class _QuietOrbax(std_logging.Filter):
    """Orbax logs every file it writes at INFO; keep its warnings only."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def _banner(title: str) -> None:
    logging.info("%s %s %s", "=" * 20, title, "=" * (56 - len(title)))


def _is_main() -> bool:
    return jax.process_index() == 0


def _truncate_metrics(workdir: str, epoch: int) -> None:
    """Forget metric records of epochs after the checkpoint we resume from (they will be redone)."""
    path = os.path.join(workdir, metrics_lib.METRICS_FILE)
    if not os.path.exists(path):
        return
    keep = [r for r in metrics_lib.read_metrics(path) if r.get("epoch", 0) <= epoch]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, path)


def _mean_metrics(per_step: list[dict[str, Any]]) -> dict[str, float]:
    stacked = jax.device_get(per_step)
    return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


def _advance(bar, metrics, done: int, epoch: int, t_epoch: float, t) -> None:
    """Wait for a step's metrics, then tick the bar (and show loss and pairs/s now and then)."""
    metrics = jax.block_until_ready(metrics)
    bar.update(1)
    if done % t.log_every_steps == 0 or done == 1:
        pairs_per_s = done * t.batch_size / (time.time() - t_epoch)
        bar.set_postfix(epoch=epoch + 1, loss=f"{float(metrics['loss']):.4f}",
                        pairs_s=f"{pairs_per_s:.0f}")


def run(config, workdir: str) -> None:
    """Train (or resume training) in `workdir`."""
    t = config.train
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    logging.get_absl_logger().addFilter(_QuietOrbax())

    # ----------------------------------------------------------------------------- mesh
    _banner("mesh")
    sharding.maybe_initialize_distributed(config)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(t.batch_size, mesh)
    sharding.check_batch_size(t.val_batch_size, mesh)
    logging.info("%d devices (%s) in %d processes; global batch %d",
                 jax.device_count(), jax.devices()[0].platform, jax.process_count(), t.batch_size)

    # ----------------------------------------------------------------------------- data
    _banner("data")
    if _is_main():
        prepare_lib.prepare(config.data)  # no-op when prepared
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dataset prepared")
    steps_per_epoch = pipeline.steps_per_epoch(config.data, t.train_split, t.batch_size)
    total_steps = steps_per_epoch * t.epochs
    logging.info("%s/%s: %d steps per epoch, %d epochs, %d steps", config.data.name,
                 config.data.builder_config, steps_per_epoch, t.epochs, total_steps)

    # ----------------------------------------------------------------------------- model
    _banner("model")
    seed_key = jax.random.PRNGKey(config.seed)
    model, params = model_lib.build(config, seed_key)  # towers loaded (or random), heads init
    trainable, frozen = model_lib.partition(params, model_lib.trainable_patterns(config))
    del params
    for name, n in model_lib.param_counts(model_lib.merge(trainable, {})).items():
        logging.info("trainable %-14s %12d parameters", name, n)
    for name, n in model_lib.param_counts(frozen).items():
        logging.info("frozen    %-14s %12d parameters", name, n)
    state_rng = jax.random.fold_in(seed_key, 1)  # not the key the init used
    abstract_state = jax.eval_shape(lambda p, k: ts.init_state(config, p, k), trainable, state_rng)

    # ----------------------------------------------------------------------------- shard
    _banner("shard")
    repl = sharding.replicated(mesh)
    state_sharding = jax.tree.map(lambda _: repl, abstract_state)
    abstract_state = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), abstract_state)
    frozen = sharding.replicate(frozen, mesh)
    frozen_sharding = jax.tree.map(lambda _: repl, frozen)
    batch_sharding = sharding.data_sharded(mesh)
    pixel_std = None
    if config.augment.get("spectrum_noise_scale", 0.0) > 0:
        from astroclip_jax import augment

        pixel_std = augment.load_desi_pixel_std()
    train_step = jax.jit(
        ts.make_train_step(model, config, pixel_std),
        in_shardings=(state_sharding, frozen_sharding, batch_sharding),
        out_shardings=(state_sharding, repl))
    eval_step, features_step, heads_step = ts.make_eval_steps(model, config)
    eval_step = jax.jit(eval_step, out_shardings=repl)
    features_step = jax.jit(features_step)
    heads_step = jax.jit(heads_step, out_shardings=repl)

    # ----------------------------------------------------------------------------- resume or init
    _banner("resume or init")
    ckpt = checkpoint_lib.Checkpointer(workdir, keep=t.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = ckpt.restore(latest, abstract_state)
        epoch0, plateau, data_state = meta["epoch"], ts.Plateau(**meta["plateau"]), meta["data_state"]
        logging.info("resumed from %s: step %d, epoch %d, lr %.3g", ckpt.directory, latest,
                     epoch0, plateau.lr)
        if meta["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(f"checkpoint has {meta['steps_per_epoch']} steps per epoch, the data "
                             f"now gives {steps_per_epoch}: data or batch size changed")
    else:
        state = jax.jit(lambda p, k: ts.init_state(config, p, k), out_shardings=state_sharding)(
            sharding.replicate(trainable, mesh), state_rng)
        epoch0, plateau, data_state = 0, ts.Plateau(lr=float(t.learning_rate)), None
        logging.info("fresh start in %s", workdir)
    run_cached = None
    if t.get("feature_cache", False):  # towers once over fixed views; epochs train the heads only
        from astroclip_jax import feature_cache

        run_cached = feature_cache.cached_training(config, workdir, model, state.params, frozen,
                                                   mesh, state_rng, pixel_std, log=logging.info)
    del trainable
    if _is_main():
        _truncate_metrics(workdir, epoch0)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    train_iter = pipeline.train_loader(
        config.data, t.train_split, t.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    if data_state is not None:
        train_iter.set_state(data_state)

    # ----------------------------------------------------------------------------- validation
    _banner("validation")
    val_loader = pipeline.eval_loader(config.data, t.val_split, t.val_batch_size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
    towers_frozen = not any(k.endswith("_tower") for k in state.params)
    val_features = None
    if towers_frozen:
        # The frozen towers see no augmentation at validation: compute their features once.
        t0 = time.time()
        val_features = []
        for batch in val_loader:
            batch = sharding.shard_batch(batch, mesh, _EVAL_KEYS)
            val_features.append((*features_step(frozen, batch), batch["mask"]))
        logging.info("validation features of %d batches cached in %.1f s", len(val_features),
                     time.time() - t0)

    def validate(state) -> dict[str, float]:
        if val_features is not None:
            per_batch = [heads_step(state.params, frozen, f_img, f_spec, mask)
                         for f_img, f_spec, mask in val_features]
        else:
            per_batch = [eval_step(state.params, frozen, sharding.shard_batch(b, mesh, _EVAL_KEYS))
                         for b in val_loader]
        per_batch = jax.device_get(per_batch)
        # Batches weighted by their real (unpadded) rows.
        n = np.array([m["n_valid"] for m in per_batch])
        return {k: float(np.sum(np.array([m[k] for m in per_batch]) * n) / np.sum(n))
                for k in ("loss", "accuracy")}

    # ----------------------------------------------------------------------------- loop
    _banner("train")
    writer = metrics_lib.MetricWriter(workdir) if _is_main() else None
    bar = tqdm.tqdm(total=total_steps, initial=epoch0 * steps_per_epoch, unit="step",
                    dynamic_ncols=True, disable=not _is_main())
    for epoch in range(epoch0, t.epochs):
        t_epoch, per_step = time.time(), []
        lr = plateau.lr  # the rate of this epoch (the optimiser state holds the same value)
        for i in range(steps_per_epoch):
            if run_cached is not None:
                state, step_metrics = run_cached(state, frozen, epoch * steps_per_epoch + i)
            else:
                batch = sharding.shard_batch(next(train_iter), mesh, _STEP_KEYS)
                state, step_metrics = train_step(state, frozen, batch)
            per_step.append(step_metrics)
            # Count a step once it has run (not when dispatched), keeping one step in flight
            # so the host prepares the next batch while the devices compute.
            if i > 0:
                _advance(bar, per_step[-2], i, epoch, t_epoch, t)
        _advance(bar, per_step[-1], steps_per_epoch, epoch, t_epoch, t)
        train_metrics = _mean_metrics(per_step)
        epoch_s = time.time() - t_epoch
        val = validate(state)
        old_lr = plateau.lr
        plateau = ts.plateau_update(plateau, val["loss"], t.plateau_factor, t.plateau_patience,
                                    t.plateau_threshold)
        if plateau.lr != old_lr:
            logging.info("validation loss flat for %d epochs: learning rate %.3g -> %.3g",
                         t.plateau_patience + 1, old_lr, plateau.lr)
            state = ts.set_learning_rate(state, plateau.lr)
        step = int(jax.device_get(state.step))
        record = {"epoch": epoch + 1, "train/loss": train_metrics["loss"],
                  "train/accuracy": train_metrics["accuracy"], "val/loss": val["loss"],
                  "val/accuracy": val["accuracy"], "train/lr": lr, "batch_size": t.batch_size,
                  "pairs_per_s": steps_per_epoch * t.batch_size / epoch_s, "epoch_s": epoch_s}
        logging.info("epoch %d/%d step %d: train %.4f val %.4f (chance %.3f) lr %.3g, %.1f s",
                     epoch + 1, t.epochs, step, train_metrics["loss"], val["loss"],
                     np.log(t.batch_size), lr, epoch_s)
        if writer is not None:
            writer.write(step, record)
        ckpt.save(state, {"epoch": epoch + 1, "step": step, "steps_per_epoch": steps_per_epoch,
                          "plateau": plateau._asdict(), "data_state": train_iter.get_state(),
                          "val_loss": val["loss"],
                          "config": checkpoint_lib.config_to_json(config)},
                  val_loss=val["loss"])
    bar.close()
    ckpt.wait()
    ckpt.close()

    # ----------------------------------------------------------------------------- figure
    if writer is not None:
        writer.close()
        out = os.path.join(workdir, "training_curves.png")
        metrics_lib.plot_training_curves(os.path.join(workdir, metrics_lib.METRICS_FILE), out,
                                         batch_size=t.batch_size)
        logging.info("best checkpoint: step %s; figure %s", _best_step(workdir), out)


def _best_step(workdir: str):
    ckpt = checkpoint_lib.Checkpointer(workdir, read_only=True)
    try:
        return ckpt.best_step()
    finally:
        ckpt.close()
