"""Whether a run has several processes, decided without starting JAX (which would start its
backends: seconds a second writer should not have to wait to be told the directory is busy)."""

from __future__ import annotations

import os

# Set by launchers; jax.distributed.initialize() reads them on its own.
COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def wants_distributed(multihost: bool) -> bool:
    """Several processes: `multihost` (the config's) or a coordinator in the environment."""
    return multihost or any(v in os.environ for v in COORDINATOR_ENV)
