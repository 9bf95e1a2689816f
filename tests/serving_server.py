"""A `main.py --mode=serve` subprocess over a work directory, for the server and browser tests.

It is started with ``--config.serve.port=0`` and reached on the port it prints: the system
chooses a free one (no race with another test taking it), and every test run checks that the
printed address is the one serving."""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
import time

import httpx

import cli_runs

ADDRESS = re.compile(r"^serve: .* on http://127\.0\.0\.1:(\d+)/ ", re.MULTILINE)


@contextlib.contextmanager
def serving(workdir: str, *overrides: str, timeout: float = 300.0):
    """Start the server on port 0, wait until the port it prints answers, yield its base URL,
    stop it."""
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block it
    proc = subprocess.Popen(cli_runs.command("serve", workdir, "--config.serve.port=0",
                                             *overrides),
                            cwd=cli_runs.ROOT, env=cli_runs.env(), stdout=log,
                            stderr=subprocess.STDOUT, text=True)

    def output() -> str:
        log.seek(0)
        return log.read()

    try:
        deadline = time.monotonic() + timeout
        url = None
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited:\n{output()[-4000:]}")
            found = url or ADDRESS.search(output())
            if found is not None:
                url = url or f"http://127.0.0.1:{found.group(1)}"
                try:
                    if httpx.get(f"{url}/api/info", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not answer in time:\n{output()[-4000:]}")
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
