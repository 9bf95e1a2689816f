"""Surveys of one modality: image-only cutout files (the Legacy Survey layout of
ssl-legacysurvey) and spectrum-only files on a spectrograph's grid, read in row ranges.

Image-only: what ssl-legacysurvey (Stein et al.) publishes and reads, matched against its
`ssl_legacysurvey/utils/load_data.py` (`DecalsDataLoader`) and
`ssl_legacysurvey/data_loaders/decals_dataloader.py` (`DecalsDataset`):
- one HDF5 file, or a directory of HDF5 chunk files read in sorted file-name order
  (`sorted(glob(image_dir + "*"))`), the rows of all files numbered 0..N-1 in that order;
- `images`: (N, 3, 152, 152) float32 g, r, z flux in nanomaggies, channels first (upstream's
  `hf['images'][i]` is (3, H, W)); (N, 152, 152, 3) channels last is accepted too (the layout
  of AstroCLIP's own files). Channels-first images are transposed to (H, W, 3) exactly
  (upstream's `np.swapaxes(im, 0, 2)` also swaps H and W, which its rotation-invariant
  training did not mind);
- catalogue columns beside `images`, one value per galaxy (`ra`, `dec`, `z_phot_median`,
  `ebv`, `brickid`, `objid`, ...); like `DecalsDataLoader` only fields with one entry per image
  are used, and of those the one-value-per-galaxy numeric ones are carried along (per-band
  arrays such as `flux` (N, 3) are split into `flux_0`, `flux_1`, `flux_2`).
- Galaxies are keyed by `targetid` when the files have one, else by their row number in the
  survey (upstream's `inds`).

Spectrum-only: the same layout with `spectrum` (N, L) flux on the grid the spectrum tower was
trained on (L = 7781 for DESI; an optional `wave` (L,) dataset is checked against it), plus
catalogue columns (`targetid`, `ra`, `dec`, `z`, ...).

Nothing is loaded whole: `read(start, stop)` opens the files that hold those rows.

Poisoned input follows the dataset's policies: rows whose targetid is repeated, NaN, negative or
not an integer follow `data.duplicate_policy` (`targetid_drops`: one line naming the file and row,
or all but the first occurrence left out and counted), rows with non-finite flux follow
`data.nan_policy` (`finite_rows`). A survey without rows, or with files that disagree on the row
shape or on having a `targetid`, is one line naming the file.
"""

from __future__ import annotations

import glob
import os
from typing import Sequence

import h5py
import numpy as np

from astroclip_jax.data import astroclip_desi
from astroclip_jax.errors import DataError, MissingInput

IMAGE_KEY, SPECTRUM_KEY = "images", "spectrum"
TARGETID = "targetid"
_INT64_MAX = np.iinfo(np.int64).max


def _list_files(path: str) -> list[str]:
    if os.path.isdir(path):
        found = sorted(p for p in glob.glob(os.path.join(path, "*"))
                       if p.endswith((".h5", ".hdf5")))
        if not found:
            raise MissingInput(f"survey directory {path} holds no .h5/.hdf5 files")
        return found
    if not os.path.isfile(path):
        raise MissingInput(f"survey file {path} does not exist")
    return [path]


