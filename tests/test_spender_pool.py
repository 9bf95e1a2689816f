"""Spender's max pool (reshape + max with a first-maximum gradient) against Flax's reduce_window
pool, whose gradient XLA computes with select_and_scatter: same values, same gradients, ties
included, for lengths where torch's floor length cuts the tail and where it pads it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astroclip_jax.models import spender


@pytest.mark.parametrize("length,size", [(7781, 5), (1557, 11), (103, 11), (16, 5), (17, 11)])
def test_max_pool_matches_reduce_window(length, size):
    rng = np.random.default_rng(length)
    x = jnp.asarray(rng.normal(size=(2, length, 3)), jnp.float32)
    pad = size // 2

    def reference(v):
        return nn.max_pool(v, window_shape=(size,), strides=(size,), padding=((pad, pad),))

    def ours(v):
        return spender.max_pool(v, size)

    # torch MaxPool1d's length: floor((L + 2 pad - size) / size) + 1
    assert ours(x).shape[1] == (length + 2 * pad - size) // size + 1
    for v in (x, jnp.round(2 * x) / 2):  # the second has ties inside windows
        np.testing.assert_array_equal(ours(v), reference(v))
        g = jnp.asarray(rng.normal(size=reference(v).shape), jnp.float32)
        want = jax.vjp(reference, v)[1](g)[0]
        got = jax.jit(lambda a, b: jax.vjp(ours, a)[1](b)[0])(v, g)
        np.testing.assert_array_equal(got, want)
