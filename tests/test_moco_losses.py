"""MoCo v2's pure parts against float64 NumPy: the loss with a queue, its gradient, the
momentum update and the queue's enqueue/dequeue order."""

import jax
import numpy as np
import pytest

from astroclip_jax.training import moco_losses


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _numpy_loss(q, k, queue, t):
    logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue.T], axis=1) / t
    m = logits.max(1, keepdims=True)
    log_p = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    return -log_p[:, 0].mean(), np.exp(log_p)


@pytest.mark.parametrize("temperature", [0.1, 0.2])
def test_loss_with_queue_matches_float64_numpy(temperature):
    rng = np.random.default_rng(0)
    q, k = _unit(rng.standard_normal((6, 16))), _unit(rng.standard_normal((6, 16)))
    k = _unit(q + 0.5 * k)  # positives closer than the negatives
    queue = _unit(rng.standard_normal((24, 16)))
    want, probs = _numpy_loss(q, k, queue, temperature)
    f32 = [x.astype(np.float32) for x in (q, k, queue)]
    loss, accuracy = moco_losses.moco_loss(*f32, temperature)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(accuracy) == np.mean(probs.argmax(1) == 0)
    # d loss / d q_i = (sum_j p_ij c_j - k_i) / (N T), c = [k_i, queue]; no gradient into k.
    grad_q, grad_k = jax.grad(lambda a, b: moco_losses.moco_loss(a, b, f32[2], temperature)[0],
                              argnums=(0, 1))(f32[0], f32[1])
    cands = probs[:, :1] * k + probs[:, 1:] @ queue
    np.testing.assert_allclose(np.asarray(grad_q), (cands - k) / (len(q) * temperature),
                               rtol=1e-4, atol=1e-6)
    assert not np.asarray(grad_k).any()


def test_momentum_update_is_the_convex_combination():
    rng = np.random.default_rng(1)
    q = {"a": rng.standard_normal((3, 2)), "b": {"c": rng.standard_normal(4)}}
    k = {"a": rng.standard_normal((3, 2)), "b": {"c": rng.standard_normal(4)}}
    out = moco_losses.momentum_update(k, q, 0.996)
    np.testing.assert_allclose(out["a"], 0.996 * k["a"] + 0.004 * q["a"], rtol=1e-12)
    np.testing.assert_allclose(out["b"]["c"], 0.996 * k["b"]["c"] + 0.004 * q["b"]["c"],
                               rtol=1e-12)


def test_enqueue_replaces_the_oldest_keys_in_order():
    queue = np.asarray(moco_losses.init_queue(jax.random.PRNGKey(0), 8, 3))
    np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-6)
    ptr = 0
    batches = [np.full((2, 3), i, np.float32) for i in range(1, 6)]
    for b in batches:
        queue, ptr = moco_losses.enqueue(queue, ptr, b)
    queue = np.asarray(queue)
    assert int(ptr) == 2  # five batches of 2 in a queue of 8: wrapped once
    np.testing.assert_array_equal(queue[:, 0], [5, 5, 2, 2, 3, 3, 4, 4])
    with pytest.raises(ValueError, match="not a multiple"):
        moco_losses.enqueue(queue, 0, np.zeros((3, 3), np.float32))
