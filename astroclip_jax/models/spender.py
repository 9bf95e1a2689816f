"""Spender's SpectrumEncoder (spender 0.3, `spender.model.SpectrumEncoder`) in Flax.

    spectra (N, L) -> [Conv1d -> InstanceNorm -> PReLU(per channel) -> Dropout] x 3,
                      MaxPool1d after blocks 1 and 2
                   -> channels split [h | a], softmax(a) over wavelength
                   -> features = sum_L h * softmax(a)            (N, filters[-1] // 2)
                   -> MLP (Linear, PReLU per feature) ..., Linear -> latent (N, n_latent)

Layout is NLC (length, then channels), so the channel split is on the last axis and the
softmax/sum run over axis 1, where torch (NCL) uses axes 1 and 2.

Variable names mirror the torch keys with "." -> "_": `conv1_0` (Conv1d), `conv1_2` (PReLU),
..., `mlp_0` (Linear), `mlp_1` (PReLU), `mlp_3`, ..., so converting is a rename plus transposes.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Real sizes and small ones built from the same code. "spender" is the DESI EDR galaxy model
# (`spender.desi-edr.galaxyae-b9bc8d12.pt`, 6 latents); the converter reads the actual
# sizes of any file from its shapes, so this entry is only the default for fresh modules.
SIZES: dict[str, dict[str, Any]] = {
    "spender": dict(filters=(128, 256, 512), kernels=(5, 11, 21), pools=(5, 11),
                    mlp_hidden=(128, 64, 32), n_latent=6, dropout=0.0),
    "small": dict(filters=(32, 64, 128), kernels=(5, 11, 21), pools=(5, 11),
                  mlp_hidden=(32, 16, 16), n_latent=6, dropout=0.0),
    "test": dict(filters=(8, 16, 32), kernels=(5, 11, 21), pools=(5, 11),
                 mlp_hidden=(16, 8, 8), n_latent=4, dropout=0.0),
}

_INSTANCE_NORM_EPS = 1e-5  # torch.nn.InstanceNorm1d default (Flax norms default to 1e-6)


class PReLU(nn.Module):
    """PReLU with one slope per feature (torch `nn.PReLU(n)`); Flax's own has a single scalar."""

    features: int
    init_slope: float = 0.25

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        slope = self.param("negative_slope", nn.initializers.constant(self.init_slope),
                           (self.features,), jnp.float32)
        return jnp.where(x >= 0, x, slope * x)


def instance_norm(x: jax.Array, eps: float = _INSTANCE_NORM_EPS) -> jax.Array:
    """Per sample and channel, normalise over length (NLC); no affine, no running stats."""
    mean = jnp.mean(x, axis=1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=1, keepdims=True)  # biased, as torch
    return (x - mean) * jax.lax.rsqrt(var + eps)


def max_pool(x: jax.Array, size: int) -> jax.Array:
    """torch MaxPool1d(size, padding=size // 2): stride = size, -inf padding, floor length.

    The windows do not overlap (stride = size), so the gradient is written out: the position of
    each window's first maximum (argmax over the input reshaped to (N, L_out, size, C)) gets the
    output's gradient, as in torch and in XLA's select_and_scatter (which `nn.max_pool`'s own
    gradient lowers to). Written out because XLA:CPU expands select_and_scatter into a scatter
    with three int32 index arrays of the input's size: on Spender's first block (64 x 7785 x 128)
    that was ~1.4 GB of the autoencoder step's 3.2 GB of temporaries, and most of its peak memory
    above torch's. (A custom VJP: reverse mode only, as everything here trains with.)"""
    return _pool_windows(x, size, x.shape[1])


def _windows(x: jax.Array, size: int) -> jax.Array:
    """(N, L, C) -> (N, L_out, size, C): -inf padded on the left by size // 2, on the right as
    far as the last whole window needs (torch's floor length; it may also cut the tail)."""
    n, length, c = x.shape
    pad = size // 2
    out = (length + 2 * pad - size) // size + 1
    right = out * size - pad - length
    x = jnp.pad(x, ((0, 0), (pad, max(right, 0)), (0, 0)), constant_values=-jnp.inf)
    return x[:, :out * size].reshape(n, out, size, c)


