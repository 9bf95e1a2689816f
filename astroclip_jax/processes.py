"""Whether a run has several processes, and how they find each other, decided without starting
JAX (which would start its backends: seconds a second writer should not have to wait to be told
the directory is busy).

The environment a launcher sets (`astroclip_jax.launch` locally; on a cluster SLURM's own
variables, which `jax.distributed.initialize()` detects by itself):

    JAX_COORDINATOR_ADDRESS  host:port of process 0's coordinator (JAX reads it itself)
    JAX_NUM_PROCESSES        how many processes (JAX does not read it: `distributed_args` does)
    JAX_PROCESS_ID           this process's index in [0, JAX_NUM_PROCESSES)

A coordinator on a loopback address (the launcher's 127.0.0.1) listens on that address only;
elsewhere on every interface (JAX's default: the other nodes must reach it), unless
JAX_COORDINATOR_BIND_ADDRESS says where. Process 0 checks that the port is free before JAX
binds it (a taken port otherwise kills the process with a segfault).

A process waiting for the others (to start, or at a `barrier`) says so on stderr every
ASTROCLIP_WAIT_REPORT_S seconds (10) with its index and how long it has waited, and gives up
with one line after ASTROCLIP_WAIT_TIMEOUT_S (default 300 s to start, as JAX's own; 3600 s at a
barrier, where process 0 may be preparing a large dataset).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator

from astroclip_jax import errors

# Set by launchers; jax.distributed.initialize() reads the first on its own.
COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
BIND_ADDRESS_ENV = "JAX_COORDINATOR_BIND_ADDRESS"  # JAX reads it when no argument is given
SLURM_ENV = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NODELIST")  # srun: JAX detects it
WAIT_TIMEOUT_ENV = "ASTROCLIP_WAIT_TIMEOUT_S"
WAIT_REPORT_ENV = "ASTROCLIP_WAIT_REPORT_S"

# A process that stops sending heartbeats is declared dead after this long, and the others
# stop with JAX's error instead of waiting in a collective forever (JAX's default: 100 s).
HEARTBEAT_TIMEOUT_S = 30
# How long a finished process waits for the others at the shutdown barrier (default: 300 s).
SHUTDOWN_TIMEOUT_S = 60
# Default bounds of a wait (module docstring), and how often a waiting process says so.
START_TIMEOUT_S = 300
BARRIER_TIMEOUT_S = 3600
REPORT_EVERY_S = 10
MAX_WAIT_S = 1e7  # about 4 months; JAX takes the timeouts as C integers
# JAX's own start timeout is set this much later than ours: when it expires JAX aborts the
# process (SIGABRT, a core dump) instead of raising, so ours must always come first.
_JAX_TIMEOUT_MARGIN_S = 60


class CoordinatorPortInUse(errors.UserError, OSError):
    """Process 0 cannot bind the coordinator's port."""


def wants_distributed(multihost: bool) -> bool:
    """Several processes: `multihost` (the config's) or a coordinator in the environment."""
    return multihost or any(v in os.environ for v in COORDINATOR_ENV)


