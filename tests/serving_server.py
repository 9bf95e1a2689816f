"""A `main.py --mode=serve` subprocess over a work directory, for the server and browser tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time

import httpx

import cli_runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(workdir: str, timeout: float = 300.0):
    """Start the server on a free port, wait until it answers, yield its base URL, stop it."""
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block it
    proc = subprocess.Popen(cli_runs.command("serve", workdir, f"--config.serve.port={port}"),
                            cwd=cli_runs.ROOT, env=cli_runs.env(), stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"the server exited:\n{log.read()[-4000:]}")
            try:
                if httpx.get(f"{url}/api/info", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the server did not answer in time")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
