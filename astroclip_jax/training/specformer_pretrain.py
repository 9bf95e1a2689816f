"""`--mode=pretrain_specformer`: SpecFormer's masked-chunk modelling (the released AstroCLIP's
spectrum tower, PolymathicAI/AstroCLIP `astroclip/models/specformer.py`, configs/specformer.yaml).

    python main.py --config=configs/specformer_pretrain.py --mode=pretrain_specformer --workdir=runs/specformer

Reads top to bottom: settings -> mesh -> data (raw flux spectra: SpecFormer standardises each
itself) -> the model (random init at `specformer_pretrain.size`) -> the step (tokenise, zero
`mask_chunks` chunks of `mask_width` tokens, reconstruct; MSE on the masked values over their
share, as upstream) -> AdamW with warmup and cosine (`train.schedule`, upstream's recipe) -> the
shared loop (resume, epochs, checkpoints, metrics, figure) -> the tower directory (kind
"specformer", <workdir>/tower unless `specformer_pretrain.tower_dir`), which
configs/astroclip.py's `model.spectrum_tower.weights` can name.

Step t masks with fold_in(rng, t) and reads the rows `pipeline.step_indices` draws for t, so a
resumed run ends bitwise identical to one never interrupted. Validation masks each fixed batch
with a fixed key: the same masks every epoch.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from astroclip_jax import settings as settings_lib
from astroclip_jax.data import pipeline
from astroclip_jax.errors import ConfigError
from astroclip_jax.models import specformer, tower_weights
from astroclip_jax.training import loop, optimizer, sharding
from astroclip_jax.training import metrics as metrics_lib

_MASK_STREAM = 0
_VAL_STREAM = 3


def masked_modelling_loss(model: specformer.SpecFormer, params, spectra: jax.Array,
                          key: jax.Array, n_chunks: int, width: int) -> jax.Array:
    """Upstream's training loss: tokens of the spectra, `n_chunks` chunks of `width` tokens
    zeroed, the model's reconstruction of all tokens; the squared error on the values the mask
    changed (a value already 0 does not count), averaged over all values and divided by the
    changed share: mse(out * locs, target * locs) / mean(locs)."""
    target = specformer.tokenize(spectra, model.slice_section_length, model.slice_overlap)
    masked = specformer.mask_chunks(key, target, n_chunks, width)
    out = model.apply(params, masked, method=specformer.SpecFormer.reconstruct)
    locs = (masked != target).astype(out.dtype)
    return jnp.mean(jnp.square(out * locs - target * locs)) / jnp.mean(locs)


def make_train_step(model, p: settings_lib.SpecformerPretrainSettings, tx):
    def step(state: optimizer.TrainState, spectra):
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), _MASK_STREAM)
        loss, grads = jax.value_and_grad(lambda params: masked_modelling_loss(
            model, params, spectra, key, p.mask_chunks, p.mask_width))(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                   "learning_rate": opt_state.hyperparams["learning_rate"]}
        return state.replace(step=state.step + 1, opt_state=opt_state,
                             params=optax.apply_updates(state.params, updates)), metrics
    return step


class FluxRecords:
    """Raw flux spectra of one split: `batch(indices)` -> (B, L) float32."""

    def __init__(self, data: settings_lib.DataSettings, split: str):
        self._source = pipeline.data_source(data, split)

    def __len__(self) -> int:
        return len(self._source)

    def batch(self, indices) -> np.ndarray:
        spectra = pipeline.read_records(self._source, indices, ("spectrum",))["spectrum"]
        return np.ascontiguousarray(spectra, np.float32)


def run(settings: settings_lib.RunSettings, workdir: str) -> Any:
    """Pretrain (or resume) in `workdir`; writes the tower directory; the final state."""
    p = settings.specformer_pretrain
    tower_dir = loop.tower_output(p.tower_dir, "specformer_pretrain.tower_dir", "specformer",
                                  workdir)
    with loop.work_directory(os.path.abspath(workdir), settings, "SpecFormer pretraining"
                             ) as workdir:
        loop.check_resume(workdir, settings.config)
        return _train(settings, p, workdir, tower_dir)


def _train(settings, p, workdir, tower_dir):
    train = settings.train
    mesh, records, spe = loop.start_with_records(
        settings, lambda split: FluxRecords(settings.data, split))

    loop.banner("model")
    seed_key = jax.random.PRNGKey(settings.seed)
    config = dict(specformer.SIZES[p.size])
    model = specformer.SpecFormer(**config)
    params = jax.jit(model.init)(seed_key, jnp.zeros((1, settings.model.spectrum_length)))
    tx = optimizer.make_optimizer(train, spe)
    state_rng = jax.random.fold_in(seed_key, 1)
    abstract, state_sharding, fresh = loop.replicated_train_state(mesh, tx, params, state_rng)
    step = jax.jit(make_train_step(model, p, tx), donate_argnums=0,
                   in_shardings=(state_sharding, sharding.data_sharded(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)))

    def train_step(state, spectra):
        return step(state, sharding.shard_batch({"spectrum": spectra}, mesh)["spectrum"])

    validate = _validation(settings, p, model, mesh, records_split=train.val_split)
    trainer = loop.Trainer(
        abstract_state=abstract, init_state=fresh,
        steps_per_epoch=spe, train_step=train_step,
        batches=loop.step_batches(len(records), settings.seed, train.batch_size,
                                  lambda indices, t: records.batch(indices)),
        validate=lambda state: validate(state.params), curves=CURVES)
    state = loop.run(trainer, train, workdir, settings.config)
    if loop.is_main_process():
        tower_weights.save_tower(
            tower_dir, "specformer", config, jax.tree.map(np.asarray, jax.device_get(state.params)),
            source={"trained_by": "pretrain_specformer", "step": int(jax.device_get(state.step))},
            overwrite=True, what="config field specformer_pretrain.tower_dir")
        logging.info("wrote the trained SpecFormer tower to %s", tower_dir)
    return state


CURVES = metrics_lib.Curves(
    title="SpecFormer masked-chunk pretraining",
    panels=(metrics_lib.Panel("masked MSE / masked share", (("train/loss", "train"),
                                                            ("val/loss", "validation")), log=True,
                              height=2),
            metrics_lib.Panel("learning rate", (("train/lr", "warmup + cosine"),), line="-")))


def _validation(settings, p, model, mesh, records_split):
    """params -> {"loss"}: the mean masked loss over the validation split's whole batches,
    each masked with its own fixed key (the same masks every epoch)."""
    records = FluxRecords(settings.data, records_split)
    size = settings.train.val_batch_size
    batches = loop.fixed_batches(len(records), size, lambda idx: {"spectrum": records.batch(idx)},
                                 mesh, pad=False)
    if not batches:
        raise ConfigError(f"config field train.val_batch_size is {size} but split "
                          f"{records_split!r} has only {len(records)} spectra")
    base = jax.random.fold_in(jax.random.PRNGKey(settings.seed), _VAL_STREAM)
    loss = jax.jit(lambda params, spectra, i: masked_modelling_loss(
        model, params, spectra, jax.random.fold_in(base, i), p.mask_chunks, p.mask_width),
        out_shardings=sharding.replicated(mesh))

    def validate(params) -> dict[str, float]:
        values = [float(loss(params, b["spectrum"], i)) for i, b in enumerate(batches)]
        return {"loss": float(np.mean(values))}

    return validate
