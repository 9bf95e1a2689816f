"""The on-disk format of converted (frozen) tower weights: one directory per tower.

    OUTPUT_DIR/
      tower.json      {"kind": "resnet" | "spender", "config": {...module kwargs...},
                       "source": {...where it came from...}, "format_version": 1}
      variables.npz   flattened Flax variables, keys like "params/conv1/kernel",
                      "batch_stats/bn1/mean"; plus "extra/<name>" arrays (e.g. extra/wave_obs)

Plain NumPy arrays and JSON, so the directory opens on any machine (one CPU included)
without the sharding it was written with. Writing is atomic: a temporary sibling directory
is filled and then renamed over the target, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Any, Mapping

import numpy as np

from astroclip_jax import files
from astroclip_jax.errors import DataError, MissingInput, WouldOverwrite
from astroclip_jax.flat_tree import SEP as _SEP
from astroclip_jax.flat_tree import flatten, unflatten

FORMAT_VERSION = 1
_EXTRA = "extra"
META_FILE = "tower.json"
DECODER_DIR = "decoder"  # a spender tower's decoder, itself a tower directory


def output_kind(kind: str) -> files.OutputKind:
    """A tower directory of `kind` as an output (`files.check_output_location`): only an
    earlier tower of the same kind is ever replaced by a new one."""
    return files.OutputKind(f"{kind} tower", META_FILE, (("kind", kind),),
                            frozenset({META_FILE, "variables.npz", DECODER_DIR}))


@dataclasses.dataclass(frozen=True)
class TowerWeights:
    """Converted tower weights as loaded from disk."""

    kind: str
    config: dict[str, Any]
    variables: dict[str, Any]  # nested {"params": {...}, "batch_stats": {...}} of np.ndarray
    extras: dict[str, np.ndarray]
    source: dict[str, Any]


def save_tower(
    out_dir: str | os.PathLike,
    kind: str,
    config: Mapping[str, Any],
    variables: Mapping[str, Any],
    extras: Mapping[str, np.ndarray] | None = None,
    source: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    what: str = "output directory",
) -> str:
    """Writes a tower directory atomically and returns its path. With `overwrite` an earlier
    tower of the same `kind` is replaced, and nothing else (`output_kind`); `what` names the
    setting that chose `out_dir` in the one-line refusal."""
    # First, so that a replace killed half way is undone before `overwrite` is judged.
    out_dir = files.check_output_location(out_dir, output_kind(kind), what)
    if os.path.lexists(out_dir) and not overwrite:
        raise WouldOverwrite(f"{what}: {out_dir} already exists; pass overwrite=True to "
                             "replace it")
    arrays = {name: np.asarray(value) for name, value in flatten(variables).items()}
    if any(k.startswith(_EXTRA + _SEP) for k in arrays):
        raise ValueError(f"variables must not have a top-level collection named {_EXTRA!r}")
    for name, value in (extras or {}).items():
        arrays[f"{_EXTRA}{_SEP}{name}"] = np.asarray(value)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": dict(config),
        "source": dict(source or {}),
    }
    with files.atomic_directory(out_dir, output_kind(kind), what) as tmp:
        np.savez(os.path.join(tmp, "variables.npz"), **arrays)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
    return out_dir


def load_tower(path: str | os.PathLike, kind: str | None = None) -> TowerWeights:
    """Reads a tower directory written by `save_tower`; checks `kind` when given."""
    path = os.fspath(path)
    meta_path = os.path.join(path, META_FILE)
    npz_path = os.path.join(path, "variables.npz")
    for p in (meta_path, npz_path):
        if not os.path.isfile(p):
            raise MissingInput(
                f"{p} not found: {path} is not a converted tower directory "
                "(make one with `python -m converters.resnet50` or `python -m converters.spender`)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # not JSON, not UTF-8, unreadable
        raise DataError(f"{meta_path} is not a readable tower.json ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{meta_path}: format_version {found!r}, expected {FORMAT_VERSION}")
    for field, types in (("kind", str), ("config", dict), ("source", dict)):
        if not isinstance(meta.get(field, {} if field == "source" else None), types):
            raise DataError(f"{meta_path}: field {field!r} is {meta.get(field)!r}, expected a "
                            f"{types.__name__}")
    if kind is not None and meta["kind"] != kind:
        raise DataError(f"{path} holds a {meta['kind']!r} tower, expected {kind!r}")
    try:  # never pickles: an untrusted file runs no code
        with np.load(npz_path, allow_pickle=False) as npz:
            flat = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{npz_path} is not a readable variables.npz ({e})") from None
    extras = {k[len(_EXTRA) + 1:]: v for k, v in flat.items() if k.startswith(_EXTRA + _SEP)}
    variables = unflatten({k: v for k, v in flat.items() if not k.startswith(_EXTRA + _SEP)})
    return TowerWeights(kind=meta["kind"], config=meta["config"], variables=variables,
                        extras=extras, source=meta.get("source", {}))
