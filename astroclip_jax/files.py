"""Atomic writes of files and directories, shared by every stage and the converters."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterator

from astroclip_jax.errors import WouldOverwrite


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
def atomic_directory(path: str, kind: "OutputKind | None" = None,
                     what: str = "output directory") -> Iterator[str]:
    """Yields a fresh, empty temporary directory next to `path` for the block to fill.

    On a clean exit it takes the place of `path` (see `replace_directory`); on an error it is
    removed and the error re-raised, so `path` holds the old directory or the whole new one.
    `path` is checked (`check_output_location`: with `kind`, only an earlier output of that
    kind is ever replaced) before the block runs and again just before the swap, since the
    block may run for long; what a killed earlier write left of `path` is cleared first.
    """
    path = check_output_location(path, kind, what)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_leftovers(parent, (os.path.basename(path),))
    tmp = tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        check_output_location(path, kind, what)
        replace_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only after a failure: a moved tmp is gone


OLD_INFIX = ".old-"  # `<name>.old-*`: a replaced directory between the two renames
_OLD_NAME = re.compile(r"(.+)\.old-[a-z0-9_]{8}")  # as `tempfile.mkdtemp` names it


def replace_directory(new: str, path: str) -> None:
    """Move the finished directory `new` to `path`, replacing what was there.

    Two renames on one filesystem: the old directory steps aside under `<path>.old-*`, the
    new one takes its place, then the old one is deleted. A crash in between leaves the old
    one under that name, never a half-written `path`; `restore_replaced` (run by
    `remove_leftovers` and `check_output_location`) moves it back on the next start.
    """
    if os.path.lexists(path):
        old = tempfile.mkdtemp(prefix=os.path.basename(path) + OLD_INFIX,
                               dir=os.path.dirname(os.path.abspath(path)))
        os.rmdir(old)
        os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old, ignore_errors=True)  # a later remove_leftovers clears what remains
    else:
        os.rename(new, path)


def restore_replaced(path: str) -> str | None:
    """Undo a `replace_directory` killed between its two renames: when `path` is missing and
    one `<path>.old-*` waits beside it, move it back (the new one never arrived, so the old
    one is all there is). The path restored from, or None."""
    if os.path.lexists(path):
        return None
    path = os.path.abspath(path)
    olds = [old for old in glob.glob(glob.escape(path) + OLD_INFIX + "*")
            if _OLD_NAME.fullmatch(os.path.basename(old)) and os.path.isdir(old)]
    if len(olds) != 1:  # none, or several: which one was current is not known; keep them all
        return None
    try:
        os.rename(olds[0], path)
    except OSError:
        if os.path.lexists(path) or not os.path.lexists(olds[0]):
            return None  # another process of the same run moved it back first
        raise
    return olds[0]


def remove_leftovers(directory: str, names: tuple[str, ...] | None = None) -> list[str]:
    """Clear what a killed writer left in `directory` for the targets `names` (or all): its
    temporaries, and the old copy of a replaced directory (moved back where the new one never
    arrived, `restore_replaced`); the paths removed. Call it only while holding the
    directory's lock."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    prefixes = (TMP_PREFIX,) if names is None else tuple(_tmp_prefix(n) for n in names)
    olds = {}  # entry -> the target it was the old copy of
    for entry in os.listdir(directory):
        match = _OLD_NAME.fullmatch(entry)
        if match and (names is None or match[1] in names) and os.path.isdir(
                os.path.join(directory, entry)):
            olds[entry] = match[1]
    for target in sorted(set(olds.values())):
        restore_replaced(os.path.join(directory, target))
    for entry in sorted(os.listdir(directory)):
        if entry.startswith(prefixes) or entry in olds:
            path = os.path.join(directory, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(path)
    return removed


# ------------------------------------------------------------------------ output locations
# Every directory an output replaces is checked first, by one rule: it may be replaced only
# if it is missing, empty, or an earlier output of the same kind (recognised by its marker
# file), and it is never a work directory, one that contains one, the filesystem root, the
# home directory or this repository. A setting that names a user's folder by mistake thus
# stops in one line instead of deleting it.

@dataclasses.dataclass(frozen=True)
class OutputKind:
    """What an output directory of one kind holds, to recognise an earlier one."""

    name: str  # in messages: "resnet tower", "export"
    marker: str  # a JSON file every such directory holds
    fields: tuple[tuple[str, Any], ...] = ()  # values the marker holds, e.g. (("kind", "resnet"),)
    entries: frozenset[str] | None = None  # the only names directly inside (None: any)


LOCK_PREFIX = ".lock-"  # `locks.DirectoryLock`'s files: a directory some run writes in
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_output_location(path: str, kind: OutputKind | None, what: str,
                          workdir: str | None = None) -> str:
    """The absolute `path` if an output of `kind` may be written there, replacing what is
    there; else `WouldOverwrite`, one line naming `what` (the setting) and the path.

    Read-only but for `restore_replaced` (an earlier write killed half way is undone first,
    so that what is judged is what the user had). `kind` None: only the places that are
    never outputs are refused (an unlabelled writer's target)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.islink(path):
        raise WouldOverwrite(f"{what}: {path} is a symbolic link; name the directory itself")
    real = os.path.realpath(path)
    protected = [(os.path.realpath(workdir), "the work directory")] if workdir else []
    protected += [(os.path.realpath(os.path.expanduser("~")), "the home directory"),
                  (_REPO, "the astroclip_jax repository")]
    if real == os.path.dirname(real):
        raise WouldOverwrite(f"{what}: {path} is the filesystem root")
    for place, name in protected:
        if real == place or place.startswith(real.rstrip(os.sep) + os.sep):
            relation = "is" if real == place else "contains"
            raise WouldOverwrite(f"{what}: {path} {relation} {name} ({place}); name a folder "
                                 "of its own for this output")
    restore_replaced(path)
    if not os.path.lexists(path):
        parent = os.path.dirname(path)
        while not os.path.lexists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise WouldOverwrite(f"{what}: {parent} is a file, so {path} cannot be made")
        return path
    if not os.path.isdir(path):
        raise WouldOverwrite(f"{what}: {path} is a file, not a directory; name a new folder")
    names = os.listdir(path)
    if not names:
        return path
    locks = sorted(n for n in names if n.startswith(LOCK_PREFIX))
    if locks:
        raise WouldOverwrite(f"{what}: {path} is a directory runs write in (it holds "
                             f"{locks[0]}); name a folder of its own for this output")
    if kind is not None:
        problem = _kind_problem(path, kind, names)
        if problem:
            raise WouldOverwrite(f"{what}: {path} {problem}, so it is not an earlier "
                                 f"{kind.name} and will not be replaced; name a new folder or "
                                 "move it away")
    for folder, dirs, inside in os.walk(path):
        locks = sorted(n for n in dirs + inside if n.startswith(LOCK_PREFIX))
        if locks:
            raise WouldOverwrite(f"{what}: {path} contains a directory runs write in "
                                 f"({os.path.join(folder, locks[0])}); name a folder of its "
                                 "own for this output")
    return path


def _kind_problem(path: str, kind: OutputKind, names: list[str]) -> str | None:
    """Why the non-empty directory `path` is not an output of `kind` (in words), or None."""
    marker = os.path.join(path, kind.marker)
    try:
        with open(marker, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        return f"is not empty and has no {kind.marker}"
    except (OSError, ValueError):
        return f"has an unreadable {kind.marker}"
    for field, value in kind.fields:
        found = meta.get(field) if isinstance(meta, dict) else None
        if found != value:
            return f"holds a {kind.marker} with {field} {found!r}, not {value!r}"
    extra = sorted(set(names) - kind.entries) if kind.entries is not None else []
    if extra:
        return f"holds {extra[0]!r}, which a {kind.name} never has"
    return None


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
