"""Towers from config dicts: the one place that maps a tower kind to its Flax module.

`config` is exactly what a converted tower directory stores in `tower.json`, so a frozen tower
is rebuilt from disk with `load_tower_module(path)`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from astroclip_jax.errors import ConfigError
from astroclip_jax.models import tower_weights

@dataclasses.dataclass(frozen=True)
class Kind:
    """What the rest of the project needs to know of a tower kind."""

    module: str  # "package.module:Class"; imported only when the kind is used
    modality: str  # "image" (NHWC images) | "spectrum" ((N, L) flux)
    # Keyword arguments of the module's __call__ that give AstroCLIP's features.
    feature_args: tuple[tuple[str, Any], ...] = ()
    # Top-level parameters of the tower's own head that AstroCLIP does not run (regex).
    own_head: str | None = None
    # The features are a token sequence (N, T, D) for a cross-attention head (else (N, D)).
    tokens: bool = False
    # The module has a `dtype` field: its compute dtype can be bfloat16 (parameters float32).
    compute_dtype: bool = True


KINDS = {
    "resnet": Kind("astroclip_jax.models.resnet:ResNet", "image", own_head=r"fc_\d+"),
    "spender": Kind("astroclip_jax.models.spender:SpectrumEncoder", "spectrum",
                    (("features_only", True),), own_head=r"mlp_\d+", compute_dtype=False),
    "dinov2_vit": Kind("astroclip_jax.models.vit:VisionTransformer", "image",
                       own_head=r"fc_\d+", tokens=True),  # the head pretrain_moco adds
    "specformer": Kind("astroclip_jax.models.specformer:SpecFormer", "spectrum", tokens=True),
}


def kind_of(kind: str) -> Kind:
    if kind not in KINDS:
        raise ValueError(f"unknown tower kind {kind!r}; expected one of {list(KINDS)}")
    return KINDS[kind]


def _module_attribute(kind: str, attribute: str | None = None):
    module, name = kind_of(kind).module.split(":")
    return getattr(importlib.import_module(module), attribute or name)


def _module_class(kind: str):
    return _module_attribute(kind)


def _sizes(kind: str) -> Mapping[str, Mapping[str, Any]]:
    return _module_attribute(kind, "SIZES")


def example_input(kind: str, image_size: int, spectrum_length: int) -> tuple[int, ...]:
    """The shape of a batch of one input of the tower."""
    if kind_of(kind).modality == "image":
        return (1, image_size, image_size, 3)
    return (1, spectrum_length)


def features(kind: str, module: nn.Module, variables: Mapping[str, Any], x: jax.Array
             ) -> jax.Array:
    """AstroCLIP's features of a tower: pooled (N, D), or tokens (N, T, D) (`Kind.tokens`)."""
    out = module.apply(variables, x, **dict(kind_of(kind).feature_args))
    return out["features"] if isinstance(out, Mapping) else out


def pooled(features_: jax.Array) -> jax.Array:
    """One vector per galaxy (what tables and probes keep): tokens are averaged."""
    return features_ if features_.ndim == 2 else jnp.mean(features_, axis=1)


def _hashable(value: Any) -> Any:
    # JSON turns tuples into lists; Flax module fields should be hashable.
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def with_compute_dtype(kind: str, config: Mapping[str, Any], dtype: str, where: str
                       ) -> dict[str, Any]:
    """`config` with the module's compute dtype set; float32 leaves it as it is."""
    if dtype == "float32":
        return dict(config)
    if not kind_of(kind).compute_dtype:
        raise ValueError(f"{where}: a {kind!r} tower has no compute dtype option; it runs in "
                         "float32")
    return {**config, "dtype": dtype}


def build_tower(kind: str, config: Mapping[str, Any]) -> nn.Module:
    """The Flax module of a tower kind (`KINDS`) from its config dict."""
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


def load_tower_module(path: str | os.PathLike, kind: str | None = None, dtype: str | None = None
                      ) -> tuple[nn.Module, dict[str, Any], tower_weights.TowerWeights]:
    """(module, variables, TowerWeights) from a converted tower directory; `dtype` ("float32",
    "bfloat16") sets the compute dtype of kinds that have one (parameters stay float32)."""
    weights = tower_weights.load_tower(path, kind=kind)
    config = dict(weights.config)
    if dtype is not None:
        config = with_compute_dtype(weights.kind, config, dtype, where=str(path))
    module = build_tower(weights.kind, config)
    variables = jax.tree.map(jnp.asarray, weights.variables)
    return module, variables, weights
