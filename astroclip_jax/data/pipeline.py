"""grain input pipeline over tfds ArrayRecord data sources: the training order, the train
and eval loaders, and random access to preprocessed records (for the feature cache).

Everything here receives `settings.DataSettings` (the `data` section of the config, resolved).

Batches (ARCHITECTURE's Batch contract) are dicts of NumPy arrays: image (B, H, W, 3) float32
after crop + transform, spectrum (B, L) float32 normalised, targetid int64, redshift, z_hp,
log_mstar float32 (NaN where unknown), has_props bool; eval batches add mask bool.

Training order (`step_indices`, the one definition). Epoch e visits the records in the
permutation rng([seed, e]); global step s of that epoch is the slice [s * G, (s + 1) * G) of it
(G = global batch, remainder dropped), and process p of P yields rows [p * G/P, (p + 1) * G/P)
of that slice. So the processes read disjoint records, their batches together are exactly the
one-process global batch, and step t's batch is a pure function of (seed, t): a loader started
at `start_step = state.step` continues a run exactly, and the online and the cached steps see
the same galaxies at the same step. With num_workers > 0 close the loader when done (it owns
worker processes), and guard scripts with `if __name__ == "__main__"` (workers are spawned).
"""

import functools
import logging
import os

import grain
import numpy as np
import tensorflow_datasets as tfds

from absl import flags

from astroclip_jax import wavelength_grids
from astroclip_jax.data import builders, preprocess
from astroclip_jax.settings import DataSettings
from astroclip_jax.errors import DataError, MissingInput

# Fields of a stored record that make up a batch (before preprocessing), and their dtypes.
BATCH_FIELDS = {"image": np.float32, "spectrum": np.float32, "targetid": np.int64,
                "redshift": np.float32, "z_hp": np.float32, "log_mstar": np.float32,
                "has_props": np.bool_}
_FOREVER = 2 ** 62  # steps of an endless run; grain only needs a length


def data_source(data: DataSettings, split: str):
    """The tfds ArrayRecord data source of `split` (the dataset must be prepared), after
    checking that its spectra are on the configured grid."""
    builder = builders.builder(data.name, data.builder_config, data_dir=data.data_dir)
    if not os.path.exists(os.fspath(builder.data_dir)):
        raise MissingInput(
            f"dataset {data.name}/{data.builder_config} is not prepared: no "
            f"{os.fspath(builder.data_dir)}; run `python main.py --config=... --mode=prepare` "
            f"(or astroclip_jax.data.prepare.prepare) first")
    source = builder.as_data_source(split=split)
    metadata = source.dataset_info.metadata or {}
    preprocess.check_grid(wavelength_grids.wave(metadata.get("grid", "desi")),
                          wavelength_grids.wave(data.grid))
    return source


def steps_per_epoch(num_records: int, global_batch_size: int) -> int:
    """Full global batches per epoch (the remainder is dropped)."""
    return num_records // global_batch_size