def split_address(address: str, name: str) -> tuple[str, int]:
    """`host:port` or `[v6 host]:port` -> (host, port); `name` is the variable it came from."""
    host, sep, port = address.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.ConfigError(f"environment variable {name}={address!r}: expected host:port "
                                 "with a port in 1..65535, e.g. 127.0.0.1:12345")
    return host, int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """127.x.x.x, ::1 or localhost: a coordinator only this machine's processes reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _env_int(name: str, low: int, high: int | None = None) -> int:
    value = os.environ[name]
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise errors.ConfigError(f"environment variable {name}={value!r}: expected an integer "
                                 f"{bound}")
    return number


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= MAX_WAIT_S:
        raise errors.ConfigError(f"environment variable {name}={value!r}: expected a positive "
                                 f"number of seconds up to {MAX_WAIT_S:g}")
    return seconds


def wait_bounds(default_timeout_s: float) -> tuple[float, float]:
    """(give up after, report every) seconds of a wait, from the environment or the defaults."""
    return (_env_seconds(WAIT_TIMEOUT_ENV, default_timeout_s),
            _env_seconds(WAIT_REPORT_ENV, REPORT_EVERY_S))


def distributed_args() -> dict:
    """Keyword arguments for `jax.distributed.initialize` from the environment: the
    coordinator, process count and id where a launcher set them (otherwise JAX detects a
    cluster, e.g. SLURM), a loopback coordinator's bind address, and this project's
    failure-detection timeouts. A malformed variable is one line naming it."""
    args = {"heartbeat_timeout_seconds": HEARTBEAT_TIMEOUT_S,
            "shutdown_timeout_seconds": SHUTDOWN_TIMEOUT_S}
    name = next((v for v in COORDINATOR_ENV if v in os.environ), None)
    if name is not None:
        host, port = split_address(os.environ[name], name)
        args["coordinator_address"] = _join(host, port)
        if is_loopback(host) and BIND_ADDRESS_ENV not in os.environ:
            args["coordinator_bind_address"] = _join(host, port)  # JAX's default is [::]
    given = [v for v in (NUM_PROCESSES_ENV, PROCESS_ID_ENV) if v in os.environ]
    if len(given) == 1:
        missing = ({NUM_PROCESSES_ENV, PROCESS_ID_ENV} - set(given)).pop()
        raise errors.ConfigError(f"environment variable {given[0]} is set but {missing} is "
                                 "not: set both or neither")
    if given:
        count = _env_int(NUM_PROCESSES_ENV, 1)
        args["num_processes"] = count
        args["process_id"] = _env_int(PROCESS_ID_ENV, 0, count - 1)
    return args


def check_port_free(bind_address: str, name: str) -> None:
    """Raise `CoordinatorPortInUse` unless the coordinator could listen on `bind_address`.

    Bound with SO_REUSEADDR, as gRPC binds it: that still fails where anything listens on the
    port, but not for the closed connections (TIME_WAIT) a previous run on it left behind."""
    host, port = split_address(bind_address, name)
    try:
        candidates = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                        flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CoordinatorPortInUse(f"coordinator address {bind_address} ({name}): cannot "
                                   f"resolve {host!r} ({e.strerror})") from None
    for family, kind, proto, _, sockaddr in candidates:
        try:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(sockaddr)
        except OSError as e:
            if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                continue  # e.g. no IPv6 here: JAX cannot use that address either
            why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise CoordinatorPortInUse(
                f"coordinator port {bind_address} {why}: set {name} to a free port "
                "(python -m astroclip_jax.launch picks one when --port is not given)") from None


def _say(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):  # a closed stderr must not stop the waiting
        print(line, file=sys.stderr, flush=True)


def started() -> bool:
    """Whether this process joined several (`initialize` ran): then leaving has to be
    `exit_now`, or JAX waits at exit for the others (SHUTDOWN_TIMEOUT_S) and aborts."""
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized()


def exit_now(message: str) -> None:
    """End this process with one `error:` line, now (`_give_up`)."""
    _give_up(message)


def _give_up(message: str) -> None:
    """End this process with one `error:` line, now. Not an exception: a process that stops
    waiting for the others cannot leave JAX's way, which waits for them once more at exit
    (SHUTDOWN_TIMEOUT_S) and then aborts with a core dump. Nothing is lost: every file this
    package writes is written atomically."""
    _say(f"error: {message}")
    os._exit(1)


@contextlib.contextmanager
def reporting_wait(who: str, what: str, timeout_s: float, every_s: float,
                   exit_after_timeout: bool = False) -> Iterator[None]:
    """Say `who: waiting N s for what` on stderr every `every_s` while the block runs.

    With `exit_after_timeout` the process ends with one `error:` line after `timeout_s`
    (`_give_up`): for a wait inside JAX that cannot be interrupted and would otherwise end in
    an abort."""
    done = threading.Event()
    start = time.monotonic()

    def report() -> None:
        next_report = every_s
        while True:
            until = min(next_report, timeout_s) if exit_after_timeout else next_report
            if done.wait(max(until - (time.monotonic() - start), 0)):
                return
            waited = time.monotonic() - start
            if exit_after_timeout and waited >= timeout_s:
                _give_up(f"{who} gave up after {timeout_s:g} s waiting for {what} (set "
                         f"{WAIT_TIMEOUT_ENV} to wait longer)")
            if waited >= next_report:
                _say(f"{who}: waiting {waited:.0f} s for {what} (gives up after "
                     f"{timeout_s:g} s, {WAIT_TIMEOUT_ENV})")
                next_report += every_s

    thread = threading.Thread(target=report, name="wait-report", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _who(args: dict) -> str:
    if "process_id" in args:
        return f"process {args['process_id']} of {args['num_processes']}"
    return "this process"


def initialize(multihost: bool) -> None:
    """`jax.distributed.initialize(**distributed_args())` when `wants_distributed` (once).

    Process 0 first checks the coordinator's port (`check_port_free`); every process reports
    while it waits for the others and gives up after the start timeout (module docstring).
    CPU devices of several processes talk through gloo (JAX's default CPU client has no
    cross-process collectives); GPUs and TPUs use their own (NCCL, ICI) whatever this says.
    JAX is imported here, not at the top: deciding must stay cheap."""
    if not wants_distributed(multihost):
        return
    args = distributed_args()
    timeout_s, every_s = wait_bounds(START_TIMEOUT_S)
    import jax

    if jax.distributed.is_initialized():
        return
    if args.get("process_id") == 0 and "coordinator_address" in args:
        bind = os.environ.get(BIND_ADDRESS_ENV)
        if bind is not None:
            check_port_free(bind, BIND_ADDRESS_ENV)
        else:
            name = next(v for v in COORDINATOR_ENV if v in os.environ)
            check_port_free(args.get("coordinator_bind_address") or
                            "[::]:" + args["coordinator_address"].rsplit(":", 1)[1], name)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    what = (f"the coordinator at {args['coordinator_address']} and the other processes"
            if "coordinator_address" in args else "the other processes to start")
    with reporting_wait(_who(args), what, timeout_s, every_s, exit_after_timeout=True):
        try:
            jax.distributed.initialize(
                **args, initialization_timeout=int(timeout_s) + _JAX_TIMEOUT_MARGIN_S)
        except ValueError as e:  # raised before anything starts: what JAX could not find
            raise errors.ConfigError(
                f"several processes asked for (config field multihost or {COORDINATOR_ENV[0]}) "
                f"but {e} Set {COORDINATOR_ENV[0]}, {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV}, "
                "or start under a cluster launcher JAX detects (e.g. srun)") from None


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op for one process), saying so while it waits;
    after the barrier timeout (module docstring) end the process with one line."""
    import jax

    if jax.process_count() == 1:
        return
    # The coordination service's barrier (JAX's own client: no public handle) raises on its
    # timeout in every waiting process; a device collective would only hang.
    from jax._src import distributed

    timeout_s, every_s = wait_bounds(BARRIER_TIMEOUT_S)
    who = f"process {jax.process_index()} of {jax.process_count()}"
    with reporting_wait(who, f"the other processes at {name!r}", timeout_s, every_s):
        try:
            distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))
        except jax.errors.JaxRuntimeError as e:
            if "DEADLINE_EXCEEDED" not in str(e):
                raise
            reached = re.search(r"reached the barrier: (\d+/\d+)", str(e))
            _give_up(f"{who}: the processes did not all reach {name!r} within {timeout_s:g} s"
                     f"{f' ({reached[1]} did)' if reached else ''}; set {WAIT_TIMEOUT_ENV} to "
                     "wait longer")
