"""The training loop every trainer shares: mesh, data preparation, resume or init, epochs,
checkpoints, metrics, the progress bar and the training-curve figure.

A trainer (`contrastive.py`; the tower-pretraining and supervised trainers join it) builds a
`Trainer`: its state's shapes, how to make a fresh state, its batches from a given step on,
its jitted step, its validation and its once-per-epoch schedule (the plateau rule). `run` does
the rest, the same way for every trainer:

    resume from the latest checkpoint (or init) -> batches from state.step
    -> for each epoch: steps (bar with loss, pairs/s, ETA) -> validate -> schedule
       -> metrics.jsonl + TensorBoard -> checkpoint (latest N + best by validation loss)
    -> training_curves.png

Deterministic given the seed: a trainer's step t draws its randomness from fold_in(rng, t) and
its batch from `data.pipeline.step_indices(..., t, ...)`, and a checkpoint holds the state
(whose step is the data position) and the schedule. So a run killed at any point and
restarted on the same work directory ends bitwise identical (on CPU) to one never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging as std_logging
import os
import time
from typing import Any, Callable, ContextManager, Iterator

import jax
import numpy as np
import tqdm
from absl import logging

from astroclip_jax import files, locks, processes
from astroclip_jax import settings as settings_lib
from astroclip_jax.data import pipeline
from astroclip_jax.data import prepare as prepare_lib
from astroclip_jax.errors import ConfigError, DamagedCheckpoint, TrainingDiverged
from astroclip_jax.models import tower_weights
from astroclip_jax.training import checkpoint as checkpoint_lib
from astroclip_jax.training import metrics as metrics_lib
from astroclip_jax.training import optimizer, sharding

Metrics = dict[str, Any]


def _schedule_unchanged(state, schedule, validation):
    return state, schedule


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What a trainer hands to `run`.

    Attributes:
      abstract_state: the state's ShapeDtypeStructs, with their shardings (restore target).
      init_state: () -> a fresh state (on the devices).
      steps_per_epoch: global steps per epoch.
      batches: start_step -> a context manager over the step inputs from that step on.
      train_step: (state, step input) -> (state, metrics); metrics hold "loss", "accuracy"
        and "learning_rate".
      validate: state -> {"loss": ..., ...} on the validation split.
      initial_schedule: the JSON-able schedule state of a fresh run (default: none).
      end_of_epoch: (state, schedule, validation metrics) -> (state, schedule) (default: both
        unchanged; the contrastive trainer's ReduceLROnPlateau is the one that uses it).
      curves: the end-of-run figure's panels (`metrics.Curves`); None draws the contrastive
        one (InfoNCE with its chance level).
      paper_curves: the contrastive figure also draws the reproduction paper's own run (only
        meaningful for the paper's model: ResNet + Spender towers).
    """

    abstract_state: Any
    init_state: Callable[[], Any]
    steps_per_epoch: int
    batches: Callable[[int], ContextManager[Iterator[Any]]]
    train_step: Callable[[Any, Any], tuple[Any, Metrics]]
    validate: Callable[[Any], dict[str, float]]
    initial_schedule: dict[str, Any] = dataclasses.field(default_factory=dict)
    end_of_epoch: Callable[[Any, dict[str, Any], dict[str, float]],
                           tuple[Any, dict[str, Any]]] = _schedule_unchanged
    curves: metrics_lib.Curves | None = None
    extra_metrics: tuple[str, ...] = ()  # step metrics also recorded per epoch as train/<name>
    chance_loss: float | None = None  # the loss of a blind guess, shown in the epoch log line
    paper_curves: bool = False


