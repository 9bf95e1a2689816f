"""The trainable projection heads: plain ReLU MLPs from tower features to the shared embedding.

    image head     features (N, 2048) -> Dense 2048 -> ReLU -> Dense 128
    spectrum head  features (N, 256)  -> [Dense 256 -> ReLU] x 3 -> Dense 128

Layers are named like a torch `Sequential` of (Linear, ReLU, ...): `fc_0`, `fc_2`, `fc_4`, ...
so the image head has exactly the names of the MoCo v2 head of the image tower (`fc_0`, `fc_2`)
and can start from those converted weights by plain copy.

Parameter counts (checked in tests): image head 2048 -> (2048,) -> 128 has 4,458,624; the
spectrum head 256 -> (256, 256, 256) -> 128 has 230,272, the paper's number (its text says
hidden [256, 128, 128], but its count and code used [256, 256, 256]).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLPHead(nn.Module):
    """Dense -> ReLU for each hidden size, then a linear Dense to `out` (no final activation)."""

    hidden: Sequence[int] = (256, 256, 256)
    out: int = 128

    def __post_init__(self):
        # Configs hand lists over; tuples keep the module hashable.
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        for i, n in enumerate(self.hidden):
            x = nn.relu(nn.Dense(n, name=f"fc_{2 * i}")(x))
        return nn.Dense(self.out, name=f"fc_{2 * len(self.hidden)}")(x)


def build_head(settings) -> nn.Module:
    """The head a `settings.HeadSettings` describes."""
    if settings.kind == "mlp":
        return MLPHead(hidden=tuple(settings.hidden), out=settings.out)
    return CrossAttentionHead(embed_dim=settings.out, num_heads=settings.num_heads,
                              hidden=int(settings.hidden[0]), residual=settings.residual)


def num_params(tree) -> int:
    """Number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