@functools.lru_cache(maxsize=4)
def _permutation(num_records: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def step_indices(num_records: int, seed: int, step: int, global_batch_size: int) -> np.ndarray:
    """Record indices of global training step `step` (the module docstring's training order)."""
    per_epoch = steps_per_epoch(num_records, global_batch_size)
    epoch, within = divmod(int(step), per_epoch)
    return _permutation(num_records, seed, epoch)[within * global_batch_size:
                                                  (within + 1) * global_batch_size]


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of a global batch that process `process_index` of `process_count` holds."""
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} does not split over "
                         f"{process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    local = global_batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


@functools.lru_cache(maxsize=16)
def _decoder(features, fields: tuple[str, ...]):
    """A FeaturesDict of only `fields`: parsing a record with it decodes nothing else (tfds'
    NumPy parser skips the keys its spec lacks)."""
    return tfds.features.FeaturesDict({name: features[name] for name in fields})


def read_records(source, indices, fields=tuple(BATCH_FIELDS)) -> dict[str, np.ndarray]:
    """Records `indices` of the tfds `source`, stacked per field (raw: before preprocessing).

    Only `fields` are decoded (a record is read and parsed whole, but a field not asked for,
    e.g. the synthetic `ivar`, is not converted); Batch-contract fields get their dtypes."""
    decoder = _decoder(source.dataset_info.features, tuple(fields))
    raw = source.data_source.__getitems__([int(i) for i in indices])
    records = [decoder.deserialize_example_np(r) for r in raw]
    out = {name: np.stack([r[name] for r in records]) for name in fields}
    return {name: v.astype(BATCH_FIELDS[name], copy=False) if name in BATCH_FIELDS else v
            for name, v in out.items()}


class PreprocessedRecords:
    """Random access to preprocessed rows of one split: `batch(indices)` -> the fields the
    towers read (`image`, `spectrum`, `spectrum_scale`), in record order. The feature cache
    reads the training split through it, with the same preprocessing as the loaders."""

    def __init__(self, data: DataSettings, split: str):
        self._source, self._data = data_source(data, split), data

    def __len__(self) -> int:
        return len(self._source)

    def batch(self, indices) -> dict[str, np.ndarray]:
        raw = read_records(self._source, indices, ("image", "spectrum"))
        out = preprocess.preprocess_batch(raw, self._data)
        return {k: np.asarray(out[k], np.float32) for k in ("image", "spectrum", "spectrum_scale")}


def _to_iter(dataset: grain.MapDataset, data: DataSettings, prefetch: int) -> grain.IterDataset:
    """Prefetch whole batches: threads in this process, or grain worker processes."""
    workers = data.num_workers
    read = grain.ReadOptions(num_threads=max(1, min(prefetch, 4)), prefetch_buffer_size=prefetch)
    iterable = dataset.to_iter_dataset(read)
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside main.py
            flags.FLAGS.mark_as_parsed()  # (tests, notebooks) use their defaults
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iterable


class TrainLoader:
    """This process's part of each global training batch, from global step `start_step` on.

    An iterator of preprocessed batches; a context manager that closes the grain workers."""

    def __init__(self, data: DataSettings, split: str, global_batch_size: int, seed: int,
                 start_step: int = 0, num_epochs: int | None = None, process_index: int = 0,
                 process_count: int = 1, prefetch: int = 2):
        rows = process_rows(global_batch_size, process_index, process_count)
        source = data_source(data, split)
        num_records = len(source)
        per_epoch = steps_per_epoch(num_records, global_batch_size)
        if per_epoch == 0:
            raise DataError(f"split {split!r} of {data.name}/{data.builder_config} has "
                             f"{num_records} examples, fewer than one global batch of "
                             f"{global_batch_size}")
        self.steps_per_epoch = per_epoch

        def load(step: int) -> dict:
            indices = step_indices(num_records, seed, step, global_batch_size)[rows]
            return preprocess.preprocess_batch(read_records(source, indices), data)

        total = per_epoch * num_epochs if num_epochs is not None else _FOREVER
        logging.info("train loader %s: %d examples, %d steps/epoch, local batch %d of %d, "
                     "from step %d", split, num_records, per_epoch, rows.stop - rows.start,
                     global_batch_size, start_step)
        steps = grain.MapDataset.range(int(start_step), total).map(load)
        self._iterator = iter(_to_iter(steps, data, prefetch))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EvalLoader:
    """Re-iterable, in-order batches covering every example once; padding rows have mask False.

    Batches of `batch_size` (global) in record order; the last one padded. With several
    processes each yields its slice of every global batch, and all yield the same number of
    batches. Padding rows: zero image and spectrum, targetid -1, NaN properties.
    """

    def __init__(self, data: DataSettings, split: str, batch_size: int, process_index: int = 0,
                 process_count: int = 1, prefetch: int = 2):
        rows = process_rows(batch_size, process_index, process_count)
        self.source = data_source(data, split)
        num_records = len(self.source)
        if num_records == 0:
            raise DataError(f"split {split!r} of {data.name}/{data.builder_config} is empty")
        local = rows.stop - rows.start
        source = self.source

        def load(step: int) -> dict:
            start = step * batch_size + rows.start
            indices = np.arange(start, min(start + local, num_records))
            batch = _pad(read_records(source, indices if len(indices) else [0]), local,
                         len(indices))
            batch["mask"] = np.arange(local) < len(indices)
            return preprocess.preprocess_batch(batch, data)

        self._dataset = grain.MapDataset.range(-(-num_records // batch_size)).map(load)
        self._data, self._prefetch = data, prefetch

    def __len__(self) -> int:
        return len(self._dataset)

    def __iter__(self):
        return iter(_to_iter(self._dataset, self._data, self._prefetch))


def pad_rows(x, rows: int) -> np.ndarray:
    """`x` zero-padded to `rows` rows (itself when it has them): one compiled shape for every
    batch, the last one included."""
    x = np.asarray(x)
    if len(x) == rows:
        return x
    return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


def _pad(batch: dict, size: int, valid: int) -> dict:
    """The first `valid` rows of `batch`, padded to `size` rows."""
    fill = {"targetid": -1, "redshift": np.nan, "z_hp": np.nan, "log_mstar": np.nan,
            "has_props": False, "image": 0.0, "spectrum": 0.0}
    return {name: np.concatenate([value[:valid], np.full((size - valid,) + value.shape[1:],
                                                         fill[name], dtype=value.dtype)])
            for name, value in batch.items()}
