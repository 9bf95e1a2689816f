"""The transformer towers' shared attention and GELU (`models/transformer_ops.py`) against
torch: `attend` equals `F.scaled_dot_product_attention` on the packed-qkv layouts both towers
use, `gelu_exact` is as close to the exact (float64 erf) GELU as torch's `nn.GELU()`, and attention dropout keeps the expected
fraction of weights with the output unbiased (closed form: E[out] = the no-dropout output)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from astroclip_jax.models import transformer_ops


@pytest.mark.parametrize("b,t,heads,hd", [(2, 145, 4, 16), (1, 778, 6, 8), (3, 7, 1, 5)])
def test_attend_equals_torch_sdpa(b, t, heads, hd):
    rng = np.random.default_rng(t)
    qkv = rng.normal(size=(b, t, 3 * heads * hd)).astype(np.float32)
    q, k, v = transformer_ops.split_heads(jnp.asarray(qkv), heads)
    ours = np.asarray(jax.jit(transformer_ops.attend)(q * hd ** -0.5, k, v))
    # torch's layout: split into q|k|v, then (B, T, heads, hd) -> (B, heads, T, hd)
    tq, tk, tv = (a.reshape(b, t, heads, hd).transpose(1, 2)
                  for a in torch.from_numpy(qkv).split(heads * hd, dim=-1))
    ref = F.scaled_dot_product_attention(tq, tk, tv).transpose(1, 2).reshape(b, t, -1).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_gelu_exact_is_as_close_to_the_exact_gelu_as_torch():
    x = np.concatenate([np.linspace(-10, 10, 20001), np.random.default_rng(0).normal(0, 3, 5000)])
    x = x.astype(np.float32)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    ours = np.asarray(jax.jit(transformer_ops.gelu_exact)(x))
    ref = torch.nn.GELU()(torch.from_numpy(x)).numpy()  # float32 erf GELU

    def errors(y):  # absolute, and relative where the value is not tiny
        d, big = np.abs(y - exact), np.abs(exact) > 1e-2
        return d.max(), (d[big] / np.abs(exact[big])).max()

    (ours_abs, ours_rel), (torch_abs, torch_rel) = errors(ours), errors(ref)
    assert ours_abs <= torch_abs and ours_rel <= torch_rel, (ours_abs, ours_rel, torch_abs, torch_rel)
    # float64 in, float64 out: the erf form, not the tanh approximation (which is 1e-3 away)
    with jax.enable_x64(True):
        x64 = np.linspace(-6, 6, 1001)
        out = np.asarray(transformer_ops.gelu_exact(jnp.asarray(x64)))
        assert out.dtype == np.float64
        ref64 = torch.nn.GELU()(torch.from_numpy(x64)).numpy()
        np.testing.assert_allclose(out, ref64, rtol=1e-13, atol=1e-15)


def test_gelu_exact_keeps_bfloat16():
    x = jnp.linspace(-4, 4, 101, dtype=jnp.bfloat16)
    out = transformer_ops.gelu_exact(x)
    assert out.dtype == jnp.bfloat16
    ref = torch.nn.GELU()(torch.from_numpy(np.asarray(x, np.float32))).numpy()
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2e-2, atol=2e-2)


def test_attention_dropout_keeps_the_fraction_and_is_unbiased():
    rng = np.random.default_rng(1)
    b, t, heads, hd, rate = 1, 64, 2, 8, 0.25
    q, k, v = (jnp.asarray(rng.normal(size=(b, heads, t, hd)).astype(np.float32)) for _ in range(3))
    clean = np.asarray(transformer_ops.attend(q, k, v))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    dropped = np.asarray(jax.jit(jax.vmap(
        lambda key: transformer_ops.attend(q, k, v, dropout_rng=key, dropout_rate=rate)))(keys))
    # unbiased: the mean over 400 draws is the clean output within a few standard errors
    se = dropped.std(0) / np.sqrt(len(keys))
    assert np.mean(np.abs(dropped.mean(0) - clean) <= 4 * se + 1e-6) > 0.99
    # the kept fraction of weights: v = identity columns read the weights back
    eye = jnp.eye(t, dtype=jnp.float32)[None, None].repeat(heads, 1)  # hd = t
    w = np.asarray(transformer_ops.attend(q[..., :1] * 0, k[..., :1] * 0, eye,
                                          dropout_rng=keys[0], dropout_rate=rate))
    kept = (w != 0).mean()
    n = w.size
    assert abs(kept - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(w[w != 0], 1.0 / t / (1 - rate), rtol=1e-6)  # uniform weights
