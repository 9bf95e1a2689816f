"""Towers from config dicts: the one place that maps a tower kind to its Flax module.

`config` is exactly what a converted tower directory stores in `tower.json`, so a frozen tower
is rebuilt from disk with `load_tower_module(path)`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Mapping, Sequence

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
    # On one CPU device, `features` runs the batch this many galaxies at a time (None: all at
    # once): each layer's activations then stay in cache. Measured, features per second against
    # the whole batch at once (2-core Xeon, float32): ResNet50 batch 32 at 144 px 1.11x in
    # blocks of 8, Spender batch 32 1.07x in 4s, SpecFormer (778 tokens) batch 16 1.37x one by
    # one (2.04 -> 2.85 spectra/s; blocks of 2: 2.77); the ViT-L/12's 145 tokens gain nothing
    # (batch 8 in blocks of 4: 0.97x).
    cpu_block: int | None = None


KINDS = {
    "resnet": Kind("astroclip_jax.models.resnet:ResNet", "image", own_head=r"fc_\d+",
                   cpu_block=8),
    "spender": Kind("astroclip_jax.models.spender:SpectrumEncoder", "spectrum",
                    (("features_only", True),), own_head=r"mlp_\d+", compute_dtype=False,
                    cpu_block=4),
    "dinov2_vit": Kind("astroclip_jax.models.vit:VisionTransformer", "image",
                       own_head=r"fc_\d+", tokens=True),  # the head pretrain_moco adds
    "specformer": Kind("astroclip_jax.models.specformer:SpecFormer", "spectrum", tokens=True,
                       cpu_block=1),
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
    """AstroCLIP's features of a tower: pooled (N, D), or tokens (N, T, D) (`Kind.tokens`).

    On a single CPU device the batch goes through in blocks of `Kind.cpu_block` galaxies (the
    same arithmetic per galaxy, faster there; see `Kind`); on an accelerator, or when the
    computation may be spread over several devices (a block loop would run on every device),
    the whole batch at once.
    """
    def whole(batch: jax.Array) -> jax.Array:
        out = module.apply(variables, batch, **dict(kind_of(kind).feature_args))
        return out["features"] if isinstance(out, Mapping) else out

    block = kind_of(kind).cpu_block
    if block is None or x.shape[0] < 2 * block or jax.device_count() > 1:
        return whole(x)
    return jax.lax.platform_dependent(x, cpu=lambda b: in_blocks(whole, b, block),
                                      default=whole)


def in_blocks(fn: Callable[[jax.Array], jax.Array], x: jax.Array, block: int) -> jax.Array:
    """fn(x) for a row-wise `fn`, computed `block` rows at a time (`lax.map`; a last partial
    block is computed on its own)."""
    n = x.shape[0] // block * block
    head = jax.lax.map(fn, x[:n].reshape(n // block, block, *x.shape[1:]))
    out = head.reshape(n, *head.shape[2:])
    return out if n == x.shape[0] else jnp.concatenate([out, fn(x[n:])])


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