def _reduce_window_pool(x: jax.Array, size: int) -> jax.Array:
    pad = size // 2
    return nn.max_pool(x, window_shape=(size,), strides=(size,), padding=((pad, pad),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _pool_windows(x: jax.Array, size: int, length: int) -> jax.Array:
    # Forward alone (the frozen tower): reduce_window, the same values and the same program
    # as before (the max over the reshaped windows was slower on XLA:CPU).
    return _reduce_window_pool(x, size)


def _pool_windows_fwd(x, size, length):
    # Only the first maximum's position is kept for the backward pass (int8: 1/4 of the
    # pooled output), not the input.
    first = jnp.argmax(_windows(x, size), axis=2).astype(jnp.int8 if size < 128 else jnp.int32)
    return _reduce_window_pool(x, size), first


def _pool_windows_bwd(size, length, first, g):
    hit = jnp.arange(size, dtype=first.dtype)[None, None, :, None] == first[:, :, None, :]
    grad = jnp.where(hit, g[:, :, None, :], jnp.zeros((), g.dtype))
    n, out, _, c = grad.shape
    grad = grad.reshape(n, out * size, c)[:, size // 2:]  # drop the left padding
    grad = grad[:, :length]  # drop the right padding, or ...
    return (jnp.pad(grad, ((0, 0), (0, length - grad.shape[1]), (0, 0))),)  # ... restore a cut tail


_pool_windows.defvjp(_pool_windows_fwd, _pool_windows_bwd)


class SpectrumEncoder(nn.Module):
    """Spender's spectrum encoder: conv blocks, dot-product attention, then its MLP.

    Call with `spectra` (N, L) float32, any L. Returns {"features": (N, filters[-1] // 2),
    "latent": (N, n_latent)}; with `features_only=True` only "features" (the MLP is not run,
    so the frozen conv + attention part can be used on its own).
    """

    filters: Sequence[int] = SIZES["spender"]["filters"]
    kernels: Sequence[int] = SIZES["spender"]["kernels"]
    pools: Sequence[int] = SIZES["spender"]["pools"]  # after blocks 1..len(pools)
    mlp_hidden: Sequence[int] = SIZES["spender"]["mlp_hidden"]
    n_latent: int = SIZES["spender"]["n_latent"]
    dropout: float = 0.0  # spender 0.3 itself has none; only used with train=True

    def __post_init__(self):
        # Configs come back from JSON as lists; tuples keep the module hashable.
        for name in ("filters", "kernels", "pools", "mlp_hidden"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if len(self.filters) != len(self.kernels):
            raise ValueError(f"filters {self.filters} and kernels {self.kernels} differ in length")
        if len(self.pools) >= len(self.filters):
            raise ValueError(f"pools {self.pools}: at most {len(self.filters) - 1} (none after the last block)")
        if self.filters[-1] % 2:
            raise ValueError(f"filters[-1] = {self.filters[-1]} must be even (split into values and keys)")
        super().__post_init__()

    @property
    def n_feature(self) -> int:
        return self.filters[-1] // 2

    @nn.compact
    def __call__(self, spectra: jax.Array, train: bool = False,
                 features_only: bool = False) -> dict[str, jax.Array]:
        if spectra.ndim != 2:
            raise ValueError(f"SpectrumEncoder expects spectra of shape (N, L), found {spectra.shape}")
        x = jnp.asarray(spectra, jnp.float32)[..., None]  # (N, L, 1)
        for i, (f, k) in enumerate(zip(self.filters, self.kernels)):
            x = nn.Conv(f, kernel_size=(k,), padding=((k // 2, k // 2),), name=f"conv{i + 1}_0")(x)
            x = instance_norm(x)
            x = PReLU(f, name=f"conv{i + 1}_2")(x)
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            if i < len(self.pools):
                x = max_pool(x, self.pools[i])
        # First half of the channels are values h, second half attention logits a.
        h, a = jnp.split(x, 2, axis=-1)
        a = jax.nn.softmax(a, axis=1)  # over wavelength
        features = jnp.sum(h * a, axis=1)
        if features_only:
            return {"features": features}

        # spender.model.MLP: [Linear, act, Identity] per layer -> Linear at 3i, PReLU at 3i+1;
        # the last activation is the identity (latents centred on zero).
        y = features
        sizes = (*self.mlp_hidden, self.n_latent)
        for j, n in enumerate(sizes):
            y = nn.Dense(n, name=f"mlp_{3 * j}")(y)
            if j < len(self.mlp_hidden):
                y = PReLU(n, name=f"mlp_{3 * j + 1}")(y)
        return {"features": features, "latent": y}


def features(module: SpectrumEncoder, variables: Any, spectra: jax.Array) -> jax.Array:
    """The attention features alone (frozen part), without running the MLP."""
    return module.apply(variables, spectra, features_only=True)["features"]
