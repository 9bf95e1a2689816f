"""Start N local processes of one command as one `jax.distributed` run (tests, demos, one
machine with several GPUs).

    python -m astroclip_jax.launch --processes=2 --cpu_devices=4 -- \\
        python main.py --config=configs/spender.py:smoke --mode=train --workdir=/tmp/run

Each process gets the environment `astroclip_jax.processes` documents (the coordinator on
127.0.0.1, listening there only, at `--port` or a free port; the process count and its id), and
with `--cpu_devices=K` runs on K forced host-platform CPU devices (the CPU processes then talk
through gloo). Their output is forwarded line by line with a `[pI] ` prefix. When one process
fails, the others are stopped (SIGTERM to its process group, then SIGKILL after `--grace_s`)
and one line says which failed and how; the exit status is the first failure's (128 + signal
for a killed one), or 0.

The processes never outlive the launcher: SIGTERM, SIGINT or SIGHUP stop them as above (exit
status 128 + signal), and a small watcher process started first stops them the same way when
the launcher dies without a chance to (SIGKILL): it notices its pipe from the launcher close.

On a cluster use the scheduler instead (README, "Many devices"): `srun` sets SLURM's variables,
which `jax.distributed.initialize()` reads itself.

A top-level module: it imports no stage of the package and never starts JAX.
"""

from __future__ import annotations

import argparse
import contextlib
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
    env.pop(processes.BIND_ADDRESS_ENV, None)  # a local run listens on 127.0.0.1 only
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


def _signal_groups(groups: list[int], sig: int) -> None:
    for group in groups:
        try:
            os.killpg(group, sig)  # the group: its grain workers (or a shell's children) too
        except ProcessLookupError:
            pass


def _groups_alive(groups: list[int]) -> bool:
    for group in groups:
        try:
            os.killpg(group, 0)
            return True
        except ProcessLookupError:
            pass
    return False


def _stop_groups(groups: list[int], grace_s: float, reap=lambda: None) -> None:
    """SIGTERM every group, SIGKILL what is left of them after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal_groups(groups, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _groups_alive(groups):
            reap()
            time.sleep(0.05)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """Stop every launched process with its group (each leads its own: start_new_session)."""
    # Polling reaps them: a dead leader left a zombie would keep its group alive.
    _stop_groups([p.pid for p in procs], grace_s, reap=lambda: [p.poll() for p in procs])


def watch(grace_s: float) -> None:
    """The watcher (module docstring): read process group ids from stdin, one a line, until
    `done` (the launcher stopped them itself) or the end of the pipe (the launcher died: stop
    them, SIGTERM then SIGKILL after `grace_s`)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only the launcher's end ends it
    groups = []
    for line in sys.stdin:
        if line.strip() == "done":
            return
        groups.append(int(line))
    _stop_groups(groups, grace_s)


def _start_watcher(grace_s: float) -> subprocess.Popen:
    """The watcher, in its own session (a terminal's Ctrl-C or hang-up reaches the launcher,
    which stops the processes itself)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from astroclip_jax.launch import watch; "
         "watch(float(sys.argv[1]))", str(grace_s)],
        stdin=subprocess.PIPE, env=env, start_new_session=True, text=True)


def _others(procs: list[subprocess.Popen], but: int | None = None) -> str:
    running = [str(j) for j, p in enumerate(procs) if j != but and p.poll() is None]
    return "processes " + ", ".join(running) if running else "nothing"


def launch(command: list[str], count: int, cpu_devices: int | None = None,
           grace_s: float = 10.0, out=None, env: dict[str, str] | None = None,
           port: int | None = None) -> int:
    """Run `command` as processes 0..count-1 of one run; the exit status (module docstring)."""
    out = out or sys.stdout
    port = port or free_port()
    procs, threads = [], []
    watcher = _start_watcher(grace_s)

    def on_signal(signum, frame):  # Ctrl-C, a hang-up or a scheduler's SIGTERM: stop them all
        for s in handled:
            signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the stopping short
        stopped = _others(procs)
        _stop(procs, grace_s)
        out.write(f"launch: stopped by signal {signum}; stopped {stopped}\n")
        out.flush()
        raise SystemExit(128 + signum)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in handled} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        for i in range(count):
            try:
                p = subprocess.Popen(command, env=process_env(i, count, port, cpu_devices, env),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            except OSError as e:  # not found, not executable: the shell's 127 and 126
                out.write(f"launch: cannot run {command[0]!r}: {e.strerror}; stopped "
                          f"{_others(procs)}\n")
                out.flush()
                return 127 if isinstance(e, FileNotFoundError) else 126
            procs.append(p)
            with contextlib.suppress(OSError):  # a dead watcher must not stop the run
                watcher.stdin.write(f"{p.pid}\n")
                watcher.stdin.flush()
            t = threading.Thread(target=_forward, args=(p.stdout, f"[p{i}] ", out), daemon=True)
            t.start()
            threads.append(t)
        while True:
            failed = [(i, p.returncode) for i, p in enumerate(procs)
                      if p.poll() is not None and p.returncode != 0]
            if failed:
                i, rc = failed[0]
                others = _others(procs, but=i)
                _stop(procs, grace_s)
                for t in threads:
                    t.join(timeout=5)
                out.write(f"launch: process {i} of {count} {_status(rc)}; stopped {others}\n")
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
        _stop(procs, grace_s)  # nothing is left running, whatever ended the loop
        with contextlib.suppress(OSError):
            watcher.stdin.write("done\n")
            watcher.stdin.close()
        watcher.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="how many processes")
    parser.add_argument("--cpu_devices", type=int, default=None,
                        help="forced host-platform CPU devices per process (CPU runs)")
    parser.add_argument("--grace_s", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when stopping the others")
    parser.add_argument("--port", type=int, default=None,
                        help="the coordinator's port on 127.0.0.1 (default: a free one)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then the command every process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.processes < 1:
        parser.error("give --processes >= 1 and a command after --")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port={args.port}: expected a port in 1..65535")
    if args.cpu_devices is not None and args.cpu_devices < 1:
        parser.error(f"--cpu_devices={args.cpu_devices}: expected a count >= 1")
    if args.grace_s < 0:
        parser.error(f"--grace_s={args.grace_s}: expected seconds >= 0")
    return launch(command, args.processes, args.cpu_devices, args.grace_s, port=args.port)


if __name__ == "__main__":
    sys.exit(main())
