"""Reading AstroCLIP's cross-matched file `astroclip_desi.1.1.5.h5`, with validation.

Layout (upstream): groups "0".."9", each holding
    images     (N, 152, 152, 3) float32 g, r, z flux, stored as the transpose of (3, 152, 152):
               axis 1 is x (width), axis 2 is y (height); we swap them back to (y, x)
    spectra    (N, 7781) or (N, 7781, 1) float32 raw flux on the DESI grid
    redshifts  (N,) float32
    targetids  (N,) int64
Split rule (upstream HF script `_generate_examples`): in each group rows [0, int(0.8 * N)) are
train and the rest test; rows are pre-shuffled.

Each target must appear once in the whole file: a targetid repeated within a group or across
groups is an error naming both places (`duplicate_policy="raise"`), or with "drop" every
occurrence after the first (in group, then row order) is left out of both splits and counted.

The layout of every group is validated before the first example is produced; values (NaN/inf)
are checked block by block as they are read (a failure then aborts the tfds build, which leaves
nothing behind). Errors name the file, group, row and field and say what was expected.
"""

import dataclasses
import logging
import os
from typing import Iterator

import h5py
import numpy as np

from astroclip_jax import errors
from astroclip_jax.data import hdf5_files

FILENAME = "astroclip_desi.1.1.5.h5"
URL = "https://users.flatironinstitute.org/~flanusse/astroclip_desi.1.1.5.h5"
GROUPS = tuple(str(i) for i in range(10))
IMAGE_SHAPE = (152, 152, 3)
SPECTRUM_LENGTH = 7781
TRAIN_FRACTION = 0.8
SPLITS = ("train", "test")
NAN_POLICIES = ("raise", "mask")
DUPLICATE_POLICIES = ("raise", "drop")
DATASETS = ("images", "spectra", "redshifts", "targetids")


class AstroclipFileError(errors.DataError):
    """The file does not have the upstream layout or holds values we cannot use."""


@dataclasses.dataclass(frozen=True)
class Duplicates:
    """Rows whose targetid already appeared earlier in the file (group order, then row order).

    drop: {group: sorted row indices left out}; rows: how many rows that is; targetids: how
    many distinct targetids appear more than once; examples: a few {targetid: [[group, row],
    ...]} with every occurrence, for the report.
    """
    drop: dict
    rows: int
    targetids: int
    examples: dict

    def report(self) -> dict:
        """JSON-able summary (for the prepared dataset's metadata)."""
        return {"dropped_rows": self.rows, "duplicated_targetids": self.targetids,
                "examples": {str(k): v for k, v in self.examples.items()}}


def split_range(n: int, split: str) -> tuple[int, int]:
    """Rows of one group that belong to `split`: upstream's int(0.8 * N) cut."""
    cut = int(TRAIN_FRACTION * n)
    if split == "train":
        return 0, cut
    if split == "test":
        return cut, n
    raise errors.ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")


def open_file(path: str) -> h5py.File:
    """Open the file read-only, with a clear error for a missing or truncated file."""
    return hdf5_files.open_hdf5(path, "AstroCLIP file", AstroclipFileError)


def inspect(path: str, groups=GROUPS) -> dict:
    """Validate the layout of every group; return {group: number of rows}."""
    path = os.fspath(path)
    sizes = {}
    with open_file(path) as handle:
        for group in groups:
            sizes[group] = _check_group(handle, path, group)
    return sizes


def split_sizes(sizes: dict) -> dict:
    """Examples per split given rows per group."""
    out = {}
    for split in SPLITS:
        out[split] = sum(stop - start for start, stop in
                         (split_range(n, split) for n in sizes.values()))
    return out


def check_split_not_empty(path: str, sizes: dict, split: str) -> None:
    """An empty split would silently train or evaluate on nothing."""
    if split_sizes(sizes)[split] == 0:
        raise AstroclipFileError(f"AstroCLIP file {path!r}: split {split!r} is empty "
                                 f"(rows per group: {sizes})")


def _group_targetids(handle: h5py.File, path: str, groups) -> dict:
    """{group: all its targetids (int64)}."""
    out = {}
    for group in groups:
        targetids = handle[group]["targetids"]
        out[group] = _read(targetids, path, group, "targetids", 0, len(targetids)).astype(np.int64)
    return out


