"""What the towers with a compute dtype (the ViT, SpecFormer) hand on: at least float32.

A tower may run in bfloat16 (`dtype="bfloat16"`: float32 parameters, bfloat16 activations), but
the heads and the loss stay float32, so a tower's output is promoted on the way out; a float32
or float64 output (the x64 test path) passes unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def at_least_float32(x: jax.Array) -> jax.Array:
    """`x` in float32, or wider when it already is (never narrowed)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
