"""`--mode=pretrain_spender`: Spender's autoencoder trained on the spectra (the spectrum tower).

    python main.py --config=configs/spender_pretrain.py --mode=pretrain_spender --workdir=runs/spender_ae

Reads top to bottom: settings -> mesh -> data (flux spectra, spender's normalisation, weights
from the dataset's ivar, else the per-pixel DESI std, with sky lines masked,
`data/spender_inputs.py`) -> the autoencoder
(random, or `spender_pretrain.init_from` a converted hub model to fine-tune) -> the step
(fidelity [+ similarity] [+ consistency on redshift-augmented copies], clipped gradients,
Adam with torch's OneCycleLR stepped per epoch and its beta1 cycle) -> the shared loop
(`loop.py`: resume, epochs, checkpoints, metrics, figure) -> the tower directory
(<workdir>/tower: encoder as kind "spender" + decoder/), which configs/spender.py's
`model.spectrum_tower.weights` can name.

Losses are spender's sums over the batch; the metrics show them per spectrum. Validation is
the fidelity loss per spectrum on the validation split (deterministic: no augmentation).
Step t draws its augmentation from fold_in(rng, t) and its rows from `pipeline.step_indices`,
so a resumed run ends bitwise identical to one never interrupted.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from astroclip_jax import wavelength_grids
from astroclip_jax import settings as settings_lib
from astroclip_jax.data import pretraining_records
from astroclip_jax.errors import ConfigError
from astroclip_jax.models import spender as spender_model
from astroclip_jax.models import spender_autoencoder as ae
from astroclip_jax.training import loop, optimizer, sharding, spender_recipe
from astroclip_jax.training import metrics as metrics_lib

_KEYS = ("spectrum", "weights", "z")
_AUGMENT_STREAM = 0


def build_autoencoder(p: settings_lib.SpenderPretrainSettings, grid: str, rng: jax.Array
                      ) -> tuple[ae.Autoencoder, Any]:
    """A fresh autoencoder on `grid` at the configured sizes, or the one in `init_from`."""
    wave_obs = wavelength_grids.wave(grid)
    if p.init_from:
        model, params = ae.load_autoencoder(p.init_from)
        if model.wave_obs.shape != wave_obs.shape or not np.allclose(model.wave_obs, wave_obs,
                                                                     atol=1e-3, rtol=0):
            raise ConfigError(f"config field spender_pretrain.init_from: {p.init_from} was "
                              f"trained on another grid than data.grid={grid!r}")
        return model, params
    wave_rest = ae.restframe_grid(wave_obs, p.z_max, p.restframe_bins or None)
    model = ae.Autoencoder(
        encoder=spender_model.SpectrumEncoder(**spender_model.SIZES[p.encoder_size]),
        decoder=ae.SpectrumDecoder(n_rest=len(wave_rest), hidden=ae.DECODER_SIZES[p.decoder_size],
                                   activation=p.activation),
        wave_rest=wave_rest, wave_obs=wave_obs)
    return model, model.init(rng)


def make_optimizer(train: settings_lib.TrainSettings, clip_norm: float, steps_per_epoch: int,
                   per: str = "epoch") -> optax.GradientTransformation:
    """Clip, then Adam whose lr and beta1 follow OneCycleLR over the epochs (stepped once an
    epoch, as upstream) or over all steps (`per="step"`: a run of a few epochs)."""
    div, total = ((steps_per_epoch, train.epochs) if per == "epoch"
                  else (1, steps_per_epoch * train.epochs))

    def at(count, which):
        return spender_recipe.one_cycle(count // div, total, train.learning_rate)[which]

    adam = optax.inject_hyperparams(optax.adam)(
        learning_rate=lambda count: at(count, 0), b1=lambda count: at(count, 1),
        b2=train.adam_b2, eps=train.adam_eps)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adam)


def losses(model: ae.Autoencoder, p: settings_lib.SpenderPretrainSettings, params, batch,
           key: jax.Array, slope: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """spender's `get_losses` and their weighted sum (sums over the batch)."""
    y, w, z = batch["spectrum"], batch["weights"], batch["z"]
    s, restframe, recon, valid = model.forward(params, y, z)
    fidelity = ae.fidelity_loss(y, w * valid, recon)
    total, parts = fidelity, {"fidelity": fidelity}
    if p.similarity:
        sim = spender_recipe.similarity_restframe_loss(restframe, s, model.wave_rest, slope)
        total, parts["similarity"] = total + p.similarity_amp * sim, sim
    if p.consistency:
        y_aug, _, _ = spender_recipe.augment_redshift(key, y, w, z, model.wave_obs, p.augment_z_max)
        cons = spender_recipe.consistency_loss(s, model.encode(params, y_aug))
        total, parts["consistency"] = total + p.consistency_amp * cons, cons
    return total, parts


