"""`--mode=train`: contrastive training of the AstroCLIP heads (the paper's training).

    python main.py --config=configs/spender.py --mode=train --workdir=runs/default

Reads top to bottom: settings -> mesh -> data -> model -> shard -> the train step (online or
cached, `steps.py`) -> validation -> the shared loop (`loop.py`: resume or init, epochs,
plateau rule, checkpoints, metrics, figure).

With `feature_cache.enabled` (the default) the frozen towers run once over fixed views of the
training split (`feature_store.py`) and each step trains the heads on cached features
(`steps.make_cached_train_step`); otherwise every step augments the batch on the device and runs
the towers (`steps.make_online_train_step`). Both take their galaxies of step t from
`data.pipeline.step_indices`, so a run may switch between them when it resumes.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from astroclip_jax import settings as settings_lib
from astroclip_jax.data import pipeline, shipped_files
from astroclip_jax.errors import ConfigError
from astroclip_jax.models import astroclip, partition
from astroclip_jax.training import (
    cached_views,
    feature_store,
    loop,
    optimizer,
    sharding,
    steps,
)
from astroclip_jax.training.feature_store import FeatureCache

_ONLINE_KEYS = ("image", "spectrum", "spectrum_scale")  # what the online step reads
_EVAL_KEYS = ("image", "spectrum", "mask")


def _log_param_counts(trainable, frozen) -> None:
    for label, tree in (("trainable", trainable), ("frozen", frozen)):
        for name, count in partition.param_counts(tree).items():
            logging.info("%-9s %-14s %12d parameters", label, name, count)


def _pixel_std(settings: settings_lib.RunSettings) -> np.ndarray | None:
    """The per-pixel flux std on the spectra's grid, when the spectrum augmentation needs it."""
    if settings.augment.spectrum_noise_scale <= 0:
        return None
    return shipped_files.pixel_std(settings.data.grid).astype(np.float32)


def run(settings: settings_lib.RunSettings, workdir: str) -> Any:
    """Train (or resume training) in `workdir`; the final TrainState."""
    with loop.work_directory(os.path.abspath(workdir), settings) as workdir:
        loop.check_resume(workdir, settings.config)
        return _train(settings, workdir)


def _train(settings: settings_lib.RunSettings, workdir: str) -> Any:
    train = settings.train
    mesh = loop.start_mesh(settings)
    loop.prepare_data(settings.data)
    train_records = pipeline.PreprocessedRecords(settings.data, train.train_split)
    num_records = len(train_records)
    loop.check_batch_fits(train, num_records)
    steps_per_epoch = pipeline.steps_per_epoch(num_records, train.batch_size)
    logging.info("%s/%s: %d steps per epoch, %d epochs", settings.data.name,
                 settings.data.builder_config, steps_per_epoch, train.epochs)

    # --------------------------------------------------------------------------- model
    loop.banner("model")
    seed_key = jax.random.PRNGKey(settings.seed)
    model, params = astroclip.build(settings.model, seed_key)  # towers loaded (or random)
    trainable, frozen = partition.partition(params, train.trainable)
    del params
    _log_param_counts(trainable, frozen)
    towers_frozen = not any(k.endswith("_tower") for k in trainable)
    tx = optimizer.make_optimizer(train, steps_per_epoch)
    state_rng = jax.random.fold_in(seed_key, 1)  # not the key the init used

    # --------------------------------------------------------------------------- shard
    loop.banner("shard")
    repl = sharding.replicated(mesh)
    abstract_state, state_sharding = loop.replicated_state(mesh, jax.eval_shape(
        lambda p, k: optimizer.init_state(tx, p, k), trainable, state_rng))
    frozen = sharding.replicate(frozen, mesh)
    frozen_sharding = jax.tree.map(lambda _: repl, frozen)
    batch_sharding = sharding.data_sharded(mesh)
    init_state = jax.jit(lambda p, k: optimizer.init_state(tx, p, k), out_shardings=state_sharding)
    trainable_on_devices = sharding.replicate(trainable, mesh)
    del trainable
    rows = pipeline.process_rows(train.batch_size, jax.process_index(), jax.process_count())

    # --------------------------------------------------------------------------- the train step
    if settings.feature_cache.enabled:
        loop.banner("feature cache")
        train_step, batches = _cached_path(settings, workdir, model, tx, frozen, mesh, train_records,
                                           state_rng, rows, towers_frozen)
    else:
        online = jax.jit(steps.make_online_train_step(model, tx, settings.augment,
                                                      _pixel_std(settings)),
                         in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                         out_shardings=(state_sharding, repl))

        def train_step(state, batch):
            return online(state, frozen, sharding.shard_batch(batch, mesh, _ONLINE_KEYS))

        def batches(start_step: int):
            return pipeline.TrainLoader(
                settings.data, train.train_split, train.batch_size, seed=settings.seed,
                start_step=start_step, process_index=jax.process_index(),
                process_count=jax.process_count())

    # --------------------------------------------------------------------------- validation
    loop.banner("validation")
    validate = _validation(settings, model, frozen, mesh, towers_frozen)

    def end_of_epoch(state, schedule, val):
        if train.schedule != "plateau":  # the optimiser's own schedule sets the rate
            return state, schedule
        plateau = optimizer.Plateau(**schedule)
        new = optimizer.plateau_update(plateau, val["loss"], train.plateau_factor,
                                       train.plateau_patience, train.plateau_threshold)
        if new.lr != plateau.lr:
            logging.info("validation loss flat for %d epochs: learning rate %.3g -> %.3g",
                         train.plateau_patience + 1, plateau.lr, new.lr)
            state = optimizer.set_learning_rate(state, new.lr)
        return state, new._asdict()

    trainer = loop.Trainer(
        abstract_state=abstract_state,
        init_state=lambda: init_state(trainable_on_devices, state_rng),
        steps_per_epoch=steps_per_epoch, batches=batches, train_step=train_step,
        validate=validate,
        initial_schedule=optimizer.Plateau(lr=train.learning_rate)._asdict(),
        end_of_epoch=end_of_epoch, chance_loss=float(np.log(train.batch_size)),
        # the paper's wandb curves beside the run only where the run is the paper's model
        paper_curves=(settings.model.image_tower.kind, settings.model.spectrum_tower.kind)
        == ("resnet", "spender"))
    return loop.run(trainer, train, workdir, settings.config)


