"""Several processes, the ways they fail: a taken coordinator port, a killed launcher, a process
waiting for the others, and where the coordinator listens (`astroclip_jax.launch`,
`astroclip_jax.processes`).

The references are the kernel's and psutil's view, not this package's: whether a socket can
listen on a port, which processes are alive, which address a listening socket is bound to.
JAX starts in few processes: one alone (waiting for a coordinator that never comes) and one
2-process run shared by the waiting and listening tests (module fixture).
"""

from __future__ import annotations

import ast
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

import cli_runs
from astroclip_jax import errors, processes

LAUNCH = [sys.executable, "-m", "astroclip_jax.launch", "--processes=2", "--grace_s=1"]


def _listener(host: str = "127.0.0.1", reuse: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse))
    s.bind((host, 0))
    s.listen()
    return s


def _can_listen(host: str, port: int, reuse: bool = True) -> bool:
    """The kernel's answer, asked as gRPC asks it (SO_REUSEADDR, then listen)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse))
        try:
            s.bind((host, port))
            s.listen()
            return True
        except OSError:
            return False


def _dist_env(port: int, process_id: int, **extra: str) -> dict[str, str]:
    return {**cli_runs.env(), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(process_id), **extra}


def _prepare(env: dict[str, str], tmp_path, timeout: float = 120):
    """`main.py --mode=prepare` (the first thing it does is start `jax.distributed`)."""
    return subprocess.run(cli_runs.command("prepare", str(tmp_path / "work"),
                                           f"--config.data.data_dir={tmp_path / 'tfds'}"),
                          cwd=cli_runs.ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# --- 1. a taken coordinator port ---------------------------------------------------------------

def test_port_check_agrees_with_the_kernel():
    with _listener() as taken:
        port = taken.getsockname()[1]
        assert not _can_listen("127.0.0.1", port)
        with pytest.raises(processes.CoordinatorPortInUse, match=f"127.0.0.1:{port} is in use"):
            processes.check_port_free(f"127.0.0.1:{port}", "JAX_COORDINATOR_ADDRESS")
        if socket.has_ipv6 and _can_listen("::1", 0):
            # JAX's default bind address [::] covers 127.0.0.1 too (dual stack).
            assert not _can_listen("::", port)
            with pytest.raises(processes.CoordinatorPortInUse):
                processes.check_port_free(f"[::]:{port}", "JAX_COORDINATOR_ADDRESS")
    # A port whose last coordinator (gRPC: SO_REUSEADDR) is gone but left a closed connection
    # behind (TIME_WAIT on the side that closed first, here the server's): the kernel lets a
    # new coordinator have it, though not a socket without SO_REUSEADDR.
    with _listener(reuse=True) as server:
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()
        time.sleep(0.1)
        client.close()
    assert _can_listen("127.0.0.1", port) and not _can_listen("127.0.0.1", port, reuse=False)
    processes.check_port_free(f"127.0.0.1:{port}", "JAX_COORDINATOR_ADDRESS")


def test_taken_port_is_one_line_not_a_crash(tmp_path):
    with _listener() as taken:
        port = taken.getsockname()[1]
        proc = _prepare(_dist_env(port, 0), tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]  # JAX alone: -11 (segfault)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: coordinator port 127.0.0.1:{port} is in use: set "
                           "JAX_COORDINATOR_ADDRESS"), last
    assert "Traceback" not in proc.stderr


def test_launcher_with_a_taken_port_says_so_and_stops_the_others():
    with _listener() as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run([*LAUNCH, f"--port={port}", "--", *cli_runs.command(
            "prepare", "/nonexistent/never-written")], cwd=cli_runs.ROOT, env=cli_runs.env(),
            capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert f"[p0] error: coordinator port 127.0.0.1:{port} is in use" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"launch: process 0 of 2 exited with status 1; stopped "
                        r"(processes 1|nothing)", last), last


def test_launcher_picks_a_port_it_can_listen_on(monkeypatch):
    from astroclip_jax import launch

    port = launch.free_port()
    assert _can_listen("127.0.0.1", port)
    env = launch.process_env(0, 2, port, None, base={"JAX_COORDINATOR_BIND_ADDRESS": "[::]:1"})
    assert env["JAX_COORDINATOR_ADDRESS"] == f"127.0.0.1:{port}"
    assert "JAX_COORDINATOR_BIND_ADDRESS" not in env


@pytest.mark.parametrize("name, value, expected", [
    ("JAX_PROCESS_ID", "abc", "JAX_PROCESS_ID='abc': expected an integer in [0, 1]"),
    ("JAX_PROCESS_ID", "-1", "JAX_PROCESS_ID='-1': expected an integer in [0, 1]"),
    ("JAX_PROCESS_ID", "2", "JAX_PROCESS_ID='2': expected an integer in [0, 1]"),
    ("JAX_NUM_PROCESSES", "0", "JAX_NUM_PROCESSES='0': expected an integer >= 1"),
    ("JAX_COORDINATOR_ADDRESS", "127.0.0.1", "JAX_COORDINATOR_ADDRESS='127.0.0.1': expected "
                                              "host:port"),
    ("JAX_COORDINATOR_ADDRESS", "127.0.0.1:70000", "expected host:port"),
    ("JAX_COORDINATOR_ADDRESS", ":123", "expected host:port"),
    ("ASTROCLIP_WAIT_TIMEOUT_S", "-5", "ASTROCLIP_WAIT_TIMEOUT_S='-5': expected a positive"),
    ("ASTROCLIP_WAIT_REPORT_S", "nan", "ASTROCLIP_WAIT_REPORT_S='nan': expected a positive"),
    ("ASTROCLIP_WAIT_TIMEOUT_S", "1e30", "ASTROCLIP_WAIT_TIMEOUT_S='1e30': expected a positive"),
])
def test_a_malformed_variable_is_one_line_naming_it(monkeypatch, name, value, expected):
    for key, default in (("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234"),
                         ("JAX_NUM_PROCESSES", "2"), ("JAX_PROCESS_ID", "1")):
        monkeypatch.setenv(key, default)
    monkeypatch.setenv(name, value)
    with pytest.raises(errors.UserError, match=re.escape(expected)):
        # what `initialize` reads before it starts JAX
        processes.distributed_args()
        processes.wait_bounds(processes.START_TIMEOUT_S)


def test_a_coordinator_alone_is_one_line(tmp_path):
    env = {**cli_runs.env(), "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}
    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", *processes.SLURM_ENV):
        env.pop(name, None)
    proc = _prepare(env, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]  # JAX alone: a ValueError's traceback
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: several processes asked for (config field multihost or "
        "JAX_COORDINATOR_ADDRESS) but Number of processes must be defined. Set "
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or start under a "
        "cluster launcher JAX detects (e.g. srun)")
    assert "Traceback" not in proc.stderr


def test_process_count_without_id_is_one_line(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(errors.UserError, match="JAX_NUM_PROCESSES is set but JAX_PROCESS_ID"):
        processes.distributed_args()


def test_a_command_that_cannot_run_is_one_line(tmp_path):
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    for command, status, why in ((str(tmp_path / "missing"), 127, "No such file or directory"),
                                 (str(script), 126, "Permission denied")):
        proc = subprocess.run([*LAUNCH, "--", command], cwd=cli_runs.ROOT, env=cli_runs.env(),
                              capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stdout, proc.stderr) == (
            status, f"launch: cannot run {command!r}: {why}; stopped nothing\n", "")


# --- 2. a killed launcher leaves nothing running -----------------------------------------------

_CHILD = r"""
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the SIGKILL after the grace ends it
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # a grandchild
print("ready", flush=True)
time.sleep(300)
"""
GRACE_S = 1.0
STOP_BOUND_S = 2 * GRACE_S + 8  # SIGTERM, grace, SIGKILL, grace; plus a loaded machine


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL],
                         ids=lambda s: s.name)
def test_a_killed_launcher_leaves_no_process_running(sig):
    launcher = subprocess.Popen([*LAUNCH, f"--grace_s={GRACE_S}", "--", sys.executable, "-c",
                                 _CHILD], cwd=cli_runs.ROOT, env=cli_runs.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = set()
        while ready != {"[p0] ready", "[p1] ready"}:
            line = launcher.stdout.readline()
            assert line, "the launcher ended before its processes were ready"
            ready.add(line.strip())
        family = psutil.Process(launcher.pid).children(recursive=True)
        # 2 processes, their 2 grandchildren and the watcher, all alive now
        assert sum(_alive(p) for p in family) == 5, family
        os.kill(launcher.pid, sig)
        rest = launcher.stdout.read()
        assert launcher.wait(timeout=STOP_BOUND_S) == (-9 if sig == signal.SIGKILL else 128 + sig)
        if sig != signal.SIGKILL:
            assert rest.strip().splitlines()[-1] == \
                f"launch: stopped by signal {int(sig)}; stopped processes 0, 1", rest
        deadline = time.monotonic() + STOP_BOUND_S
        while any(_alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in family if _alive(p)]
    finally:
        for p in psutil.Process(launcher.pid).children(recursive=True) \
                if launcher.poll() is None else []:
            p.kill()
        launcher.kill()
        launcher.wait()


# --- 3. a waiting process says so and gives up; 4. the coordinator listens on 127.0.0.1 ---------

def test_waiting_for_a_coordinator_reports_and_gives_up(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there
    start = time.monotonic()
    proc = _prepare(_dist_env(port, 1, ASTROCLIP_WAIT_TIMEOUT_S="3.5",
                              ASTROCLIP_WAIT_REPORT_S="1"), tmp_path, timeout=90)
    took = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    reports = re.findall(r"^process 1 of 2: waiting (\d+) s for the coordinator at "
                         rf"127\.0\.0\.1:{port} and the other processes", proc.stderr, re.M)
    assert [int(r) for r in reports] == [1, 2, 3], proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"error: process 1 of 2 gave up after 3.5 s waiting for the coordinator "
                    f"at 127.0.0.1:{port} and the other processes (set "
                    "ASTROCLIP_WAIT_TIMEOUT_S to wait longer)"), last
    assert took < 60


_TWO = r"""
import os, sys, time
import psutil
from astroclip_jax import errors, processes

