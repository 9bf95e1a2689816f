"""grain input pipeline over tfds ArrayRecord data sources: train and eval loaders.

Data config fields read here (section `data` of the config):
    name             "synthetic_desi" | "astroclip_desi"
    builder_config   tfds config, e.g. "small" (synthetic) or "joint" / "provabgs" (real)
    data_dir         tfds data dir; None -> tfds default (~/tensorflow_datasets)
    manual_dir       where the upstream files are (preparation only, see prepare.py)
    provabgs_path    PROVABGS catalogue (preparation only); None -> manual_dir
    grid             "desi" | "sdss": the grid the model expects; must match the dataset's
    image_crop       centre crop size (96); 0 or None keeps the full cutout
    image_transform  "stein_rgb" | "raw"
    spectrum_norm    "zscore" | "none"
    nan_policy       "raise" | "mask" (preparation of real data, see astroclip_desi.py)
    num_workers      0: read in threads of this process; > 0: that many grain worker processes

Batches (ARCHITECTURE's Batch contract) are dicts of NumPy arrays: image (B, H, W, 3) float32
after crop + transform, spectrum (B, L) float32 normalised, targetid int64, redshift, z_hp,
log_mstar float32 (NaN where unknown), has_props bool; eval batches add mask bool.

Training order. Epoch e visits the records in the permutation rng([seed, e]); global step s of
that epoch is the slice [s * G, (s + 1) * G) of it (G = global batch, remainder dropped), and
process p of P yields rows [p * G/P, (p + 1) * G/P) of that slice. So the processes read disjoint
records, their batches together are exactly the one-process global batch, and step t's batch is
a pure function of (seed, t). The loader is a grain iterator: `get_state()` returns a JSON-able
dict ({"next_index": t} with num_workers 0; per-worker positions otherwise, valid for the same
num_workers) and `set_state()` restores it, so a resumed run sees the same examples.
With num_workers > 0 call `iterator.close()` when done, and guard scripts with
`if __name__ == "__main__"` (workers are spawned).
"""

import functools
import logging
import os

import grain
import numpy as np

from absl import flags

from astroclip_jax.data import builders
from astroclip_jax.data import grids, preprocess

# Fields of a stored record that make up a batch (before preprocessing), and their dtypes.
BATCH_FIELDS = {"image": np.float32, "spectrum": np.float32, "targetid": np.int64,
                "redshift": np.float32, "z_hp": np.float32, "log_mstar": np.float32,
                "has_props": np.bool_}
_FOREVER = 2 ** 62  # steps of an endless run; grain only needs a length


def field(data_config, name: str, default=None):
    """`data_config.name`, or `default` when absent (ConfigDict, dict or plain object)."""
    if hasattr(data_config, "get"):
        return data_config.get(name, default)
    return getattr(data_config, name, default)


def data_source(data_config, split: str):
    """The tfds ArrayRecord data source of `split` (the dataset must be prepared)."""
    name, config = field(data_config, "name"), field(data_config, "builder_config")
    builder = builders.builder(name, config, data_dir=field(data_config, "data_dir"))
    if not os.path.exists(os.fspath(builder.data_dir)):
        raise FileNotFoundError(
            f"dataset {name}/{getattr(config, 'name', config)} is not prepared: no "
            f"{os.fspath(builder.data_dir)}; run `python main.py --config=... --mode=prepare` "
            f"(or astroclip_jax.data.prepare.prepare) first")
    return builder.as_data_source(split=split)


def check_dataset_grid(data_config, source) -> None:
    """Raise unless the stored spectra are on the configured grid."""
    stored = source.dataset_info.metadata.get("grid", "desi") if \
        source.dataset_info.metadata else "desi"
    preprocess.check_grid(grids.wave(stored), grids.wave(field(data_config, "grid", "desi")))


def steps_per_epoch(data_config, split: str, global_batch_size: int) -> int:
    """Full global batches per epoch (the remainder is dropped)."""
    return len(data_source(data_config, split)) // global_batch_size


