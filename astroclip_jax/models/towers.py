"""Towers from config dicts: the one place that maps a tower kind to its Flax module.

`config` is exactly what a converted tower directory stores in `tower.json`, so a frozen tower
is rebuilt from disk with `load_tower_module(path)`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from astroclip_jax.errors import ConfigError
from astroclip_jax.models import tower_weights

KINDS = ("resnet", "spender", "dinov2_vit")


def _module_class(kind: str):
    # Imported lazily so each tower's module is only loaded when used.
    if kind == "resnet":
        from astroclip_jax.models.resnet import ResNet

        return ResNet
    if kind == "spender":
        from astroclip_jax.models.spender import SpectrumEncoder

        return SpectrumEncoder
    if kind == "dinov2_vit":
        from astroclip_jax.models.vit import VisionTransformer

        return VisionTransformer
    raise ValueError(f"unknown tower kind {kind!r}; expected one of {KINDS}")


def _sizes(kind: str) -> Mapping[str, Mapping[str, Any]]:
    if kind == "resnet":
        from astroclip_jax.models.resnet import SIZES
    elif kind == "spender":
        from astroclip_jax.models.spender import SIZES
    elif kind == "dinov2_vit":
        from astroclip_jax.models.vit import SIZES
    else:
        raise ValueError(f"unknown tower kind {kind!r}; expected one of {KINDS}")
    return SIZES


def _hashable(value: Any) -> Any:
    # JSON turns tuples into lists; Flax module fields should be hashable.
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def build_tower(kind: str, config: Mapping[str, Any]) -> nn.Module:
    """The Flax module of a tower kind (one of `KINDS`) from its config dict."""
    return _module_class(kind)(**{k: _hashable(v) for k, v in config.items()})


def tower_config(kind: str, size: str) -> dict[str, Any]:
    """The config dict of a named size (e.g. ("resnet", "resnet50"), ("spender", "test"))."""
    sizes = _sizes(kind)
    if size not in sizes:
        raise ConfigError(f"config field model.*_tower.size: unknown {kind} size {size!r}; "
                          f"expected one of {sorted(sizes)}")
    return dict(sizes[size])


def init_tower(kind: str, config: Mapping[str, Any], rng: jax.Array,
               example_input_shape: Sequence[int]) -> dict[str, Any]:
    """Randomly initialised variables of a tower, for an input of `example_input_shape`."""
    module = build_tower(kind, config)
    # jit: eager init would compile every primitive on its own (a minute for a ResNet on CPU).
    return jax.jit(module.init)(rng, jnp.zeros(tuple(example_input_shape), jnp.float32))


def load_tower_module(path: str | os.PathLike, kind: str | None = None
                      ) -> tuple[nn.Module, dict[str, Any], tower_weights.TowerWeights]:
    """(module, variables, TowerWeights) from a converted tower directory."""
    weights = tower_weights.load_tower(path, kind=kind)
    module = build_tower(weights.kind, weights.config)
    variables = jax.tree.map(jnp.asarray, weights.variables)
    return module, variables, weights