try:
    processes.initialize(False)
    import jax

    index = jax.process_index()
    if index == 0:
        port = int(os.environ["JAX_COORDINATOR_ADDRESS"].rsplit(":", 1)[1])
        print("LISTENING", sorted({c.laddr.ip for c in psutil.Process().net_connections("tcp")
                                   if c.status == psutil.CONN_LISTEN and c.laddr.port == port}),
              flush=True)
        time.sleep(3.5)  # process 0 "prepares the dataset"; process 1 waits
    processes.barrier("dataset prepared")
    print("PASSED", flush=True)
    os.environ["ASTROCLIP_WAIT_TIMEOUT_S"] = "3"
    if index == 1:
        time.sleep(120)  # hangs: never arrives
    processes.barrier("never together")
except errors.UserError as e:  # as main.py reports it
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
"""


@pytest.fixture(scope="module")
def two_processes():
    start = time.monotonic()
    proc = subprocess.run([*LAUNCH, "--cpu_devices=1", "--", sys.executable, "-c", _TWO],
                          cwd=cli_runs.ROOT, env={**cli_runs.env(), "ASTROCLIP_WAIT_REPORT_S": "1"},
                          capture_output=True, text=True, timeout=300)
    proc.took_s = time.monotonic() - start
    return proc


def test_the_coordinator_of_a_local_run_listens_on_127_0_0_1_only(two_processes):
    out = two_processes.stdout
    listening = re.search(r"^\[p0\] LISTENING (.*)$", out, re.M)
    assert listening, out[-3000:]
    # gRPC binds an IPv6 socket where it can: 127.0.0.1 then reads ::ffff:127.0.0.1.
    addresses = {ipaddress.ip_address(a).ipv4_mapped or ipaddress.ip_address(a)
                 for a in ast.literal_eval(listening[1])}
    assert addresses == {ipaddress.ip_address("127.0.0.1")}, listening[0]  # JAX's own: ::


def test_a_process_waiting_at_a_barrier_says_so(two_processes):
    out = two_processes.stdout
    waits = [int(n) for n in re.findall(
        r"^\[p1\] process 1 of 2: waiting (\d+) s for the other processes at 'dataset "
        r"prepared' \(gives up after 3600 s, ASTROCLIP_WAIT_TIMEOUT_S\)$", out, re.M)]
    assert len(waits) >= 2 and waits == sorted(waits), out[-3000:]
    assert out.count("PASSED") == 2, out[-3000:]


def test_a_barrier_gives_up_with_one_line(two_processes):
    out = two_processes.stdout
    assert two_processes.returncode == 1, out[-3000:]
    assert re.search(r"^\[p0\] process 0 of 2: waiting 2 s for the other processes at "
                     r"'never together'", out, re.M), out[-3000:]
    error = ("[p0] error: process 0 of 2: the processes did not all reach 'never together' "
             "within 3 s (1/2 did); set ASTROCLIP_WAIT_TIMEOUT_S to wait longer")
    lines = out.strip().splitlines()
    # Process 0 ends with that line, at once: without JAX's shutdown wait (60 s) and the
    # abort (a core dump) after it. (Process 1 loses its coordinator with it: JAX aborts it,
    # if the launcher's SIGTERM does not come first.)
    assert [x for x in lines if x.startswith("[p0]")][-1] == error, out[-3000:]
    assert re.fullmatch(r"launch: process 0 of 2 exited with status 1; stopped "
                        r"(processes 1|nothing)", lines[-1]), lines[-1]
    assert two_processes.took_s < 60
    assert "Traceback" not in out


def test_a_process_waiting_for_a_lock_says_so(tmp_path, monkeypatch, capsys):
    """A blocking lock (the feature cache's: one builder, the others wait) reports while it
    waits, naming the lock file and its holder, instead of hanging silently."""
    from astroclip_jax import locks

    monkeypatch.setattr(locks, "REPORT_EVERY_S", 0.3)
    code = ("import sys, time; from astroclip_jax import locks\n"
            f"with locks.DirectoryLock({str(tmp_path)!r}, 'building', name='c'):\n"
            "    print('held', flush=True); time.sleep(1.5)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=cli_runs.ROOT, env=cli_runs.env())
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    with locks.DirectoryLock(str(tmp_path), "waiting", name="c", wait=True):
        assert time.monotonic() - start > 0.9  # ours only once the holder let go
    holder.wait(timeout=30)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ".lock-c" in line]
    assert lines[0].startswith("waiting for ") and "building" in lines[0], err
    assert any(line.startswith("waiting ") and " s for " in line for line in lines[1:]), err
