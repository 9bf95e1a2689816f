"""Data parallelism: one "data" mesh axis over every device, batch sharded, params replicated.

Each process loads its share of the global batch; `shard_batch` stitches the shares into
global arrays (`jax.make_array_from_process_local_data`), so jitted code sees the global
batch and the contrastive loss every negative. Multi-host runs call
`jax.distributed.initialize()` first (when the config asks or the launcher set the usual
environment variables).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from astroclip_jax.errors import ConfigError
from astroclip_jax import processes

DATA_AXIS = "data"


def maybe_initialize_distributed(multihost: bool) -> None:
    """Start the multi-process runtime when the config or the environment asks
    (`processes.initialize`: the launcher's variables, gloo on CPU, failure timeouts)."""
    was = jax.distributed.is_initialized()
    processes.initialize(multihost)
    if not was and jax.distributed.is_initialized():
        logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over all (or the given) devices with axis "data".

    Auto axes: XLA (GSPMD) decides the layouts of intermediates and inserts the collectives.
    """
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh((len(devices),), (DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over "data"."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "batch size") -> None:
    n = mesh.devices.size
    if global_batch_size % n or global_batch_size % jax.process_count():
        raise ConfigError(f"{field} {global_batch_size} is not divisible by the {n} devices "
                          f"and {jax.process_count()} processes: use a multiple of {n}")


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                keys: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """This process's rows -> global batch-sharded arrays (only `keys`, default all)."""
    sharding = data_sharded(mesh)
    keys = list(batch) if keys is None else keys
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
            for k in keys}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host values (the same on every process) -> arrays replicated on every device."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)