def _cached_path(settings, workdir, model, tx, frozen, mesh, train_records, rng, rows,
                 towers_frozen):
    """(train_step, batches) of the cached step: builds (or reuses) the feature cache."""
    if not towers_frozen:
        raise ConfigError("feature_cache.enabled needs frozen towers (cached features would go "
                         "stale); set --config.feature_cache.enabled=False to train the towers")
    cache_settings, train = settings.feature_cache, settings.train
    views = cached_views.view_spec(settings.augment, cache_settings, settings.seed)
    cache = feature_store.build_or_load_cache(
        model, frozen, train_records, views, cache_settings.dir or workdir,
        cache_settings.batch_size, _pixel_std(settings), log=logging.info)

    if cache_settings.on_device:
        arrays = jax.device_put(FeatureCache(image=np.asarray(cache.image),
                                             spectrum=np.asarray(cache.spectrum)),
                                sharding.replicated(mesh))
        cached = jax.jit(steps.make_cached_train_step(model, tx))

        def train_step(state, index):
            return cached(state, frozen, arrays, sharding.shard_batch({"index": index},
                                                                      mesh)["index"])

        batches = loop.step_batches(cache.n, settings.seed, train.batch_size,
                                    lambda indices, step: indices, rows)
    else:
        features = jax.jit(steps.make_features_train_step(model, tx))
        host_rng = np.asarray(jax.device_get(rng))

        def train_step(state, batch):
            return features(state, frozen, sharding.shard_batch(batch, mesh))

        def gather(indices, step):  # the rows the device path would gather, with the same key
            key = steps.step_key(host_rng, step, steps.CACHED_VIEW_STREAM)
            img, spectrum = feature_store.sample_cached_features(key, cache, indices)
            return {"image_features": img[rows], "spectrum_features": spectrum[rows]}

        batches = loop.step_batches(cache.n, settings.seed, train.batch_size, gather,
                                    slice(None))  # every row: the key draws per global row

    return train_step, batches


def _validation(settings, model, frozen, mesh, towers_frozen):
    """`validate(state) -> {"loss", "accuracy"}` on the validation split (no augmentation)."""
    train = settings.train
    features_step, heads_step = steps.make_eval_steps(model)
    repl = sharding.replicated(mesh)
    features_step = jax.jit(features_step)
    heads_step = jax.jit(heads_step, out_shardings=repl)
    val_loader = pipeline.EvalLoader(settings.data, train.val_split, train.val_batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
    cached = None
    if towers_frozen:
        # The frozen towers see no augmentation at validation: compute their features once.
        t0 = time.time()
        cached = []
        for batch in val_loader:
            batch = sharding.shard_batch(batch, mesh, _EVAL_KEYS)
            cached.append((*features_step(frozen, batch), batch["mask"]))
        logging.info("validation features of %d batches cached in %.1f s", len(cached),
                     time.time() - t0)

    def batch_features(state):
        if cached is not None:
            yield from cached
            return
        params = partition.merge(state.params, frozen)
        for batch in val_loader:
            batch = sharding.shard_batch(batch, mesh, _EVAL_KEYS)
            yield (*features_step(params, batch), batch["mask"])

    def validate(state) -> dict[str, float]:
        per_batch = jax.device_get([heads_step(state.params, frozen, f_img, f_spec, mask)
                                    for f_img, f_spec, mask in batch_features(state)])
        # Batches weighted by their real (unpadded) rows.
        n = np.array([m["n_valid"] for m in per_batch])
        return {k: float(np.sum(np.array([m[k] for m in per_batch]) * n) / np.sum(n))
                for k in ("loss", "accuracy")}

    return validate
