"""Whether a run has several processes, and how they find each other, decided without starting
JAX (which would start its backends: seconds a second writer should not have to wait to be told
the directory is busy).

The environment a launcher sets (`astroclip_jax.launch` locally; on a cluster SLURM's own
variables, which `jax.distributed.initialize()` detects by itself):

    JAX_COORDINATOR_ADDRESS  host:port of process 0's coordinator (JAX reads it itself)
    JAX_NUM_PROCESSES        how many processes (JAX does not read it: `distributed_args` does)
    JAX_PROCESS_ID           this process's index in [0, JAX_NUM_PROCESSES)
"""

from __future__ import annotations

import os

# Set by launchers; jax.distributed.initialize() reads the first on its own.
COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
SLURM_ENV = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NODELIST")  # srun: JAX detects it

# A process that stops sending heartbeats is declared dead after this long, and the others
# stop with JAX's error instead of waiting in a collective forever (JAX's default: 100 s).
HEARTBEAT_TIMEOUT_S = 30
# How long a finished process waits for the others at the shutdown barrier (default: 300 s).
SHUTDOWN_TIMEOUT_S = 60


def wants_distributed(multihost: bool) -> bool:
    """Several processes: `multihost` (the config's) or a coordinator in the environment."""
    return multihost or any(v in os.environ for v in COORDINATOR_ENV)


def distributed_args() -> dict:
    """Keyword arguments for `jax.distributed.initialize` from the environment: the
    coordinator, process count and id where a launcher set them (otherwise JAX detects a
    cluster, e.g. SLURM), and this project's failure-detection timeouts."""
    args = {"heartbeat_timeout_seconds": HEARTBEAT_TIMEOUT_S,
            "shutdown_timeout_seconds": SHUTDOWN_TIMEOUT_S}
    address = next((os.environ[v] for v in COORDINATOR_ENV if v in os.environ), None)
    if address is not None:
        args["coordinator_address"] = address
    if NUM_PROCESSES_ENV in os.environ and PROCESS_ID_ENV in os.environ:
        args["num_processes"] = int(os.environ[NUM_PROCESSES_ENV])
        args["process_id"] = int(os.environ[PROCESS_ID_ENV])
    return args


def initialize(multihost: bool) -> None:
    """`jax.distributed.initialize(**distributed_args())` when `wants_distributed` (once).

    CPU devices of several processes talk through gloo (JAX's default CPU client has no
    cross-process collectives); GPUs and TPUs use their own (NCCL, ICI) whatever this says.
    JAX is imported here, not at the top: deciding must stay cheap."""
    import jax

    if wants_distributed(multihost) and not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**distributed_args())


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