@functools.lru_cache(maxsize=4)
def _permutation(num_records: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def _read_rows(source, indices, crop) -> dict:
    """Read records and stack the Batch-contract fields; crop images as they arrive."""
    rows = {name: [] for name in BATCH_FIELDS}
    for index in indices:
        record = source[int(index)]
        for name in BATCH_FIELDS:
            value = record[name]
            if name == "image" and crop:
                value = preprocess.center_crop(value, crop)
            rows[name].append(value)
    return {name: np.stack(values).astype(BATCH_FIELDS[name], copy=False)
            for name, values in rows.items()}


def _finish(batch: dict, data_config) -> dict:
    """Host preprocessing of a stacked batch: image transform and spectrum normalisation."""
    batch["image"] = preprocess.transform_images(
        batch["image"], field(data_config, "image_transform", "stein_rgb"))
    batch["spectrum"] = preprocess.normalise_spectra(
        batch["spectrum"], field(data_config, "spectrum_norm", "zscore"))
    return batch


def _to_iter(dataset: grain.MapDataset, data_config, prefetch: int) -> grain.IterDataset:
    """Prefetch whole batches: threads in this process, or grain worker processes."""
    workers = int(field(data_config, "num_workers", 0) or 0)
    read = grain.ReadOptions(num_threads=max(1, min(prefetch, 4)), prefetch_buffer_size=prefetch)
    iterable = dataset.to_iter_dataset(read)
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside main.py
            flags.FLAGS.mark_as_parsed()  # (tests, notebooks) use their defaults
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iterable


def train_loader(data_config, split: str, global_batch_size: int, seed: int,
                 num_epochs: int | None = None, process_index: int = 0,
                 process_count: int = 1, prefetch: int = 2):
    """Iterator over this process's part of each global batch; `get_state()/set_state()`.

    Endless when `num_epochs` is None. Seeded reshuffling every epoch, remainder dropped.
    """
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} does not split over "
                         f"{process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    source = data_source(data_config, split)
    check_dataset_grid(data_config, source)
    num_records = len(source)
    per_epoch = num_records // global_batch_size
    if per_epoch == 0:
        raise ValueError(f"split {split!r} of {field(data_config, 'name')}/"
                         f"{field(data_config, 'builder_config')} has {num_records} examples, "
                         f"fewer than one global batch of {global_batch_size}")
    local = global_batch_size // process_count
    crop = field(data_config, "image_crop", 96)

    def load(step: int) -> dict:
        epoch, within = divmod(step, per_epoch)
        start = within * global_batch_size + process_index * local
        indices = _permutation(num_records, seed, epoch)[start:start + local]
        return _finish(_read_rows(source, indices, crop), data_config)

    total = per_epoch * num_epochs if num_epochs is not None else _FOREVER
    logging.info("train loader %s: %d examples, %d steps/epoch, local batch %d of %d",
                 split, num_records, per_epoch, local, global_batch_size)
    return iter(_to_iter(grain.MapDataset.range(total).map(load), data_config, prefetch))


class EvalLoader:
    """Re-iterable, in-order batches covering every example once; padding rows have mask False."""

    def __init__(self, dataset: grain.MapDataset, data_config, prefetch: int):
        self._dataset, self._config, self._prefetch = dataset, data_config, prefetch

    def __len__(self) -> int:
        return len(self._dataset)

    def __iter__(self):
        return iter(_to_iter(self._dataset, self._config, self._prefetch))


def eval_loader(data_config, split: str, batch_size: int, process_index: int = 0,
                process_count: int = 1, prefetch: int = 2) -> EvalLoader:
    """Batches of `batch_size` (global) in record order; the last one padded.

    With several processes each yields its slice of every global batch, and all yield the same
    number of batches. Padding rows: zero image and spectrum, targetid -1, NaN properties.
    """
    if batch_size % process_count:
        raise ValueError(f"batch {batch_size} does not split over {process_count} processes")
    source = data_source(data_config, split)
    check_dataset_grid(data_config, source)
    num_records = len(source)
    if num_records == 0:
        raise ValueError(f"split {split!r} is empty")
    local = batch_size // process_count
    crop = field(data_config, "image_crop", 96)
    num_batches = -(-num_records // batch_size)

    def load(step: int) -> dict:
        start = step * batch_size + process_index * local
        indices = np.arange(start, min(start + local, num_records))
        batch = _read_rows(source, indices, crop) if len(indices) else \
            _empty_rows(source, crop)
        batch = _pad(batch, local)
        batch["mask"] = np.arange(local) < len(indices)
        return _finish(batch, data_config)

    return EvalLoader(grain.MapDataset.range(num_batches).map(load), data_config, prefetch)


def _empty_rows(source, crop) -> dict:
    rows = _read_rows(source, [0], crop)
    return {name: value[:0] for name, value in rows.items()}


def _pad(batch: dict, size: int) -> dict:
    missing = size - len(batch["targetid"])
    if missing == 0:
        return batch
    fill = {"targetid": -1, "redshift": np.nan, "z_hp": np.nan, "log_mstar": np.nan,
            "has_props": False, "image": 0.0, "spectrum": 0.0}
    return {name: np.concatenate([value, np.full((missing,) + value.shape[1:], fill[name],
                                                 dtype=value.dtype)])
            for name, value in batch.items()}
