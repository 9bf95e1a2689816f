"""Atomic writes of files and directories, shared by every stage and the converters."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Iterator


TMP_PREFIX = ".tmp-"  # every temporary file or directory written here starts with it


def _tmp_prefix(path: str) -> str:
    return f"{TMP_PREFIX}{os.path.basename(os.path.abspath(path))}-"


@contextlib.contextmanager
def atomic_path(path: str, suffix: str | None = None) -> Iterator[str]:
    """Yields the path of a fresh, empty temporary file next to `path` for the block to write.

    On a clean exit the file is renamed over `path` (`os.replace`: a reader sees the old file
    or the new one, never half of one); on an error it is removed and the error re-raised.
    A process killed inside the block leaves `.tmp-<name>-*`, which `remove_leftovers` clears.
    """
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=suffix,
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
    tmp = tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=parent)
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


def remove_leftovers(directory: str, names: tuple[str, ...] | None = None) -> list[str]:
    """Remove the temporaries a killed process left in `directory` (for the targets `names`,
    or all of them); the paths removed. Call it only while holding the directory's lock."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    prefixes = (TMP_PREFIX,) if names is None else tuple(_tmp_prefix(n) for n in names)
    for entry in sorted(os.listdir(directory)):
        if entry.startswith(prefixes):
            path = os.path.join(directory, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(path)
    return removed


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------- sealed directories
# One checksum table per finished directory (checkpoint steps, exports): written last and
# atomically, so its presence means the directory was finished, and its entries catch a file
# that was truncated, altered or removed since.

def files_under(directory: str, leave_out: str | None = None) -> list[str]:
    """Relative paths of every file under `directory` (but `leave_out`), sorted."""
    found = []
    for folder, _, names in os.walk(directory):
        found += [os.path.relpath(os.path.join(folder, n), directory) for n in names]
    return sorted(rel for rel in found if rel != leave_out)


def seal(directory: str, table_file: str = "checksums.json") -> None:
    """Record the size and sha256 of every file under `directory` in `table_file`, atomically."""
    table = {rel: [os.path.getsize(os.path.join(directory, rel)),
                   sha256_file(os.path.join(directory, rel))]
             for rel in files_under(directory, table_file)}
    with atomic_path(os.path.join(directory, table_file)) as tmp, open(tmp, "w") as f:
        json.dump(table, f, indent=0, sort_keys=True)


def damage(directory: str, table_file: str = "checksums.json") -> str | None:
    """What is wrong with a sealed directory (the first problem, in words), or None if intact."""
    try:
        with open(os.path.join(directory, table_file)) as f:
            table = json.load(f)
        if not isinstance(table, dict) or not table:
            raise ValueError("empty")
    except FileNotFoundError:
        return f"unfinished: no {table_file} (the writer stopped before sealing it)"
    except (OSError, ValueError):
        return f"{table_file} is unreadable"
    for rel, entry in sorted(table.items()):
        size, digest = entry if isinstance(entry, list) else (None, entry)  # older: digest only
        problem = file_problem(os.path.join(directory, rel), size, digest)
        if problem is not None:
            return f"{rel} {problem}"
    return None


def file_record(path: str) -> dict[str, int | str]:
    """{"bytes", "sha256"} of a written file, for a manifest that `file_problem` checks."""
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def file_problem(path: str, size: int | None, digest: str) -> str | None:
    """Why `path` is not the file that was written (missing, other size, other sha256), or None."""
    if not os.path.isfile(path):
        return "is missing"
    if size is not None and os.path.getsize(path) != size:
        return f"has {os.path.getsize(path)} bytes, {size} were written"
    if sha256_file(path) != digest:
        return "does not match its checksum (corrupted)"
    return None
