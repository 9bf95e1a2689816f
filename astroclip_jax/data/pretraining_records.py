"""What the tower pretrainers read: one split's records as host batches for given indices.

    ImageRecords    flux cutouts, centre-cropped on the host (MoCo v2, `training/moco.py`)
    SpectraRecords  Spender's inputs: normalised spectrum, weights, redshift
                    (`training/spender_pretrain.py`)

Both index the split in its record order, the order `pipeline.step_indices` draws from.
"""

from __future__ import annotations

import numpy as np

from astroclip_jax import settings as settings_lib
from astroclip_jax import wavelength_grids
from astroclip_jax.data import pipeline, preprocess, spender_inputs
from astroclip_jax.errors import ConfigError


class ImageRecords:
    """Flux cutouts of one split, centre-cropped to `input_crop` (0: whole) on the host;
    `crop_field` is the config field that set it (named when the crop cannot work)."""

    def __init__(self, data: settings_lib.DataSettings, split: str, input_crop: int,
                 crop_field: str):
        self._source = pipeline.data_source(data, split)
        self._crop, self._field = input_crop, crop_field

    def __len__(self) -> int:
        return len(self._source)

    def batch(self, indices) -> np.ndarray:
        images = pipeline.read_records(self._source, indices, ("image",))["image"]
        images = np.asarray(images, np.float32)
        if self._crop:
            try:
                images = preprocess.center_crop(images, self._crop)
            except ValueError as e:
                raise ConfigError(f"config field {self._field}={self._crop}: {e}") from None
        return np.ascontiguousarray(images)


class SpectraRecords:
    """Spender's inputs of one split: `batch(indices)` -> spectrum, weights, z (host arrays).

    The weights come from the records' `ivar` where the dataset stores one, else from the
    DESI per-pixel std (`spender_inputs.weights`)."""

    def __init__(self, data: settings_lib.DataSettings, split: str):
        self._source = pipeline.data_source(data, split)
        self._grid, self._wave = data.grid, wavelength_grids.wave(data.grid)
        self.has_ivar = "ivar" in self._source.dataset_info.features.keys()
        self._fields = ("spectrum", "redshift", *(("ivar",) if self.has_ivar else ()))

    def __len__(self) -> int:
        return len(self._source)

    def batch(self, indices) -> dict[str, np.ndarray]:
        raw = pipeline.read_records(self._source, indices, self._fields)
        z = raw["redshift"].astype(np.float32)
        w = spender_inputs.weights(raw.get("ivar"), self._grid)
        y, w, _ = spender_inputs.normalise(raw["spectrum"], w, z, self._wave)
        return {"spectrum": y, "weights": w, "z": z}