class _QuietOrbax(std_logging.Filter):
    """Orbax logs every file it writes at INFO; keep its warnings only."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def banner(title: str) -> None:
    logging.info("%s %s %s", "=" * 20, title, "=" * (56 - len(title)))


def is_main_process() -> bool:
    return jax.process_index() == 0


def start_mesh(settings: settings_lib.RunSettings) -> jax.sharding.Mesh:
    """Start the multi-process runtime if asked, and the data mesh over every device."""
    banner("mesh")
    logging.get_absl_logger().addFilter(_QuietOrbax())
    sharding.maybe_initialize_distributed(settings.multihost)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(settings.train.batch_size, mesh, "config field train.batch_size")
    sharding.check_batch_size(settings.train.val_batch_size, mesh,
                              "config field train.val_batch_size")
    logging.info("%d devices (%s) in %d processes; global batch %d", jax.device_count(),
                 jax.devices()[0].platform, jax.process_count(), settings.train.batch_size)
    return mesh


def prepare_data(data: settings_lib.DataSettings) -> None:
    """Prepare the dataset once (the first process), the others wait for it."""
    banner("data")
    if data.rebuild:
        raise ConfigError("config field data.rebuild applies to --mode=prepare: rebuild the "
                          "dataset there first, then train")
    if is_main_process():
        prepare_lib.prepare(data)  # no-op when prepared
    processes.barrier("dataset prepared")


CHANGES_FILE = "config_changes.jsonl"


@contextlib.contextmanager
def work_directory(workdir: str, settings: settings_lib.RunSettings,
                   purpose: str = "training") -> Iterator[str]:
    """Hold the work directory's writer lock (one training at a time; the first process of a
    multi-process run holds it for all) and clear what a killed run left half-written.

    Taken before any device is touched, so a second training stops within the seconds it
    takes to import: a lone process asks JAX nothing (that would start its backends)."""
    os.makedirs(workdir, exist_ok=True)
    if processes.wants_distributed(settings.multihost):
        sharding.maybe_initialize_distributed(settings.multihost)
        if not is_main_process():
            yield workdir
            return
    with locks.DirectoryLock(workdir, purpose):
        for path in files.remove_leftovers(workdir):
            logging.info("removed %s, left by an interrupted run", path)
        yield workdir


def check_resume(workdir: str, config_json: dict[str, Any]) -> None:
    """Before any expensive work: refuse to resume a run under a config that would make it
    another run (`settings.changes_on_resume` names the field and both values)."""
    if not os.path.isdir(os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR)):
        return
    ckpt = checkpoint_lib.Checkpointer(workdir, read_only=True)
    latest = ckpt.latest_step()
    if latest is not None:
        settings_lib.changes_on_resume(ckpt.restore_meta(latest)["config"], config_json)


def check_batch_fits(train: settings_lib.TrainSettings, num_records: int) -> None:
    """A global batch must fit in the training split (before any expensive work)."""
    if train.batch_size > num_records:
        raise ConfigError(f"config field train.batch_size is {train.batch_size} but split "
                          f"{train.train_split!r} has only {num_records} examples")


def _record_resume_changes(workdir: str, step: int, saved: dict[str, Any],
                           current: dict[str, Any]) -> None:
    """Refuse changes that would make another run; record the allowed ones with their step."""
    changes = settings_lib.changes_on_resume(saved, current)
    if not changes or not is_main_process():
        return
    path = os.path.join(workdir, CHANGES_FILE)
    with open(path, "a", encoding="utf-8") as f:
        for name, (was, now) in changes.items():
            logging.info("resuming at step %d with %s = %r (was %r)", step, name, now, was)
            f.write(json.dumps({"step": step, "field": name, "from": was, "to": now}) + "\n")


def _check_finite(metrics: Metrics, step: int, ckpt: checkpoint_lib.Checkpointer) -> None:
    bad = [k for k in ("loss", "grad_norm") if k in metrics and not np.isfinite(metrics[k])]
    if bad:
        last_good = ckpt.latest_step()
        where = (f"the last good checkpoint is step {last_good} in {ckpt.directory}"
                 if last_good is not None else f"no checkpoint was written in {ckpt.directory}")
        raise TrainingDiverged(
            f"step {step}: {' and '.join(bad)} became {float(metrics[bad[0]])}; training stopped "
            f"and nothing after the last epoch was saved ({where}); lower the learning rate or "
            "check the data")


def _truncate_metrics(workdir: str, epoch: int) -> None:
    """Forget metric records of epochs after the checkpoint we resume from (they will be redone)."""
    path = os.path.join(workdir, metrics_lib.METRICS_FILE)
    if not os.path.exists(path):
        return
    keep = [r for r in metrics_lib.read_metrics(path) if r.get("epoch", 0) <= epoch]
    with files.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)


def _mean_metrics(per_step: list[Metrics]) -> dict[str, float]:
    """Per-key means of an epoch's step metrics (already on the host)."""
    return {k: float(np.mean([m[k] for m in per_step])) for k in per_step[0]}


