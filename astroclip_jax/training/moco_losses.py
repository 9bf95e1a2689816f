"""MoCo v2's loss, key-encoder momentum update and queue of negatives, as pure functions
(He et al. 2020 / Chen et al. 2020; Stein et al.'s `ssl-legacysurvey/moco/moco2_module.py`).

    q = normalise(f_q(x_q)), k = normalise(f_k(x_k))           (N, D), k without gradient
    logits = [q.k | q.queue^T] / T                             (N, 1 + K)
    loss = mean cross-entropy with label 0 (the positive)
    theta_k <- m theta_k + (1 - m) theta_q                     before each step
    queue[ptr : ptr + N] = k; ptr = (ptr + N) mod K            after each step (K % N == 0)

The queue is stored (K, D) (torch keeps it (D, K)); its rows are the keys of the last K / N
global batches. The trainer (`training/moco.py`) holds the encoders; these are its parts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def normalise(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch F.normalize(x, dim=1): x / max(||x||, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def moco_logits(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float) -> jax.Array:
    """(N, 1 + K) logits of normalised queries q, keys k (N, D) and the queue (K, D)."""
    hi = jax.lax.Precision.HIGHEST
    l_pos = jnp.sum(q * k, axis=-1, keepdims=True)
    l_neg = jnp.dot(q, queue.T, precision=hi)
    return jnp.concatenate([l_pos, l_neg], axis=1) / temperature


def moco_loss(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float
              ) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy with the positive at index 0, top-1 accuracy); k gets no gradient."""
    logits = moco_logits(q, jax.lax.stop_gradient(k), queue, temperature)
    log_p = jax.nn.log_softmax(logits, axis=1)
    loss = -jnp.mean(log_p[:, 0])
    accuracy = jnp.mean(jnp.argmax(logits, axis=1) == 0)
    return loss, accuracy


def momentum_update(params_k: Any, params_q: Any, momentum: float) -> Any:
    """theta_k * m + theta_q * (1 - m), leaf by leaf (the key encoder's parameters only)."""
    return jax.tree.map(lambda k, q: k * momentum + q * (1.0 - momentum), params_k, params_q)


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Replace the oldest N rows of the queue (K, D) by `keys` (N, D); the new pointer.
    K must be a multiple of N (as MoCo asserts), so a batch never wraps around."""
    size, n = queue.shape[0], keys.shape[0]
    if size % n:
        raise ValueError(f"queue size {size} is not a multiple of the global batch {n}")
    queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, 0))
    return queue, (ptr + n) % size


def init_queue(key: jax.Array, size: int, dim: int) -> jax.Array:
    """MoCo's initial queue: random normal rows, normalised."""
    return normalise(jax.random.normal(key, (size, dim)))