class SurveyFiles:
    """An image-only or spectrum-only survey (module docstring), read by row ranges.

    Attributes: `files`, `modality` ("image" or "spectrum"), `n` rows, `columns` (the
    catalogue columns carried along, name -> dtype), `stamp` (the files' names, sizes and
    modification times: what the embeddings are keyed by, instead of hashing terabytes)."""

    def __init__(self, path: str):
        self.path = path
        self.files = _list_files(path)
        counts, column_sets = [], []
        for i, name in enumerate(self.files):
            try:
                with h5py.File(name, "r") as f:
                    modality, n = self._modality(f, name)
                    if i and modality != self.modality:
                        raise DataError(f"survey file {name} holds {modality}s, {self.files[0]} "
                                        f"holds {self.modality}s: one modality per survey")
                    row_shape = f[self._key].shape[1:] if i else None
                    if i and row_shape != self.row_shape:  # rows could not be stacked
                        raise DataError(f"survey file {name}: {self._key} rows have shape "
                                        f"{row_shape}, {self.files[0]}'s have {self.row_shape}; "
                                        "every file of a survey holds rows of one shape")
                    self.modality = modality
                    self.row_shape = f[self._key].shape[1:]
                    columns = _catalogue_columns(f, n, self._key)
                    if (TARGETID in f) != (TARGETID in columns):
                        item = f[TARGETID]
                        what = (f"shape {item.shape}, dtype {item.dtype}"
                                if isinstance(item, h5py.Dataset) else "a group")
                        raise DataError(f"survey file {name}: '{TARGETID}' is {what}; expected "
                                        f"({n},) integers, one per row")
                    column_sets.append(columns)
                    counts.append(n)
            except OSError as err:
                raise DataError(f"survey file {name} is not readable HDF5 ({err})") from None
        with_ids = [TARGETID in c for c in column_sets]
        if any(with_ids) and not all(with_ids):  # the ids would silently become row numbers
            raise DataError(f"survey file {self.files[with_ids.index(False)]} has no "
                            f"'{TARGETID}' but {self.files[with_ids.index(True)]} has: every "
                            "file of a survey has one, or none does")
        names = set.intersection(*(set(c) for c in column_sets))  # those all files hold
        self.columns = {k: v for k, v in column_sets[0].items() if k in names}
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        if self.n == 0:
            raise DataError(f"survey {path} has no rows ({self._key} is empty in "
                            f"{len(self.files)} file(s)): nothing to embed")
        self.stamp = [[os.path.basename(p), os.path.getsize(p), os.stat(p).st_mtime_ns]
                      for p in self.files]

    @property
    def _key(self) -> str:
        return IMAGE_KEY if self.modality == "image" else SPECTRUM_KEY

    @staticmethod
    def _modality(f: h5py.File, name: str) -> tuple[str, int]:
        if IMAGE_KEY in f:
            shape = _numeric(f, IMAGE_KEY, name).shape
            if len(shape) != 4 or 3 not in (shape[1], shape[3]) or 0 in shape[1:]:
                raise DataError(f"survey file {name}: images has shape {shape}; expected "
                                "(N, 3, H, W) or (N, H, W, 3) g, r, z cutouts")
            return "image", shape[0]
        if SPECTRUM_KEY in f:
            shape = _numeric(f, SPECTRUM_KEY, name).shape
            if len(shape) != 2 or shape[1] == 0:
                raise DataError(f"survey file {name}: spectrum has shape {shape}; expected "
                                "(N, L) flux on the spectrum tower's grid")
            return "spectrum", shape[0]
        raise DataError(f"survey file {name} has neither '{IMAGE_KEY}' (image cutouts) nor "
                        f"'{SPECTRUM_KEY}' (spectra); it has {sorted(f.keys())}")

    def wave(self) -> np.ndarray | None:
        """The files' own wavelength grid (spectrum surveys that store `wave`), or None."""
        with h5py.File(self.files[0], "r") as f:
            return np.asarray(f["wave"], np.float64) if "wave" in f else None

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop): `image` (n, H, W, 3) or `spectrum` (n, L) float32 raw flux,
        `targetid` int64, `index` int64 (the row in the survey) and the catalogue columns."""
        parts: dict[str, list[np.ndarray]] = {}
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for i in range(max(first, 0), len(self.files)):
            lo, hi = max(start, self.offsets[i]), min(stop, self.offsets[i + 1])
            if lo >= hi:
                if self.offsets[i] >= stop:
                    break
                continue
            a, b = int(lo - self.offsets[i]), int(hi - self.offsets[i])
            try:
                with h5py.File(self.files[i], "r") as f:
                    values = {self.modality: _modality_rows(f[self._key], a, b)}
                    for name in self.columns:
                        values[name] = _column_rows(f, name, a, b)
            except (OSError, KeyError) as err:  # truncated or changed since it was opened
                raise DataError(f"survey file {self.files[i]}: cannot read rows {a}..{b - 1} "
                                f"(truncated or changed file?): {err}") from None
            for name, value in values.items():
                parts.setdefault(name, []).append(value)
        out = {name: np.concatenate(chunks) for name, chunks in parts.items()}
        out["index"] = np.arange(start, stop, dtype=np.int64)
        if TARGETID in out:
            # Invalid ids (NaN, negative) are rows `targetid_drops` leaves out or refuses.
            with np.errstate(invalid="ignore"):
                out[TARGETID] = out[TARGETID].astype(np.int64)
        else:
            out[TARGETID] = out["index"].copy()
        return out

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) of an image survey's cutouts, channels first or last."""
        shape = self.row_shape
        return (shape[1], shape[2]) if shape[0] == 3 and shape[2] != 3 else (shape[0], shape[1])

    def locate(self, row: int) -> tuple[str, int]:
        """(file, row in that file) of survey row `row`, for messages."""
        i = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return self.files[i], int(row - self.offsets[i])

    def targetid_drops(self, policy: str) -> np.ndarray:
        """Sorted survey rows to leave out under `data.duplicate_policy` `policy`: rows whose
        targetid is not a non-negative integer, and every occurrence of a targetid after its
        first (in row order). "raise": a DataError naming the file and row instead. Reads only
        the targetid column; rows are numbered, not keyed, when the files have none."""
        astroclip_desi.check_duplicate_policy(policy)
        if TARGETID not in self.columns:
            return np.zeros(0, np.int64)
        ids = []
        for name in self.files:
            try:
                with h5py.File(name, "r") as f:
                    ids.append(np.asarray(f[TARGETID][:]))
            except (OSError, KeyError) as err:  # truncated or changed since it was opened
                raise DataError(f"survey file {name}: cannot read '{TARGETID}' ({err})") from None
        ids = np.concatenate(ids)
        with np.errstate(invalid="ignore"):
            valid = ((ids >= 0) & (ids <= _INT64_MAX) if ids.dtype.kind in "iu"
                     else np.isfinite(ids) & (ids >= 0) & (ids < 2.0 ** 63)
                     & (ids == np.round(ids)))
        if not valid.all() and policy == "raise":
            row = int(np.flatnonzero(~valid)[0])
            file, at = self.locate(row)
            raise DataError(
                f"survey file {file}, row {at}: targetid {ids[row].item()!r}; expected a "
                f"non-negative integer ({int((~valid).sum())} such row(s) in {self.path}). Set "
                "data.duplicate_policy='drop' to leave such rows out")
        keys = np.where(valid, ids, 0).astype(np.int64)
        order = np.flatnonzero(valid)[np.argsort(keys[valid], kind="stable")]  # file order kept
        repeat = np.zeros(len(ids), bool)
        repeat[order[1:]] = keys[order[1:]] == keys[order[:-1]]
        if repeat.any() and policy == "raise":
            tid = int(keys[np.flatnonzero(repeat)[0]])
            places = ", ".join("{} row {}".format(*self.locate(r))
                               for r in np.flatnonzero(valid & (keys == tid))[:3])
            raise DataError(
                f"survey {self.path}: targetid {tid} appears more than once ({places}); "
                f"{int(repeat.sum())} repeated row(s) in all. Each galaxy must appear once; set "
                "data.duplicate_policy='drop' to keep the first occurrence and leave out the "
                "others")
        return np.flatnonzero(repeat | ~valid).astype(np.int64)