def _advance(bar, metrics, done: int, epoch: int, t_epoch: float, batch_size: int,
             log_every: int, ckpt: checkpoint_lib.Checkpointer) -> None:
    """Wait for a step's metrics, stop on a non-finite loss or gradient, then tick the bar
    (and show loss and pairs/s now and then); the metrics, on the host."""
    metrics = jax.device_get(metrics)
    _check_finite(metrics, bar.n + 1, ckpt)
    bar.update(1)
    if done % log_every == 0 or done == 1:
        pairs_per_s = done * batch_size / (time.time() - t_epoch)
        bar.set_postfix(epoch=epoch + 1, loss=f"{float(metrics['loss']):.4f}",
                        pairs_s=f"{pairs_per_s:.0f}")
    return metrics


def run(trainer: Trainer, train: settings_lib.TrainSettings, workdir: str,
        config_json: dict[str, Any]) -> Any:
    """Train (or resume training) in `workdir` until `train.epochs`; the final state.
    The caller holds the work directory (`work_directory`)."""
    spe = trainer.steps_per_epoch
    total_steps = spe * train.epochs

    banner("resume or init")
    ckpt = checkpoint_lib.Checkpointer(workdir, keep=train.keep_checkpoints)
    try:
        return _run(trainer, train, workdir, config_json, ckpt, spe, total_steps)
    finally:
        ckpt.close()  # finishes (and seals) the last good save, whatever stopped the run