def find_duplicates(path: str, policy: str = "raise", groups=GROUPS) -> Duplicates:
    """Targetids that appear more than once in the file, within a group or across groups.

    policy "raise": the first repeated targetid (in file order) is an error naming every group
    and row it appears in; "drop": the occurrences after the first are returned as rows to
    leave out.
    """
    check_duplicate_policy(policy)
    path = os.fspath(path)
    inspect(path, groups)
    with open_file(path) as handle:
        ids = _group_targetids(handle, path, groups)
    places = [(group, row) for group, v in ids.items() for row in range(len(v))]
    flat = np.concatenate([np.zeros(0, np.int64), *ids.values()])
    order = np.argsort(flat, kind="stable")  # equal ids stay in file order
    repeat = np.zeros(len(flat), dtype=bool)
    repeat[order[1:]] = flat[order[1:]] == flat[order[:-1]]
    repeated = list(dict.fromkeys(flat[repeat].tolist()))  # in the order they repeat
    examples = {tid: [list(places[i]) for i in np.flatnonzero(flat == tid)]
                for tid in repeated[:5]}
    if repeated and policy == "raise":
        tid, where = next(iter(examples.items()))
        listed = ", ".join(f"group {g!r} row {r}" for g, r in where)
        raise AstroclipFileError(
            f"AstroCLIP file {path!r}: targetid {tid} appears {len(where)} times ({listed}); "
            f"{len(repeated)} targetid(s) repeat in {int(repeat.sum())} extra row(s) in all. "
            "Each target must appear once (a repeat can sit in both train and test and takes "
            "the same PROVABGS values); set data.duplicate_policy='drop' to keep the first "
            "occurrence and drop the others")
    drop = {}
    for i in np.flatnonzero(repeat):
        group, row = places[i]
        drop.setdefault(group, []).append(row)
    return Duplicates(drop={g: np.array(rows, np.int64) for g, rows in drop.items()},
                      rows=int(repeat.sum()), targetids=len(repeated), examples=examples)


def check_nan_policy(policy: str) -> None:
    if policy not in NAN_POLICIES:
        raise errors.ConfigError(f"config field data.nan_policy is {policy!r}; expected one of "
                                 f"{list(NAN_POLICIES)}")


def check_duplicate_policy(policy: str) -> None:
    if policy not in DUPLICATE_POLICIES:
        raise errors.ConfigError(f"config field data.duplicate_policy is {policy!r}; expected "
                                 f"one of {list(DUPLICATE_POLICIES)}")


def _kept(sizes: dict, split: str, duplicates: Duplicates) -> dict:
    """{group: rows of `split` in the group that are not dropped}."""
    out = {}
    for group, n in sizes.items():
        rows = np.arange(*split_range(n, split), dtype=np.int64)
        out[group] = np.setdiff1d(rows, duplicates.drop.get(group, ()), assume_unique=True)
    return out


def read_targetids(path: str, split: str, groups=GROUPS, *,
                   duplicate_policy: str = "raise") -> np.ndarray:
    """All targetids of `split`, in the order `iter_blocks` yields them (same policy)."""
    path = os.fspath(path)
    duplicates = find_duplicates(path, duplicate_policy, groups)
    with open_file(path) as handle:
        ids = _group_targetids(handle, path, groups)
    kept = _kept({g: len(v) for g, v in ids.items()}, split, duplicates)
    parts = [ids[group][kept[group]] for group in groups]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


