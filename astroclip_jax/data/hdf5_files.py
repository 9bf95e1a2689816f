"""Opening and reading HDF5 files a user hands us (AstroCLIP's DESI file, PROVABGS, the
Multimodal Universe files), with bad files as one line that names the file and what it was.

h5py raises OSError both for a file that is not HDF5 at all and for a truncated one, which
opens but fails when a missing chunk is read; the readers turn both into their DataError.
"""

from __future__ import annotations

import os
from typing import Any

import h5py

from astroclip_jax.errors import DataError, MissingInput


def open_hdf5(path: str | os.PathLike, what: str, error: type[DataError] = DataError) -> h5py.File:
    """`path` opened read-only; `what` names the file in messages ("PROVABGS catalogue")."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingInput(f"{what} {path!r} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise error(f"{what} {path!r} is not a readable HDF5 file (truncated or corrupt?): "
                    f"{err}") from err


def read_dataset(dataset: h5py.Dataset, where: str, index: Any = (),
                 error: type[DataError] = DataError):
    """`dataset[index]`; `where` names the file and dataset in the message of a truncated file."""
    try:
        return dataset[index]
    except OSError as err:
        raise error(f"{where}: cannot be read (truncated file?): {err}") from err