def _run(trainer, train, workdir, config_json, ckpt, spe, total_steps):
    latest = ckpt.latest_step()
    if latest is None and ckpt.damaged:
        raise DamagedCheckpoint(
            f"no intact checkpoint in {ckpt.directory} to resume from: " + "; ".join(
                f"step {s}: {p}" for s, p in sorted(ckpt.damaged.items())) +
            f" (set aside in {os.path.join(workdir, checkpoint_lib.DAMAGED_DIR)}; move them "
            "away to start afresh)")
    if latest is not None:
        meta = ckpt.restore_meta(latest)
        _record_resume_changes(workdir, latest, meta["config"], config_json)
        if meta["steps_per_epoch"] != spe:
            raise ConfigError(f"checkpoint step {latest} in {ckpt.directory} has "
                              f"{meta['steps_per_epoch']} steps per epoch, the data now gives "
                              f"{spe}: the dataset changed (train in a new work directory)")
        state, meta = ckpt.restore(latest, trainer.abstract_state)
        epoch0, schedule = meta["epoch"], meta["schedule"]
        logging.info("resumed from %s: step %d, epoch %d", ckpt.directory, latest, epoch0)
    else:
        state, epoch0, schedule = trainer.init_state(), 0, dict(trainer.initial_schedule)
        logging.info("fresh start in %s", workdir)
    if is_main_process():
        _truncate_metrics(workdir, epoch0)
        with files.atomic_path(os.path.join(workdir, "config.json")) as tmp, \
                open(tmp, "w", encoding="utf-8") as f:
            json.dump(config_json, f, indent=2)

    banner("train")
    writer = metrics_lib.MetricWriter(workdir) if is_main_process() else None
    bar = tqdm.tqdm(total=total_steps, initial=epoch0 * spe, unit="step", dynamic_ncols=True,
                    disable=not is_main_process())
    # The data position is the state's step: a resumed run (or one that switched between the
    # online and the cached step) continues the same order.
    with trainer.batches(int(jax.device_get(state.step))) as batches:
        for epoch in range(epoch0, train.epochs):
            t_epoch, per_step = time.time(), []
            for i in range(spe):
                state, step_metrics = trainer.train_step(state, next(batches))
                per_step.append(step_metrics)
                # Count a step once it has run (not when dispatched), keeping one step in
                # flight so the host prepares the next batch while the devices compute.
                if i > 0:
                    per_step[-2] = _advance(bar, per_step[-2], i, epoch, t_epoch,
                                            train.batch_size, train.log_every_steps, ckpt)
            per_step[-1] = _advance(bar, per_step[-1], spe, epoch, t_epoch, train.batch_size,
                                    train.log_every_steps, ckpt)
            train_metrics = _mean_metrics(per_step)
            epoch_s = time.time() - t_epoch
            val = trainer.validate(state)
            if not np.isfinite(val["loss"]):
                _check_finite({"loss": val["loss"]}, bar.n, ckpt)
            state, schedule = trainer.end_of_epoch(state, schedule, val)
            step = int(jax.device_get(state.step))
            record = {"epoch": epoch + 1, "train/loss": train_metrics["loss"],
                      "train/accuracy": train_metrics.get("accuracy"), "val/loss": val["loss"],
                      "val/accuracy": val.get("accuracy"), "train/lr": train_metrics["learning_rate"],
                      "batch_size": train.batch_size,
                      "pairs_per_s": spe * train.batch_size / epoch_s, "epoch_s": epoch_s}
            # A trainer without an accuracy (the autoencoder) records none; its own loss parts
            # ("train/<part>" for each other metric it lists in `extra_metrics`) go along.
            record = {k: v for k, v in record.items() if v is not None}
            record.update({f"train/{k}": train_metrics[k] for k in trainer.extra_metrics})
            chance = ("" if trainer.chance_loss is None
                      else f" (chance {trainer.chance_loss:.3f})")
            logging.info("epoch %d/%d step %d: train %.4f val %.4f%s lr %.3g, %.1f s",
                         epoch + 1, train.epochs, step, train_metrics["loss"], val["loss"],
                         chance, train_metrics["learning_rate"], epoch_s)
            if writer is not None:
                writer.write(step, record)
            ckpt.save(state, {"epoch": epoch + 1, "step": step, "steps_per_epoch": spe,
                              "schedule": schedule, "val_loss": val["loss"],
                              "config": config_json},
                      val_loss=val["loss"])
    bar.close()
    ckpt.wait()
    best = ckpt.best_step()

    if writer is not None:
        writer.close()
        out = os.path.join(workdir, "training_curves.png")
        metrics_path = os.path.join(workdir, metrics_lib.METRICS_FILE)
        if trainer.curves is not None:
            metrics_lib.plot_curves(metrics_path, out, trainer.curves)
        else:
            metrics_lib.plot_training_curves(metrics_path, out, reference=trainer.paper_curves,
                                             batch_size=train.batch_size)
        logging.info("best checkpoint: step %s; figure %s", best, out)
    return state


def no_cleanup(iterator: Iterator[Any]) -> ContextManager[Iterator[Any]]:
    """A batches context for iterators that own nothing to close."""
    return contextlib.nullcontext(iterator)


# ------------------------------------------------------------------ what every trainer builds

TOWER_DIR = "tower"  # where a pretrainer writes its tower unless its `tower_dir` says


