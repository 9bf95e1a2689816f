"""The evaluator runner: what every evaluation mode does around its own computation.

    run(settings, workdir, "eval_knn")        # --mode=eval_knn: the evaluator from registry.py

refuses early (before any expensive work) to overwrite an earlier
result unless `eval.overwrite`, loads the embeddings of the run (`embeddings.py`: computed once,
reused after), hands them to the evaluator, then writes its figures (PNG) and its report
(`results.json`) atomically into `workdir/<mode>/` and prints its summary lines. An evaluator
is a pure function `evaluate(EvalInputs) -> EvalResult`: numbers and figures from embeddings and
settings, no files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from astroclip_jax import files, locks
from astroclip_jax import settings as settings_lib
from astroclip_jax.errors import ConfigError, WouldOverwrite
from astroclip_jax.evaluation import embed_rows, embeddings, registry

RESULT_FILE = "results.json"


class ResultExists(WouldOverwrite):
    """A result file exists and eval.overwrite is False."""


@dataclasses.dataclass(frozen=True)
class EvalInputs:
    """What an evaluator receives.

    Attributes:
      arrays: the embeddings table (`embed.py` lists its columns), one row per galaxy.
      meta: the table's metadata (split, dataset, checkpoint, synthetic, ...).
      settings: the `eval` settings.
      run: all the settings of the mode (the evaluator's own section, e.g. `run.probe`).
      workdir: the work directory evaluated.
      examples: rows -> {"image": {row: RGB image}, "spectrum": {row: normalised spectrum},
        "wave": wavelengths}: what figures show, read from the dataset on demand.
    """

    arrays: Mapping[str, np.ndarray]
    meta: dict[str, Any]
    settings: settings_lib.EvalSettings
    examples: Callable[[np.ndarray], dict[str, Any]]
    data: settings_lib.DataSettings | None = None  # the dataset as embedded (its records)
    run: settings_lib.RunSettings | None = None
    workdir: str | None = None


@dataclasses.dataclass
class EvalResult:
    """What an evaluator returns: `report` (JSON-able), `figures` (file name -> matplotlib
    figure) and `lines` (the summary to print)."""

    report: dict[str, Any]
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    lines: list[str] = dataclasses.field(default_factory=list)


def result_dir(workdir: str, mode: str, overwrite: bool) -> str:
    """`workdir/mode`; raises `ResultExists` if its results file is there and not `overwrite`.

    Creates nothing: the folder is made only when there is something to write, so a mode that
    fails leaves no empty result folder behind."""
    out = os.path.join(workdir, mode)
    path = os.path.join(out, RESULT_FILE)
    if os.path.exists(path) and not overwrite:
        raise ResultExists(
            f"{path} exists; set config.eval.overwrite=True (--config.eval.overwrite) to "
            "recompute it")
    return out


def _jsonable(value):
    """Python scalars/lists from NumPy values; NaN stays a float (json writes NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return _jsonable(value.tolist())
    return value


def write_json(path: str, obj: Any) -> None:
    """Write `obj` as indented JSON atomically (tmp file + os.replace): never half written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with files.atomic_path(path, suffix=".json.tmp") as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(obj), f, indent=2)
        f.write("\n")


def save_figure(fig, path: str) -> str:
    """Save `fig` as PNG atomically and close it (figures hold memory until closed)."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with files.atomic_path(path, suffix=".png.tmp") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


@contextlib.contextmanager
def evaluation_directory(workdir: str, mode: str) -> Iterator[None]:
    """One evaluation at a time per work directory (beside a training, which holds another
    lock); clears what a killed evaluation left half-written in the folders evaluations write."""
    if not os.path.isdir(workdir):  # nothing to evaluate: the checkpoint lookup says so
        yield
        return
    with locks.DirectoryLock(workdir, f"evaluation ({mode})", name="evaluation"):
        for folder in (embeddings.EMBEDDINGS_DIR, "eval_knn", "search", "cluster", "probe"):
            files.remove_leftovers(os.path.join(workdir, folder))
        yield


def _examples_reader(data, split: str, image_size: int):
    def examples(rows) -> dict[str, Any]:
        rows = np.asarray(rows, np.int64)
        ex = embed_rows.read_examples(data, split, rows, image_size)
        return {"image": dict(zip(rows.tolist(), ex["image"])),
                "spectrum": dict(zip(rows.tolist(), ex["spectrum"])), "wave": ex["wave"]}
    return examples


def require_split(settings: settings_lib.RunSettings, mode: str) -> None:
    """The evaluations, ``search`` and ``serve`` read a dataset split: both embeddings and the
    records (pictures, spectra, redshifts, catalogue). A one-modality survey
    (``eval.survey_file``) has neither; say so in one line before anything is embedded."""
    if settings.eval.survey_file:
        raise ConfigError(
            f"config field eval.survey_file is {settings.eval.survey_file!r}: --mode={mode} "
            "reads the image-spectrum pairs of a dataset split (eval.split) with their records "
            "and catalogue, which a one-modality survey does not have; unset it (--mode=embed "
            "embeds a survey; read its table with evaluation.embed.iter_embedding_chunks)")


def run(settings: settings_lib.RunSettings, workdir: str, mode: str) -> dict[str, Any]:
    """``--mode=<mode>``: the evaluator `registry.py` names for `mode`, end to end."""
    return run_evaluator(settings, workdir, mode, registry.evaluator(mode))


def run_evaluator(settings: settings_lib.RunSettings, workdir: str, mode: str,
                  evaluate: Callable[[EvalInputs], EvalResult]) -> dict[str, Any]:
    """Run one evaluation end to end (module docstring); its report."""
    out = result_dir(workdir, mode, settings.eval.overwrite)
    with evaluation_directory(workdir, mode):
        return _run(settings, workdir, mode, out, evaluate)


def _run(settings, workdir, mode, out, evaluate):
    require_split(settings, mode)  # before embedding a whole survey for nothing
    arrays, meta, data = embeddings.load_or_compute_embeddings(settings, workdir)
    result = evaluate(EvalInputs(arrays=arrays, meta=meta, settings=settings.eval,
                                 examples=_examples_reader(data, meta["split"],
                                                           meta["image_size"]),
                                 data=data, run=settings, workdir=workdir))
    figures = [save_figure(fig, os.path.join(out, name)) for name, fig in result.figures.items()]
    report = {**result.report, "split": meta["split"], "checkpoint": meta.get("checkpoint"),
              "synthetic": meta.get("synthetic", False), "figures": figures}
    write_json(os.path.join(out, RESULT_FILE), report)
    for line in result.lines:
        print(line)
    print(f"{mode}: wrote {os.path.join(out, RESULT_FILE)}")
    return report
