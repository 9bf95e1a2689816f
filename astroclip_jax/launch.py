"""Start N local processes of one command as one `jax.distributed` run (tests, demos, one
machine with several GPUs).

    python -m astroclip_jax.launch --processes=2 --cpu_devices=4 -- \\
        python main.py --config=configs/spender.py:smoke --mode=train --workdir=/tmp/run

Each process gets the environment `astroclip_jax.processes` documents (a free coordinator
port on 127.0.0.1, the process count and its id), and with `--cpu_devices=K` runs on K forced
host-platform CPU devices (the CPU processes then talk through gloo). Their output is
forwarded line by line with a `[pI] ` prefix. When one process fails, the others are stopped
(SIGTERM, then SIGKILL after `--grace_s`) and one line says which failed and how; the exit
status is the first failure's (128 + signal for a killed one), or 0.

On a cluster use the scheduler instead (README, "Many devices"): `srun` sets SLURM's variables,
which `jax.distributed.initialize()` reads itself.

A top-level module: it imports no stage of the package and never starts JAX.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from astroclip_jax import processes


def free_port() -> int:
    """A TCP port nobody listens on now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, count: int, port: int, cpu_devices: int | None,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of process `index` of `count`."""
    env = dict(os.environ if base is None else base)
    env[processes.COORDINATOR_ENV[0]] = f"127.0.0.1:{port}"
    env[processes.NUM_PROCESSES_ENV] = str(count)
    env[processes.PROCESS_ID_ENV] = str(index)
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are printed
    if cpu_devices:
        env["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(
            [*flags, f"--xla_force_host_platform_device_count={cpu_devices}"])
    return env


def _forward(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode(errors="replace"))
        out.flush()
    stream.close()


def _status(rc: int) -> str:
    return f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every running process's group, SIGKILL what is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)  # the group: its grain workers too
                except ProcessLookupError:
                    pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)


def launch(command: list[str], count: int, cpu_devices: int | None = None,
           grace_s: float = 10.0, out=None, env: dict[str, str] | None = None) -> int:
    """Run `command` as processes 0..count-1 of one run; the exit status (module docstring)."""
    out = out or sys.stdout
    port = free_port()
    procs, threads = [], []
    for i in range(count):
        p = subprocess.Popen(command, env=process_env(i, count, port, cpu_devices, env),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
        t = threading.Thread(target=_forward, args=(p.stdout, f"[p{i}] ", out), daemon=True)
        t.start()
        procs.append(p)
        threads.append(t)

    def on_signal(signum, frame):  # Ctrl-C or a scheduler's SIGTERM: stop them all
        _stop(procs, grace_s)
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        while True:
            failed = [(i, p.returncode) for i, p in enumerate(procs)
                      if p.poll() is not None and p.returncode != 0]
            if failed:
                i, rc = failed[0]
                others = [j for j, p in enumerate(procs) if p.poll() is None]
                _stop(procs, grace_s)
                for t in threads:
                    t.join(timeout=5)
                out.write(f"launch: process {i} of {count} {_status(rc)}; stopped "
                          f"{'processes ' + ', '.join(map(str, others)) if others else 'nothing'}"
                          "\n")
                out.flush()
                return 128 - rc if rc < 0 else rc
            if all(p.returncode == 0 for p in procs):
                for t in threads:
                    t.join(timeout=5)
                return 0
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="how many processes")
    parser.add_argument("--cpu_devices", type=int, default=None,
                        help="forced host-platform CPU devices per process (CPU runs)")
    parser.add_argument("--grace_s", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when stopping the others")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then the command every process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.processes < 1:
        parser.error("give --processes >= 1 and a command after --")
    return launch(command, args.processes, args.cpu_devices, args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
