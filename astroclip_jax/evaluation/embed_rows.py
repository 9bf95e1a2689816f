"""What `--mode=embed` embeds: the rows of a dataset split, or of a one-modality survey
(`data/survey_files.py`), read in row ranges and preprocessed as the run's model saw its data;
and the display examples the evaluators' figures show."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import numpy as np

from astroclip_jax import settings as settings_lib
from astroclip_jax import wavelength_grids
from astroclip_jax.data import pipeline, preprocess
from astroclip_jax.data.survey_files import SurveyFiles, finite_rows
from astroclip_jax.errors import DataError
from astroclip_jax.evaluation import restore
from astroclip_jax.settings import DataSettings

_PROPERTY_COLUMNS = ("targetid", "redshift", "z_hp", "log_mstar", "has_props")


@dataclasses.dataclass(frozen=True)
class RowsToEmbed:
    """Rows to embed, numbered 0..n-1. `read(start, stop)` gives the preprocessed model inputs
    (`image` and/or `spectrum`) and the per-row columns to carry (targetid, index = the row
    number, catalogue) of the rows of [start, stop) that are embedded (a survey leaves out the
    rows its policies drop, `meta["dropped"]`); `identity` is what the key hashes besides the
    parameters and the preprocessing."""

    name: str
    n: int
    modalities: tuple[str, ...]
    read: Callable[[int, int], dict[str, np.ndarray]]
    identity: Any
    meta: dict[str, Any]


def _scalar_extras(source):
    """Names of the scalar per-galaxy fields a data source holds beyond the Batch contract."""
    features = source.dataset_info.features
    return [name for name in features.keys()
            if name not in pipeline.BATCH_FIELDS and tuple(features[name].shape) == ()]


def split_rows(data: DataSettings, split: str) -> RowsToEmbed:
    """The records of `split` of the (paired) dataset, preprocessed as `data` says."""
    source = pipeline.data_source(data, split)
    extras = _scalar_extras(source)
    dtypes = {name: source.dataset_info.features[name].np_dtype for name in extras}
    if len(source) == 0:
        raise DataError(f"split {split!r} of {data.name}/{data.builder_config} is empty")

    def read(start: int, stop: int) -> dict[str, np.ndarray]:
        # Only the fields written out are decoded (not e.g. the synthetic ivar).
        raw = pipeline.read_records(source, range(start, stop), (*pipeline.BATCH_FIELDS, *extras))
        out = preprocess.preprocess_batch({k: raw[k] for k in pipeline.BATCH_FIELDS}, data)
        out = {k: out[k] for k in ("image", "spectrum", *_PROPERTY_COLUMNS)}
        out.update({k: raw[k].astype(dtypes[k], copy=False) for k in extras})
        out["index"] = np.arange(start, stop, dtype=np.int64)
        return out

    return RowsToEmbed(name=split, n=len(source), modalities=("image", "spectrum"), read=read,
                identity=split, meta={"split": split,
                                      "dataset": f"{data.name}/{data.builder_config}",
                                      "synthetic": data.is_synthetic})


def survey_table_name(survey: SurveyFiles) -> str:
    """``survey-<file or folder name>-<8 hex>``: the hash of the resolved path and the files'
    names, sizes and times, so that two surveys never share a table (two folders both named
    ``south``) and a re-run of the same survey finds its own."""
    source = os.path.realpath(survey.path)
    digest = hashlib.sha256(json.dumps([source, survey.stamp]).encode()).hexdigest()[:8]
    base = os.path.splitext(os.path.basename(os.path.normpath(survey.path)))[0]
    return f"survey-{base}-{digest}"


def _check_survey_shape(survey: SurveyFiles, data: DataSettings, spectrum_length: int,
                        image_size: int | None) -> None:
    if survey.modality == "spectrum":
        if survey.row_shape != (spectrum_length,):
            raise DataError(f"survey {survey.path}: spectra have {survey.row_shape[0]} pixels, "
                            f"the run's spectrum tower reads {spectrum_length} ({data.grid} "
                            "grid)")
        if survey.wave() is not None:
            preprocess.check_grid(survey.wave(), wavelength_grids.wave(data.grid))
        return
    need = max(data.image_crop or 0, image_size or 0)  # host crop, then the model's own
    height, width = survey.image_shape
    if min(height, width) < need:
        raise DataError(f"survey {survey.path}: cutouts are {height}x{width} pixels, smaller "
                        f"than the {need}x{need} the run's model crops (data.image_crop "
                        f"{data.image_crop}, model image size {image_size})")


def survey_rows(data: DataSettings, path: str, spectrum_length: int,
                image_size: int | None = None) -> RowsToEmbed:
    """The rows of an image-only or spectrum-only survey (`data.survey_files`), checked before
    anything is written: the row shape against the run's model (`image_size`: the side its
    towers see), the targetids under `data.duplicate_policy` (all of them, read up front),
    and, as they are read, the flux and the model inputs under `data.nan_policy` ("raise":
    one line naming the file and row; "mask": such rows are left out)."""
    survey = SurveyFiles(path)
    _check_survey_shape(survey, data, spectrum_length, image_size)
    dropped = survey.targetid_drops(data.duplicate_policy)
    if len(dropped) == survey.n:
        raise DataError(f"survey {path}: all {survey.n} rows have repeated or invalid "
                        "targetids: nothing to embed")
    key = survey.modality

    def read(start: int, stop: int) -> dict[str, np.ndarray]:
        out = survey.read(start, stop)
        keep = ~np.isin(out["index"], dropped)
        raw = out[key]
        with np.errstate(invalid="ignore", over="ignore"):
            if key == "image":
                out[key] = preprocess.preprocess_images(raw, data)
            else:
                out[key], _ = preprocess.preprocess_spectra(raw, data)
        good_raw = finite_rows(raw)
        bad = keep & ~(good_raw & finite_rows(out[key]))
        if bad.any() and data.nan_policy == "raise":
            first = int(np.flatnonzero(bad)[0])
            file, row = survey.locate(start + first)
            what = ("non-finite flux" if not good_raw[first] else
                    "finite flux that preprocessing turns into non-finite model inputs")
            raise DataError(
                f"survey file {file}, row {row} (targetid {int(out['targetid'][first])}): "
                f"{key} has {what} ({int(bad.sum())} such row(s) in survey rows "
                f"{start}..{stop - 1}); expected finite numbers. Set data.nan_policy='mask' to "
                "leave such rows out and count them")
        keep &= ~bad
        return {k: v[keep] for k, v in out.items()}

    name = survey_table_name(survey)
    policies = {"nan_policy": data.nan_policy, "duplicate_policy": data.duplicate_policy}
    return RowsToEmbed(name=name, n=survey.n, modalities=(key,), read=read,
                identity={"survey": survey.stamp, **policies},
                meta={"split": name, "survey": os.path.abspath(path), "files": len(survey.files),
                      "modality": key, "synthetic": False, "survey_rows": survey.n,
                      "dropped": {"duplicate_policy": len(dropped)}, **policies})


def rows_for(settings: settings_lib.RunSettings, data: DataSettings,
             trained: restore.TrainedModel) -> RowsToEmbed:
    if settings.eval.survey_file:
        return survey_rows(data, settings.eval.survey_file,
                           trained.settings.model.spectrum_length, trained.model.image_size)
    return split_rows(data, settings.eval.split)


def read_examples(data: DataSettings, split: str, rows, image_size: int):
    """Display images and model-input spectra of records ``rows``, for figures.

    Returns ``{"image": (n, S, S, 3) RGB in [0, 1], "spectrum": (n, L), "wave": (L,)}``: the
    cutouts cropped as the towers saw them, in Stein's RGB (the project's display, whatever the
    model transform), and the normalised spectra the spectrum tower saw, on their grid.
    """
    from astroclip_jax.evaluation import plots

    raw = pipeline.read_records(pipeline.data_source(data, split), rows, ("image", "spectrum"))
    images = plots.display_cutouts(raw["image"], data.image_crop, image_size)
    spectra, _ = preprocess.preprocess_spectra(raw["spectrum"], data)
    return {"image": images, "spectrum": spectra, "wave": wavelength_grids.wave(data.grid)}
