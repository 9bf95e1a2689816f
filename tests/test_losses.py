"""InfoNCE against a direct float64 NumPy computation of the formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astroclip_jax import settings
from astroclip_jax.models.astroclip import l2_normalize
from astroclip_jax.training import losses
from configs import spender

# Jitted once: eager dispatch compiles every primitive separately and is far slower.
infonce = jax.jit(losses.infonce)
infonce_with_metrics = jax.jit(losses.infonce_with_metrics)


def _logsumexp(a, axis):
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _reference(img, spec, scale, eps=1e-3):
    """Upstream CLIPLoss in float64 NumPy: F.normalize(eps) -> scale * cos -> symmetric CE."""
    img = np.asarray(img, np.float64)
    spec = np.asarray(spec, np.float64)
    img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), eps)
    spec = spec / np.maximum(np.linalg.norm(spec, axis=1, keepdims=True), eps)
    logits = scale * img @ spec.T
    diag = np.diag(logits)
    loss_i = np.mean(_logsumexp(logits, 1) - diag)
    loss_s = np.mean(_logsumexp(logits, 0) - diag)
    acc_i = np.mean(np.argmax(logits, 1) == np.arange(len(img)))
    acc_s = np.mean(np.argmax(logits, 0) == np.arange(len(img)))
    return 0.5 * (loss_i + loss_s), loss_i, loss_s, acc_i, acc_s


def _embeddings(seed, batch=16, dim=8, correlation=0.8):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(batch, dim)).astype(np.float32)
    spec = (correlation * img + rng.normal(size=(batch, dim))).astype(np.float32)
    return img, spec


@pytest.mark.parametrize("scale", [1.0, 15.5])
def test_matches_numpy_reference(scale):
    img, spec = _embeddings(0)
    loss, m = infonce_with_metrics(img, spec, scale)
    ref, ref_i, ref_s, acc_i, acc_s = _reference(img, spec, scale)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(m["loss_i2s"], ref_i, rtol=1e-5)
    np.testing.assert_allclose(m["loss_s2i"], ref_s, rtol=1e-5)
    np.testing.assert_allclose(m["acc_i2s"], acc_i, atol=1e-7)
    np.testing.assert_allclose(m["acc_s2i"], acc_s, atol=1e-7)
    assert ref_i != pytest.approx(ref_s)  # the two directions really differ
    np.testing.assert_allclose(infonce(img, spec, scale), ref, rtol=1e-5)


def test_configured_scale_is_15_5_and_multiplied():
    """The paper's fixed scale comes from the config (the loss has no default any more) and
    multiplies the cosine similarity: it is not a temperature that divides it."""
    scale = settings.resolve(spender.get_config("")).model.logit_scale
    assert scale == 15.5
    img, spec = _embeddings(1)
    np.testing.assert_allclose(infonce(img, spec, scale), _reference(img, spec, 15.5)[0], rtol=1e-5)
    assert _reference(img, spec, 15.5)[0] != pytest.approx(_reference(img, spec, 1 / 15.5)[0])
    with pytest.raises(TypeError):
        losses.infonce(img, spec)  # no silent default scale


def test_all_equal_embeddings_give_exactly_ln_b():
    batch = 32
    img = np.ones((batch, 4), np.float32)
    loss = infonce(img, 3.0 * img, 15.5)
    np.testing.assert_allclose(loss, math.log(batch), rtol=1e-6)


def test_scale_zero_gives_ln_b():
    img, spec = _embeddings(2, batch=64, correlation=0.0)
    np.testing.assert_allclose(infonce(img, spec, 0.0), math.log(64), rtol=1e-6)


def test_l2_normalize_matches_torch_normalize_semantics():
    x = np.array([[3.0, 4.0], [1e-4, 0.0], [0.0, 0.0]], np.float32)
    out = np.asarray(jax.jit(l2_normalize)(x))
    expected = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-3)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    grad = jax.grad(lambda v: l2_normalize(v).sum())(jnp.zeros((2, 3)))
    assert np.all(np.isfinite(grad))


def test_mask_equals_loss_on_unpadded_subset():
    img, spec = _embeddings(3, batch=12)
    mask = np.array([True] * 9 + [False] * 3)
    # padding rows hold garbage (large, even zero) that must not matter
    img[9:] = 100.0
    spec[10:] = 0.0
    loss, m = infonce_with_metrics(img, spec, 15.5, mask)
    ref, ref_i, ref_s, acc_i, acc_s = _reference(img[:9], spec[:9], 15.5)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(m["loss_i2s"], ref_i, rtol=1e-5)
    np.testing.assert_allclose(m["acc_s2i"], acc_s, atol=1e-7)
    assert m["n_valid"] == 9
    sub_loss, _ = infonce_with_metrics(img[:9], spec[:9], 15.5)
    np.testing.assert_allclose(loss, sub_loss, rtol=1e-6)


def test_gradient_finite_and_zero_on_padding():
    img, spec = _embeddings(4, batch=8)
    spec[6:] = 0.0
    mask = jnp.arange(8) < 6
    grad = jax.jit(jax.grad(lambda a, b: losses.infonce(a, b, 15.5, mask), argnums=(0, 1)))
    g_img, g_spec = grad(img, spec)
    assert np.all(np.isfinite(g_img)) and np.all(np.isfinite(g_spec))
    np.testing.assert_array_equal(np.asarray(g_img)[6:], 0.0)
    np.testing.assert_array_equal(np.asarray(g_spec)[6:], 0.0)
    assert np.abs(np.asarray(g_img)[:6]).sum() > 0


def test_gradient_matches_finite_difference():
    img, spec = _embeddings(5, batch=6, dim=4)
    img64 = img.astype(np.float64)
    f = lambda a: _reference(a, spec, 15.5)[0]
    g = np.asarray(jax.jit(jax.grad(lambda a: losses.infonce(a, spec, 15.5)))(img))
    h = 1e-5
    direction = np.random.default_rng(0).normal(size=img.shape)
    fd = (f(img64 + h * direction) - f(img64 - h * direction)) / (2 * h)
    np.testing.assert_allclose((g * direction).sum(), fd, rtol=1e-3)