def make_train_step(model, p, tx):
    def step(state: optimizer.TrainState, batch):
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), _AUGMENT_STREAM)
        (loss, parts), grads = jax.value_and_grad(
            lambda params: losses(model, p, params, batch, key, batch["slope"]), has_aux=True)(
                state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        n = batch["spectrum"].shape[0]
        metrics = {"loss": loss / n, "grad_norm": optax.global_norm(grads),
                   "learning_rate": opt_state[1].hyperparams["learning_rate"],
                   **{k: v / n for k, v in parts.items()}}
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
        return state, metrics
    return step


def run(settings: settings_lib.RunSettings, workdir: str) -> Any:
    """Pretrain (or resume) in `workdir`; writes the tower directory; the final state."""
    p = settings.spender_pretrain
    tower_dir = loop.tower_output(p.tower_dir, "spender_pretrain.tower_dir", "spender", workdir)
    with loop.work_directory(os.path.abspath(workdir), settings, "spender pretraining") as workdir:
        loop.check_resume(workdir, settings.config)
        return _train(settings, p, workdir, tower_dir)


def _train(settings, p, workdir, tower_dir):
    train = settings.train
    mesh, records, spe = loop.start_with_records(
        settings, lambda split: pretraining_records.SpectraRecords(settings.data, split))

    loop.banner("model")
    seed_key = jax.random.PRNGKey(settings.seed)
    model, params = build_autoencoder(p, settings.data.grid, seed_key)
    tx = make_optimizer(train, p.clip_norm, spe, p.schedule_per)
    state_rng = jax.random.fold_in(seed_key, 1)

    abstract, state_sharding, fresh = loop.replicated_train_state(mesh, tx, params, state_rng)
    step = jax.jit(make_train_step(model, p, tx), donate_argnums=0,
                   in_shardings=(state_sharding, None),
                   out_shardings=(state_sharding, sharding.replicated(mesh)))

    def train_step(state, batch):
        slope = batch.pop("slope")
        sharded = sharding.shard_batch(batch, mesh, _KEYS)
        return step(state, {**sharded, "slope": jnp.float32(slope)})

    def read(indices, t):
        out = records.batch(indices)
        out["slope"] = spender_recipe.similarity_slope(t // spe, train.epochs)
        return out

    validate = _validation(settings, model, mesh)
    trainer = loop.Trainer(
        abstract_state=abstract, init_state=fresh,
        steps_per_epoch=spe, train_step=train_step,
        batches=loop.step_batches(len(records), settings.seed, train.batch_size, read),
        validate=lambda state: validate(state.params),
        curves=curves(_parts(p)), extra_metrics=_parts(p))
    state = loop.run(trainer, train, workdir, settings.config)
    if loop.is_main_process():
        write_tower(tower_dir, model, jax.device_get(state.params),
                    {"trained_by": "pretrain_spender", "workdir": workdir,
                     "step": int(jax.device_get(state.step))},
                    what="config field spender_pretrain.tower_dir")
        logging.info("wrote the trained Spender tower to %s", tower_dir)
    return state


def _parts(p: settings_lib.SpenderPretrainSettings) -> tuple[str, ...]:
    return ("fidelity", *(("similarity",) if p.similarity else ()),
            *(("consistency",) if p.consistency else ()))


def curves(parts: tuple[str, ...]) -> metrics_lib.Curves:
    """Per-epoch losses per spectrum (train total and parts, validation fidelity; log) and
    the learning rate."""
    return metrics_lib.Curves(title="Spender autoencoder pretraining", figsize=(7, 6), panels=(
        metrics_lib.Panel("loss per spectrum", (
            ("train/loss", "train: total"), ("val/loss", "validation: fidelity"),
            *((f"train/{part}", f"train: {part}") for part in sorted(parts))),
            log=True, height=2),
        metrics_lib.Panel("learning rate (one-cycle)", (("train/lr", None),), line="-")))


def _validation(settings, model, mesh):
    """params -> {"loss": fidelity per spectrum} over the validation split (fixed batches)."""
    train = settings.train
    records = pretraining_records.SpectraRecords(settings.data, train.val_split)
    n = len(records)
    per = jax.jit(lambda params, b: jnp.sum(
        model.loss(params, b["spectrum"], b["weights"], b["z"], individual=True) * b["mask"]),
        out_shardings=sharding.replicated(mesh))
    cached = loop.fixed_batches(n, train.val_batch_size, records.batch, mesh)

    def validate(params) -> dict[str, float]:
        total = sum(float(per(params, b)) for b in cached)
        return {"loss": total / n}

    return validate


def write_tower(out_dir: str, model: ae.Autoencoder, params, source: dict[str, Any],
                what: str = "output directory") -> str:
    """Encoder (kind "spender", extra wave_obs) + decoder/ in one atomic directory."""
    host = jax.tree.map(np.asarray, params)
    enc_config = {k: list(v) if isinstance(v, tuple) else v for k, v in
                  dict(filters=model.encoder.filters, kernels=model.encoder.kernels,
                       pools=model.encoder.pools, mlp_hidden=model.encoder.mlp_hidden,
                       n_latent=model.encoder.n_latent, dropout=model.encoder.dropout).items()}
    dec_config = dict(n_rest=model.decoder.n_rest, hidden=list(model.decoder.hidden),
                      activation=model.decoder.activation)
    dec_extras = {"wave_rest": np.asarray(model.wave_rest),
                  **({} if model.lsf is None else {"lsf": np.asarray(model.lsf)})}
    ae.save_autoencoder(out_dir,
                        (enc_config, host["encoder"], {"wave_obs": np.asarray(model.wave_obs)}),
                        (dec_config, host["decoder"], dec_extras), source, what)
    return out_dir