def tower_output(setting: str | None, field: str, kind: str, workdir: str) -> str:
    """Where a pretrainer writes its tower of `kind`: `setting` (config field `field`), else
    <workdir>/tower. Checked before any work (`files.check_output_location`): a setting that
    names the work directory, a folder holding it, or a folder that is not an earlier tower
    of this kind stops here, in one line, and nothing of it is touched."""
    workdir = os.path.abspath(workdir)
    return files.check_output_location(setting or os.path.join(workdir, TOWER_DIR),
                                       tower_weights.output_kind(kind), f"config field {field}",
                                       workdir)


def start_with_records(settings: settings_lib.RunSettings, records_of: Callable[[str], Any]
                       ) -> tuple[jax.sharding.Mesh, Any, int]:
    """A pretrainer's start: (the mesh, its training split's records, steps per epoch), the
    dataset prepared and the batch checked against the split."""
    train = settings.train
    mesh = start_mesh(settings)
    prepare_data(settings.data)
    records = records_of(train.train_split)
    check_batch_fits(train, len(records))
    return mesh, records, pipeline.steps_per_epoch(len(records), train.batch_size)


def replicated_state(mesh: jax.sharding.Mesh, shapes: Any) -> tuple[Any, Any]:
    """(the restore target, the shardings) of a state replicated on every device, from its
    shapes (`jax.eval_shape`): the ShapeDtypeStructs carry the replicated sharding."""
    repl = sharding.replicated(mesh)
    shardings = jax.tree.map(lambda _: repl, shapes)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                            shapes)
    return abstract, shardings


def replicated_train_state(mesh: jax.sharding.Mesh, tx, params: Any, rng: jax.Array
                           ) -> tuple[Any, Any, Callable[[], Any]]:
    """(the restore target, the shardings, a fresh-state function) of an
    `optimizer.TrainState` over `params`, replicated on every device."""
    abstract, shardings = replicated_state(mesh, jax.eval_shape(
        lambda q, k: optimizer.init_state(tx, q, k), params, rng))
    init = jax.jit(lambda q, k: optimizer.init_state(tx, q, k), out_shardings=shardings)
    params = sharding.replicate(params, mesh)
    return abstract, shardings, lambda: init(params, rng)


def step_batches(num_records: int, seed: int, batch_size: int,
                 read: Callable[[np.ndarray, int], Any], rows: slice | None = None
                 ) -> Callable[[int], ContextManager[Iterator[Any]]]:
    """A `Trainer.batches`: from a start step on, step t's input is `read(indices, t)` of
    this process's `rows` (default: its share, `pipeline.process_rows`) of the records
    `pipeline.step_indices` draws for t. So the input of a step depends on its number only,
    and a resumed run reads what the uninterrupted one read."""
    if rows is None:
        rows = pipeline.process_rows(batch_size, jax.process_index(), jax.process_count())

    def batches(start: int) -> ContextManager[Iterator[Any]]:
        return no_cleanup(read(pipeline.step_indices(num_records, seed, t, batch_size)[rows], t)
                          for t in itertools.count(start))

    return batches


def fixed_batches(num_records: int, size: int, read: Callable[[np.ndarray], dict[str, Any]],
                  mesh: jax.sharding.Mesh | None = None, pad: bool = True) -> list[dict[str, Any]]:
    """Validation inputs, read once (they never change): `read` of consecutive blocks of
    `size` records; with a `mesh` this process's rows of each, sharded, else whole batches
    on the host (a one-device trainer). With `pad` the last block is completed by repeating
    the last record and each batch carries "mask" (1 for a real row); without, only whole
    blocks (possibly none: the caller says why that cannot work)."""
    rows = (slice(None) if mesh is None
            else pipeline.process_rows(size, jax.process_index(), jax.process_count()))
    last = num_records if pad else num_records - size + 1
    out = []
    for start in range(0, max(last, 0), size):
        idx = np.arange(start, start + size)
        batch = dict(read(np.minimum(idx, num_records - 1)[rows]))
        if pad:
            batch["mask"] = (idx < num_records)[rows].astype(np.float32)
        out.append(batch if mesh is None else sharding.shard_batch(batch, mesh))
    return out
