"""`--mode=pretrain_moco`: Stein et al.'s MoCo v2 on the images (the image tower).

    python main.py --config=configs/moco.py --mode=pretrain_moco --workdir=runs/moco

Reads top to bottom: settings -> mesh -> data (flux cutouts, host centre crop `moco.input_crop`)
-> the query encoder (random ResNet, or with `moco.kind` "dinov2_vit" a ViT, of `moco.size`
with its MLP head fc_0/fc_2) and its copy,
the momentum key encoder -> the step -> the shared loop (`loop.py`: resume, epochs,
checkpoints, metrics, figure) -> the tower directory (<workdir>/tower, of `moco.kind`, the
query encoder with its head), which configs/spender.py's `model.image_tower.weights` can name.

One step (moco2_module.py's order): two views of the batch on the device (moco_augment.view,
flux units, then ToRGB) -> key encoder <- m key + (1 - m) query (parameters only; its BatchNorm
statistics are its own) -> keys from the shuffled batch -> queries, the loss against the queue,
SGD (momentum, weight decay on every parameter) on a cosine schedule -> enqueue the keys.
The queue, its pointer, the key encoder and both encoders' BatchNorm statistics are in the
state, so the checkpoint holds them and a resumed run is bitwise the uninterrupted one.

Shuffle BN. MoCo computes BatchNorm statistics per GPU and shuffles the key batch across GPUs,
so a query and its key never share statistics (which would let the loss find the positive by
the batch it came from). Here the global batch is cut into `moco.bn_groups` equal groups, each
normalised by its own statistics (vmap over the groups; with groups a multiple of the device
count each group lies on one device of the data-sharded batch). Queries use the batch in its
order; keys are computed on a random permutation of the global batch (moving rows across groups,
hence across devices) and put back in order. The running statistics are the mean over the
groups of each group's torch-style update (MoCo keeps rank 0's; all ranks see alike data).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct

from astroclip_jax import settings as settings_lib
from astroclip_jax.data import pipeline, pretraining_records
from astroclip_jax.errors import ConfigError
from astroclip_jax.models import astroclip, resnet, tower_weights, vit
from astroclip_jax.training import loop, moco_augment, moco_losses, sharding
from astroclip_jax.training import metrics as metrics_lib

_AUGMENT_STREAM = 0
_VAL_STREAM = 1


class MocoState(struct.PyTreeNode):
    """Everything a MoCo step changes (all of it in the checkpoint)."""

    step: jax.Array  # int32: updates done; also the data position
    params: Any  # query encoder parameters (trained by SGD)
    batch_stats: Any  # query encoder BatchNorm running statistics
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32[2] base key; step keys are fold_in(rng, step)
    key_params: Any  # momentum key encoder parameters
    key_batch_stats: Any
    queue: jax.Array  # (K, D) normalised keys of the last K / N batches
    queue_ptr: jax.Array  # int32: the oldest row


def grouped_forward(model: resnet.ResNet, params, batch_stats, images: jax.Array, groups: int
                    ) -> tuple[jax.Array, Any]:
    """Head outputs (N, D) with BatchNorm statistics per group of N / groups consecutive rows,
    and the running statistics (the groups' updates averaged)."""
    grouped = images.reshape(groups, -1, *images.shape[1:])

    def one(x):
        out, new = model.apply({"params": params, "batch_stats": batch_stats}, x,
                               batch_norm_training=True, mutable=["batch_stats"])
        return out["head"], new.get("batch_stats", {})  # a ViT has no BatchNorm

    heads, stats = jax.vmap(one)(grouped)
    return heads.reshape(images.shape[0], -1), jax.tree.map(lambda s: jnp.mean(s, 0), stats)


def encoder(p: settings_lib.MocoSettings):
    """(the query encoder's module, the tower config its directory records, the head's width):
    Stein's ResNet with its MLP head, or a ViT with the same head on its CLS embedding."""
    if p.kind == "resnet":
        config = dict(resnet.SIZES[p.size])
        return resnet.ResNet(**config), config, config["head_out"]
    config = dict(vit.SIZES[p.size])
    # MoCo v2's head: the tower's width -> ReLU -> 128 (Stein's ResNet: 2048 -> 2048 -> 128).
    model = vit.MocoViT(**config, head_hidden=config["embed_dim"], head_out=MOCO_DIM)
    return model, config, MOCO_DIM


MOCO_DIM = 128


def make_optimizer(p: settings_lib.MocoSettings, train: settings_lib.TrainSettings,
                   steps_per_epoch: int) -> tuple[optax.GradientTransformation, Any]:
    """torch SGD (momentum, weight decay added to the gradient) on a cosine over the steps."""
    total = steps_per_epoch * (p.cosine_epochs or train.epochs)
    schedule = optax.cosine_decay_schedule(train.learning_rate, total)
    tx = optax.chain(optax.add_decayed_weights(p.weight_decay),
                     optax.sgd(schedule, momentum=p.sgd_momentum))
    return tx, schedule


def make_train_step(model, p: settings_lib.MocoSettings, tx, schedule,
                    aug: moco_augment.MocoAugment):
    def step(state: MocoState, images: jax.Array):
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), _AUGMENT_STREAM)
        k_q, k_k, k_perm = jax.random.split(key, 3)
        x_q, x_k = moco_augment.view(k_q, images, aug), moco_augment.view(k_k, images, aug)
        key_params = moco_losses.momentum_update(state.key_params, state.params,
                                                 p.encoder_momentum)
        perm = jax.random.permutation(k_perm, images.shape[0])
        k_shuffled, key_stats = grouped_forward(model, key_params, state.key_batch_stats,
                                                x_k[perm], p.bn_groups)
        k = moco_losses.normalise(k_shuffled)[jnp.argsort(perm)]

        def loss_fn(params):
            q, stats = grouped_forward(model, params, state.batch_stats, x_q, p.bn_groups)
            loss, acc = moco_losses.moco_loss(moco_losses.normalise(q), k, state.queue,
                                              p.temperature)
            return loss, (acc, stats)

        (loss, (acc, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        queue, ptr = moco_losses.enqueue(state.queue, state.queue_ptr, k)
        metrics = {"loss": loss, "accuracy": acc, "grad_norm": optax.global_norm(grads),
                   "learning_rate": schedule(state.step)}
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=stats, opt_state=opt_state, key_params=key_params,
                              key_batch_stats=key_stats, queue=queue, queue_ptr=ptr)
        return state, metrics
    return step


def run(settings: settings_lib.RunSettings, workdir: str) -> Any:
    """Pretrain (or resume) in `workdir`; writes the tower directory; the final state."""
    p, config_json = settings.moco, settings.config
    tower_dir = loop.tower_output(p.tower_dir, "moco.tower_dir", p.kind, workdir)
    with loop.work_directory(os.path.abspath(workdir), settings, "MoCo pretraining") as workdir:
        loop.check_resume(workdir, config_json)
        train, mesh = settings.train, loop.start_mesh(settings)
        return _train(config_json, settings, p, workdir, train, mesh, tower_dir)


def _train(config_json, settings, p, workdir, train, mesh, tower_dir):
    if p.bn_groups % jax.device_count():
        raise ConfigError(f"config field moco.bn_groups is {p.bn_groups}; expected a multiple "
                          f"of the {jax.device_count()} devices (one group on one device)")
    loop.prepare_data(settings.data)
    records = pretraining_records.ImageRecords(settings.data, train.train_split, p.input_crop,
                                               "moco.input_crop")
    loop.check_batch_fits(train, len(records))
    spe = pipeline.steps_per_epoch(len(records), train.batch_size)
    aug = moco_augment.MocoAugment(size=p.crop, jitter=p.jitter, rgb=settings.data.image_transform)

    loop.banner("model")
    model, config_dict, head_out = encoder(p)
    seed_key = jax.random.PRNGKey(settings.seed)
    tx, schedule = make_optimizer(p, train, spe)

    variables = astroclip.random_tower_variables(  # NumPy: no compile of the ResNet's init
        jax.eval_shape(model.init, seed_key, jnp.zeros((1, p.crop, p.crop, 3))), seed_key)

    def fresh() -> MocoState:
        params, stats = variables["params"], variables.get("batch_stats", {})
        queue = moco_losses.init_queue(jax.random.fold_in(seed_key, 2), p.queue_size, head_out)
        return MocoState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                         opt_state=tx.init(params), rng=jax.random.fold_in(seed_key, 1),
                         key_params=params, key_batch_stats=stats, queue=queue,
                         queue_ptr=jnp.zeros((), jnp.int32))

    abstract, state_sharding = loop.replicated_state(mesh, jax.eval_shape(fresh))
    step = jax.jit(make_train_step(model, p, tx, schedule, aug), donate_argnums=0,
                   in_shardings=(state_sharding, sharding.data_sharded(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)))
    batches = loop.step_batches(len(records), settings.seed, train.batch_size,
                                lambda indices, t: records.batch(indices))

    validate = _validation(settings, p, model, aug, mesh)
    trainer = loop.Trainer(
        abstract_state=abstract, init_state=lambda: sharding.replicate(fresh(), mesh),
        steps_per_epoch=spe, batches=batches,
        train_step=lambda state, images: step(state, sharding.shard_batch(
            {"image": images}, mesh)["image"]),
        validate=validate,
        curves=curves(p.queue_size),
        chance_loss=float(np.log(1 + p.queue_size)))
    state = loop.run(trainer, train, workdir, config_json)
    if loop.is_main_process():
        host = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        tower_weights.save_tower(
            tower_dir, p.kind, {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in config_dict.items()},
            jax.tree.map(np.asarray, host),
            source={"trained_by": "pretrain_moco", "workdir": workdir,
                    "step": int(jax.device_get(state.step))}, overwrite=True,
            what="config field moco.tower_dir")
        logging.info("wrote the MoCo-trained image tower to %s", tower_dir)
    return state


