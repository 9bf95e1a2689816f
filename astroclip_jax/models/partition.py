"""The trainable/frozen partition of the AstroCLIP params, by regexes over flattened names.

Names look like "image_head/params/fc_0/kernel" (big_vision style); `settings.train.trainable`
lists the patterns (matched with `re.fullmatch`). Only the trainable part reaches the optimiser
and the gradient; the frozen part enters the loss behind `stop_gradient`. BatchNorm statistics
are never trainable (they are running averages, not parameters).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from astroclip_jax.errors import ConfigError
from astroclip_jax.flat_tree import SEP as _SEP
from astroclip_jax.flat_tree import flatten, unflatten
from astroclip_jax.models import heads

Params = dict[str, Any]


def is_trainable(name: str, patterns: Sequence[str]) -> bool:
    if _SEP + "batch_stats" + _SEP in _SEP + name:  # running averages are never trained
        return False
    return any(re.fullmatch(p, name) for p in patterns)


def partition(params: Params, patterns: Sequence[str]) -> tuple[Params, Params]:
    """(trainable, frozen): two nested dicts with disjoint leaves, by regex over flat names.

    Raises if a pattern matches no parameter (a typo would otherwise silently freeze all).
    Every pattern comes from `settings.train.trainable`, so the message names that field.
    """
    flat = flatten(params)
    for p in patterns:
        if not any(re.fullmatch(p, name) for name in flat):
            raise ConfigError(f"config field train.trainable: pattern {p!r} matches no "
                              "parameter; "
                             f"names look like {sorted(flat)[:3]}")
    trainable = {k: v for k, v in flat.items() if is_trainable(k, patterns)}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return unflatten(trainable), unflatten(frozen)


def merge(trainable: Params, frozen: Params) -> Params:
    """Inverse of `partition`."""
    flat = flatten(frozen)
    for name, value in flatten(trainable).items():
        if name in flat:
            raise ValueError(f"{name} is both trainable and frozen")
        flat[name] = value
    return unflatten(flat)


def param_counts(params: Params) -> dict[str, int]:
    """Scalars per top-level part ("image_tower", ...)."""
    return {k: heads.num_params(v) for k, v in params.items()}
