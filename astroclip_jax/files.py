"""Atomic writes of files and directories, shared by every stage and the converters."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str, prefix: str | None = None, suffix: str | None = None) -> Iterator[str]:
    """Yields the path of a fresh, empty temporary file next to `path` for the block to write.

    On a clean exit the file is renamed over `path` (`os.replace`: a reader sees the old file
    or the new one, never half of one); on an error it is removed and the error re-raised.
    """
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix,
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results should read like any file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # only after a failure: a replaced tmp is gone
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yields a fresh, empty temporary directory next to `path` for the block to fill.

    On a clean exit it takes the place of `path` (see `replace_directory`); on an error it is
    removed and the error re-raised, so `path` holds the old directory or the whole new one.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        replace_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only after a failure: a moved tmp is gone


def replace_directory(new: str, path: str) -> None:
    """Move the finished directory `new` to `path`, replacing what was there.

    Two renames on one filesystem: the old directory steps aside under a temporary name, the
    new one takes its place, then the old one is deleted. A crash in between leaves the old one
    under `<path>.old-*`, never a half-written `path`.
    """
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-",
                               dir=os.path.dirname(os.path.abspath(path)))
        os.rmdir(old)
        os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old)
    else:
        os.rename(new, path)
