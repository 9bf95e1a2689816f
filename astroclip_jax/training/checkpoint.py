"""Orbax checkpoints of what training changes, and restoring them anywhere.

    workdir/checkpoints/<step>/state   TrainState: trainable params, Adam state (with the
                                       current learning rate), step (which is also the data
                                       position), rng                         (Orbax arrays)
                               /meta    epoch, the trainer's schedule state (the plateau
                                        rule), val loss, the config           (JSON)
                               /metrics {"val_loss": ...}  (what "best" is ranked by)

Frozen towers are not saved: they are reloaded from their converted-weights directories
(or re-initialised from the seed) by `models.astroclip.build`.

One CheckpointManager keeps the union of two preservation policies: the latest
`keep` checkpoints (to resume) and the single best by validation loss (to evaluate), so the
best survives however long training runs on without improving. Orbax writes each
checkpoint into a temporary directory and renames it when complete, so a killed run leaves
either a whole checkpoint or none (leftover temporaries are cleaned on the next start).

`Checkpointer.restore(step)` without a target needs neither the training mesh nor the towers:
it rebuilds an abstract target from the checkpoint's own metadata, placed on one local device,
so a checkpoint written on N GPUs opens on one CPU (`evaluation/restore.py` builds on it).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

CHECKPOINT_DIR = "checkpoints"
_METRIC = "val_loss"


def _options(keep: int, read_only: bool = False) -> ocp.CheckpointManagerOptions:
    metric = lambda m: float(m[_METRIC])  # noqa: E731
    return ocp.CheckpointManagerOptions(
        best_fn=metric, best_mode="min",  # best_step() and writing the metrics item
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            # BestN sorts ascending and keeps the last n: reverse=True keeps the lowest loss.
            policies.BestN(get_metric_fn=metric, reverse=True, n=1),
        ]),
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only,
    )


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


class Checkpointer:
    """Save/restore TrainStates plus JSON metadata in `workdir/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoints in {workdir} ({self.directory} is missing)")
        # Handlers named up front so a fresh process can read metadata before any restore.
        self.manager = ocp.CheckpointManager(
            self.directory, options=_options(keep, read_only),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def step_for(self, which: str) -> int:
        """The step of "latest", "best", or a step number given as a string."""
        if which == "latest":
            step = self.latest_step()
        elif which == "best":
            step = self.best_step()
        else:
            step = int(which)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def save(self, state, meta: dict[str, Any], val_loss: float) -> None:
        """Save asynchronously (returns once the arrays are copied off the devices)."""
        step = int(jax.device_get(state.step))
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics={_METRIC: float(val_loss)})

    def restore(self, step: int, abstract_state=None) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of `step`, restored into `abstract_state`'s structure and shardings,
        or, without one, as the saved tree of nested dicts on this process's first device."""
        if abstract_state is None:
            abstract_state = self.abstract_state_from_metadata(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def abstract_state_from_metadata(self, step: int, device: jax.Device | None = None):
        """The saved tree (nested dicts) as ShapeDtypeStructs on one device."""
        tree = self.manager.item_metadata(step)["state"]
        if tree is None:
            raise FileNotFoundError(f"checkpoint {step} in {self.directory} has no state metadata")
        sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            getattr(tree, "tree", tree))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
