"""One writer per directory: an advisory lock file that names its holder.

    with locks.DirectoryLock(workdir, "training"):
        ...   # a second writer stops at once: "runs/x is in use by training (host h, pid p, ...)"

The lock is `fcntl.flock` on `<directory>/.lock-<name>`: the kernel releases it when its process
dies, however it dies, so a lock left by a killed run is simply free and the next run takes it
over (and may then remove what the dead run left half-written). The file holds the holder's
host, pid, purpose and start time for the message. flock is per host on most network
filesystems: runs on several hosts sharing one work directory must take turns by other means.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time

from astroclip_jax.errors import Busy, UserError


class DirectoryLock:
    """An exclusive, non-blocking lock on `directory` for one purpose (a context manager).

    Re-entrant within a process (`main.py` takes the training lock before importing the
    trainer, which takes it again): flock treats every open of the file as another holder, so
    this process's own holds are counted here instead of locked twice.
    """

    _held: dict[str, list] = {}  # path -> [fd, depth] of the locks this process holds

    def __init__(self, directory: str, purpose: str, name: str = "writer", wait: bool = False):
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, f".lock-{name}")
        self.purpose = purpose
        self.wait = wait  # block until the holder is done (for work another process shares)

    def acquire(self) -> "DirectoryLock":
        if self.path in DirectoryLock._held:
            DirectoryLock._held[self.path][1] += 1
            return self
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            if not self.wait:
                os.close(fd)
                raise Busy(f"{self.directory} is in use by {holder}; wait for it to finish or "
                           "use another directory") from None
            _wait_reporting(fd, self.path, holder)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"purpose": self.purpose, "host": socket.gethostname(),
                                 "pid": os.getpid(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        os.fsync(fd)
        DirectoryLock._held[self.path] = [fd, 1]
        return self

    def release(self) -> None:
        held = DirectoryLock._held.get(self.path)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            fd = DirectoryLock._held.pop(self.path)[0]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


REPORT_EVERY_S = 10  # a process waiting for a lock says so this often


def _wait_reporting(fd: int, path: str, holder: str) -> None:
    """Block until the lock is ours, saying on stderr every REPORT_EVERY_S what it waits for
    (a silent wait of minutes looks like a hang)."""
    start = last = time.monotonic()
    print(f"waiting for {path}: held by {holder}", file=sys.stderr, flush=True)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.2)
        if time.monotonic() - last >= REPORT_EVERY_S:
            last = time.monotonic()
            print(f"waiting {last - start:.0f} s for {path}: held by {holder}", file=sys.stderr,
                  flush=True)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (f"{info.get('purpose', 'another process')} (host {info.get('host')}, pid "
            f"{info.get('pid')}, since {info.get('since')})")


@contextlib.contextmanager
def nothing_left_if_refused(directory: str):
    """A run refused (a UserError) in a directory that did not exist before it leaves no
    directory behind: only lock files (and empty folders) are removed, never anything else."""
    directory = os.path.abspath(directory)
    existed = os.path.lexists(directory)
    try:
        yield
    except UserError:
        if not existed and _holds_only_locks(directory):
            for root, dirs, names in os.walk(directory, topdown=False):
                for name in names:
                    os.remove(os.path.join(root, name))
                os.rmdir(root)
        raise


def _holds_only_locks(directory: str) -> bool:
    if not os.path.isdir(directory) or os.path.islink(directory):
        return False
    found = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return all(os.path.basename(path).startswith(".lock-") and not _is_held(path)
               for path in found)


def _is_held(path: str) -> bool:
    """Whether another process holds the lock file (a run that started meanwhile)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