def iter_blocks(path: str, split: str, *, nan_policy: str = "raise", block_size: int = 256,
                groups=GROUPS, counts: dict | None = None,
                duplicate_policy: str = "raise") -> Iterator[dict]:
    """Yield the rows of `split` as blocks of at most `block_size` rows, group by group.

    Repeated targetids raise (duplicate_policy "raise") or all but their first occurrence are
    left out ("drop"), see `find_duplicates`; a block then holds fewer rows, never a gap.

    Each block holds "group" (str), "row" (int64 row indices in the group), "image"
    (n, 152, 152, 3) float32 with height and width un-swapped, "spectrum" (n, 7781) float32,
    "redshift" float32 and "targetid" int64. Non-finite values raise (nan_policy "raise") or
    (nan_policy "mask") image and spectrum pixels become 0 and redshifts stay NaN, counted in
    `counts` ({field: [examples, values]}) and logged at the end.
    """
    check_nan_policy(nan_policy)
    path = os.fspath(path)
    counts = {} if counts is None else counts
    sizes = inspect(path, groups)
    check_split_not_empty(path, sizes, split)
    duplicates = find_duplicates(path, duplicate_policy, groups)
    kept = _kept(sizes, split, duplicates)
    if not sum(map(len, kept.values())):
        raise AstroclipFileError(f"AstroCLIP file {path!r}: split {split!r} is empty once the "
                                 f"{duplicates.rows} repeated targetid row(s) are dropped")
    with open_file(path) as handle:
        for group in groups:
            data = handle[group]
            start, stop = split_range(sizes[group], split)
            for lo in range(start, stop, block_size):
                hi = min(lo + block_size, stop)
                keep = np.isin(np.arange(lo, hi), kept[group])
                if not keep.any():
                    continue
                block = {
                    "group": group,
                    "row": np.arange(lo, hi, dtype=np.int64)[keep],
                    # Stored (x, y): swap back to (y, x) = (height, width).
                    "image": _read(data["images"], path, group, "images", lo, hi)[keep]
                    .astype(np.float32).transpose(0, 2, 1, 3),
                    "spectrum": _read(data["spectra"], path, group, "spectra", lo, hi)[keep]
                    .astype(np.float32).reshape(-1, SPECTRUM_LENGTH),
                    "redshift": _read(data["redshifts"], path, group, "redshifts", lo, hi)[keep]
                    .astype(np.float32),
                    "targetid": _read(data["targetids"], path, group, "targetids", lo, hi)[keep]
                    .astype(np.int64),
                }
                for field in ("image", "spectrum", "redshift"):
                    _handle_non_finite(block, field, nan_policy, path, counts)
                yield block
    if counts:
        logging.warning("AstroCLIP file %s, split %s: non-finite values masked "
                        "{field: [examples, values]}: %s", path, split, counts)


def _check_group(handle: h5py.File, path: str, group: str) -> int:
    if group not in handle:
        raise AstroclipFileError(f"AstroCLIP file {path!r}: group {group!r} is missing; "
                                 f"found groups {sorted(handle.keys())}, expected {list(GROUPS)}")
    data = handle[group]
    for name in DATASETS:
        if name not in data or not isinstance(data[name], h5py.Dataset):
            raise AstroclipFileError(f"AstroCLIP file {path!r}, group {group!r}: dataset "
                                     f"{name!r} is missing; found {sorted(data.keys())}")
    n = data["targetids"].shape[0] if data["targetids"].ndim else -1
    expected = {
        "images": [(n,) + IMAGE_SHAPE],
        "spectra": [(n, SPECTRUM_LENGTH), (n, SPECTRUM_LENGTH, 1)],
        "redshifts": [(n,)],
        "targetids": [(n,)],
    }
    kinds = {"images": "f", "spectra": "f", "redshifts": "f", "targetids": "iu"}
    for name in DATASETS:
        dataset = data[name]
        if dataset.shape not in expected[name]:
            raise AstroclipFileError(
                f"AstroCLIP file {path!r}, group {group!r}, dataset {name!r}: shape "
                f"{dataset.shape}, expected {' or '.join(map(str, expected[name]))} "
                f"(N = {n} from targetids)")
        if dataset.dtype.kind not in kinds[name]:
            want = "floating point (float32)" if kinds[name] == "f" else "integer (int64)"
            raise AstroclipFileError(
                f"AstroCLIP file {path!r}, group {group!r}, dataset {name!r}: dtype "
                f"{dataset.dtype}, expected {want}")
    return n


def _read(dataset: h5py.Dataset, path: str, group: str, name: str, lo: int, hi: int):
    return hdf5_files.read_dataset(
        dataset, f"AstroCLIP file {path!r}, group {group!r}, dataset {name!r}, rows "
        f"{lo}..{hi - 1}", slice(lo, hi), AstroclipFileError)


def _handle_non_finite(block: dict, field: str, nan_policy: str, path: str, counts: dict):
    values = block[field]
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    per_example = bad.reshape(len(values), -1).any(axis=1)
    if nan_policy == "raise":
        first = int(np.flatnonzero(per_example)[0])
        where = np.argwhere(bad[first])[0].tolist() if values.ndim > 1 else []
        raise AstroclipFileError(
            f"AstroCLIP file {path!r}, group {block['group']!r}, row {int(block['row'][first])} "
            f"(targetid {int(block['targetid'][first])}), field {field!r}: non-finite value "
            f"{float(values[first][tuple(where)])} at {where or 'scalar'}; expected finite numbers "
            f"({int(per_example.sum())} example(s) in this block). Use nan_policy='mask' to set "
            f"them to 0 and count them instead.")
    if field != "redshift":  # a missing redshift stays NaN, like any unknown property
        values[bad] = 0.0
    tally = counts.setdefault(field, [0, 0])
    tally[0] += int(per_example.sum())
    tally[1] += int(bad.sum())