def finite_rows(values: np.ndarray) -> np.ndarray:
    """(n,) bool: the rows of `values` (n, ...) without NaN or inf."""
    values = np.asarray(values)
    return np.isfinite(values.reshape(len(values), -1)).all(axis=1)


def _numeric(f: h5py.File, key: str, name: str) -> h5py.Dataset:
    item = f[key]
    if not isinstance(item, h5py.Dataset) or item.dtype.kind not in "biuf":
        kind = item.dtype if isinstance(item, h5py.Dataset) else "a group"
        raise DataError(f"survey file {name}: '{key}' is {kind}; expected numbers (flux)")
    return item


def _modality_rows(dataset: h5py.Dataset, a: int, b: int) -> np.ndarray:
    x = np.asarray(dataset[a:b], np.float32)
    if x.ndim == 4 and x.shape[1] == 3 and x.shape[3] != 3:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # (N, 3, H, W) -> (N, H, W, 3)
    return x


def _catalogue_columns(f: h5py.File, n: int, skip: str) -> dict[str, np.dtype]:
    """Numeric per-galaxy fields (one entry per row): name -> dtype; (n, k) ones split."""
    out = {}
    for name, item in f.items():
        if name in (skip, "wave") or not isinstance(item, h5py.Dataset):
            continue
        if item.shape[:1] != (n,) or item.dtype.kind not in "biuf":
            continue
        if item.ndim == 1:
            out[name] = item.dtype
        elif item.ndim == 2 and item.shape[1] <= 16:
            out.update({f"{name}_{j}": item.dtype for j in range(item.shape[1])})
    return out


def _column_rows(f: h5py.File, name: str, a: int, b: int) -> np.ndarray:
    if name in f:
        return np.asarray(f[name][a:b])
    base, j = name.rsplit("_", 1)
    return np.asarray(f[base][a:b, int(j)])


def write_survey_file(path: str, images: np.ndarray | None = None,
                      spectra: np.ndarray | None = None, channels_first: bool = True,
                      wave: np.ndarray | None = None, **columns: Sequence) -> str:
    """Write one file in the layout `SurveyFiles` reads (tests, benchmarks, demos)."""
    with h5py.File(path, "w") as f:
        if images is not None:
            images = np.asarray(images)
            f.create_dataset(IMAGE_KEY, data=images.transpose(0, 3, 1, 2) if channels_first
                             else images, chunks=True)
        if spectra is not None:
            f.create_dataset(SPECTRUM_KEY, data=np.asarray(spectra), chunks=True)
        if wave is not None:
            f.create_dataset("wave", data=np.asarray(wave))
        for name, value in columns.items():
            f.create_dataset(name, data=np.asarray(value))
    return path