def _validation(settings, p, model, aug, mesh):
    """state -> MoCo loss and accuracy on the validation split's full batches: both encoders
    with their running statistics, two views drawn from a fixed key, the state's queue."""
    train = settings.train
    records = pretraining_records.ImageRecords(settings.data, train.val_split, p.input_crop,
                                               "moco.input_crop")
    size = train.val_batch_size
    cached = [b["image"] for b in loop.fixed_batches(
        len(records), size, lambda indices: {"image": records.batch(indices)}, mesh, pad=False)]
    if not cached:
        raise ConfigError(f"config field train.val_batch_size is {size} but split "
                          f"{train.val_split!r} has only {len(records)} examples")
    base = jax.random.fold_in(jax.random.PRNGKey(settings.seed), _VAL_STREAM)

    @jax.jit
    def one(state: MocoState, images, i):
        k_q, k_k = jax.random.split(jax.random.fold_in(base, i))
        q = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                        moco_augment.view(k_q, images, aug))["head"]
        k = model.apply({"params": state.key_params, "batch_stats": state.key_batch_stats},
                        moco_augment.view(k_k, images, aug))["head"]
        return moco_losses.moco_loss(moco_losses.normalise(q), moco_losses.normalise(k),
                                     state.queue, p.temperature)

    def validate(state) -> dict[str, float]:
        out = np.array([jax.device_get(one(state, b, i)) for i, b in enumerate(cached)])
        return {"loss": float(out[:, 0].mean()), "accuracy": float(out[:, 1].mean())}

    return validate


def curves(queue_size: int) -> metrics_lib.Curves:
    """Per-epoch MoCo loss (train, validation; chance log(1 + K)), top-1 accuracy of the
    positive among 1 + K, and the learning rate."""
    labels = {"train": "train (augmented, batch statistics)",
              "val": "validation (running statistics)"}
    return metrics_lib.Curves(title="MoCo v2 pretraining of the image tower", panels=(
        metrics_lib.Panel("MoCo loss (InfoNCE)", tuple((f"{split}/loss", label)
                                                       for split, label in labels.items()),
                          chance=(np.log(1 + queue_size), f"chance: log(1 + {queue_size})"),
                          height=2),
        metrics_lib.Panel("MoCo accuracy (top-1)", tuple((f"{split}/accuracy", label)
                                                         for split, label in labels.items())),
        metrics_lib.Panel("learning rate (cosine)", (("train/lr", None),), line="-")))
