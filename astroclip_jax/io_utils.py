"""Small file-system helpers shared by the package and the converters."""

from __future__ import annotations

import contextlib
import os
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
