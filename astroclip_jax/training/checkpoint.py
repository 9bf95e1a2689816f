"""Orbax checkpoints of what training changes, verified, and restoring them anywhere.

    workdir/checkpoints/<step>/state   TrainState: trainable params, Adam state (with the
                                       current learning rate), step (which is also the data
                                       position), rng                         (Orbax arrays)
                               /meta    epoch, the trainer's schedule state (the plateau
                                        rule), val loss, the config           (JSON)
                               /metrics {"val_loss": ...}  (what "best" is ranked by)
                               /checksums.json  size and sha256 of every file above

Frozen towers are not saved: they are reloaded from their converted-weights directories
(or re-initialised from the seed) by `models.astroclip.build`.

One CheckpointManager keeps the union of two preservation policies: the latest `keep`
checkpoints (to resume) and the single best by validation loss (to evaluate), so the best
survives however long training runs on without improving. Orbax writes each checkpoint into a
temporary directory and renames it when complete; once the (asynchronous) write has finished,
`checksums.json` seals the step. A step is used only when every file it lists is there with its
size and checksum: a truncated or garbage file, a deleted one, an empty or unsealed step, a
flipped bit are each reported in one line, and the newest intact step is used instead. A
writer moves damaged steps to `checkpoints.damaged/` before Orbax reads anything (so one bad
step cannot stop its start-up); a reader (evaluation) leaves them where they are.

`Checkpointer.restore(step)` without a target needs neither the training mesh nor the towers:
it rebuilds an abstract target from the checkpoint's own metadata, placed on one local device,
so a checkpoint written on N GPUs opens on one CPU (`evaluation/restore.py` builds on it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from astroclip_jax import files, processes
from astroclip_jax.errors import DamagedCheckpoint, MissingInput

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints.damaged"
CHECKSUMS_FILE = "checksums.json"
_METRIC = "val_loss"


def _rank(metrics: dict[str, Any]) -> float:
    """The value "best" minimises; a non-finite loss is never best."""
    value = float(metrics[_METRIC])
    return value if math.isfinite(value) else math.inf


def _options(keep: int) -> ocp.CheckpointManagerOptions:
    return ocp.CheckpointManagerOptions(
        best_fn=_rank, best_mode="min",  # writing the metrics item
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            # BestN sorts ascending and keeps the last n: reverse=True keeps the lowest loss.
            policies.BestN(get_metric_fn=_rank, reverse=True, n=1),
        ]),
        cleanup_tmp_directories=True,
    )


# ------------------------------------------------------------------------------- integrity

def seal(step_dir: str) -> None:
    """Record the size and sha256 of every file of a finished step (atomically)."""
    files.seal(step_dir, CHECKSUMS_FILE)


def damage(step_dir: str) -> str | None:
    """What is wrong with a step directory, or None when it is intact."""
    return files.damage(step_dir, CHECKSUMS_FILE)


def _meta_of(step_dir: str) -> dict[str, Any]:
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------- the store

class Checkpointer:
    """Save/restore TrainStates plus JSON metadata in `workdir/checkpoints`, verified.

    `read_only` (evaluation, a notebook): nothing is written or moved, and Orbax's manager is
    never started; the steps are read directly.
    """

    def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
        if read_only and not os.path.isdir(self.directory):
            raise MissingInput(f"no checkpoints in {workdir} ({self.directory} is missing)")
        self.damaged: dict[int, str] = {}
        self._val_loss: dict[int, float] = {}
        self._scan()
        self.manager = None
        self._pending: int | None = None
        if not read_only:
            self._set_aside_damaged()
            # Handlers named up front so a fresh process can read metadata before any restore.
            self.manager = ocp.CheckpointManager(
                self.directory, options=_options(keep),
                item_handlers={"state": ocp.StandardCheckpointHandler(),
                               "meta": ocp.JsonCheckpointHandler()})
        self._reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler(
            state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler(),
            metrics=ocp.JsonCheckpointHandler()))

    # ---------------------------------------------------------------- which steps
    def _scan(self) -> None:
        if not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if not (name.isdigit() and os.path.isdir(path)):
                continue
            problem = damage(path)
            if problem is None:
                try:
                    self._val_loss[int(name)] = float(_meta_of(path)[_METRIC])
                    continue
                except (OSError, ValueError, KeyError, TypeError):
                    problem = "meta/metadata is unreadable"
            self.damaged[int(name)] = problem
            logging.warning("checkpoint step %s in %s is damaged (%s): not used", name,
                            self.directory, problem)

    def _set_aside_damaged(self) -> None:
        """Move damaged steps out of Orbax's sight (kept for inspection, never deleted)."""
        if jax.process_index() == 0 and self.damaged:
            aside = os.path.join(self.workdir, DAMAGED_DIR)
            os.makedirs(aside, exist_ok=True)
            for step in self.damaged:
                target = os.path.join(aside, str(step))
                n = 1
                while os.path.exists(target):
                    target, n = os.path.join(aside, f"{step}.{n}"), n + 1
                shutil.move(os.path.join(self.directory, str(step)), target)
                logging.warning("checkpoint step %d set aside in %s", step, target)
        processes.barrier("damaged checkpoints set aside")

    def latest_step(self) -> int | None:
        """The newest intact step."""
        return max(self._val_loss, default=None)

    def best_step(self) -> int | None:
        """The intact step with the lowest finite validation loss."""
        finite = {s: v for s, v in self._val_loss.items() if math.isfinite(v)}
        return min(finite, key=lambda s: (finite[s], s), default=None)

    def step_for(self, which: str) -> int:
        """The step of "latest", "best", or a step number given as a string."""
        if which == "latest":
            step = self.latest_step()
        elif which == "best":
            step = self.best_step()
        elif str(which).isdigit() and int(which) in self.damaged:
            raise DamagedCheckpoint(f"checkpoint step {which} in {self.directory} is damaged: "
                                    f"{self.damaged[int(which)]}")
        else:
            step = int(which) if int(which) in self._val_loss else None
        if step is None:
            damaged = "".join(f"; step {s} is damaged ({p})" for s, p in self.damaged.items())
            raise MissingInput(f"no {which!r} checkpoint in {self.directory}{damaged}")
        return step

    # ---------------------------------------------------------------- writing
    def save(self, state, meta: dict[str, Any], val_loss: float) -> None:
        """Save asynchronously (returns once the arrays are copied off the devices); the step
        is sealed with its checksums once written (at the next save, `wait` or `close`)."""
        self._seal_pending()
        step = int(jax.device_get(state.step))
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics={_METRIC: float(val_loss)})
        self._pending, self._val_loss[step] = step, float(val_loss)

    def _seal_pending(self) -> None:
        if self._pending is None:
            return
        self.manager.wait_until_finished()
        step_dir = os.path.join(self.directory, str(self._pending))
        if jax.process_index() == 0 and os.path.isdir(step_dir):
            seal(step_dir)
        self._pending = None
        self._val_loss = {s: v for s, v in self._val_loss.items()  # retention deleted some
                          if os.path.isdir(os.path.join(self.directory, str(s)))}

    def wait(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()
            self._seal_pending()

    def close(self) -> None:
        if self.manager is not None:
            self.wait()
            self.manager.close()

    # ---------------------------------------------------------------- reading
    def abstract_state_from_metadata(self, step: int, device: jax.Device | None = None):
        """The saved tree (nested dicts) as ShapeDtypeStructs on one device."""
        tree = self._reader.metadata(os.path.join(self.directory, str(step))).item_metadata
        tree = tree.get("state") if tree is not None else None
        tree = getattr(tree, "tree", tree)
        if tree is None:
            raise DamagedCheckpoint(f"checkpoint {step} in {self.directory} has no state metadata")
        sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            tree)

    def restore(self, step: int, abstract_state=None) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of `step`, restored into `abstract_state`'s structure and shardings,
        or, without one, as the saved tree of nested dicts on this process's first device."""
        if abstract_state is None:
            abstract_state = self.abstract_state_from_metadata(step)
        restored = self._reader.restore(
            os.path.join(self.directory, str(step)),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                    meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def restore_meta(self, step: int) -> dict[str, Any]:
        return _meta_of(os.path.join(self.directory, str(step)))
