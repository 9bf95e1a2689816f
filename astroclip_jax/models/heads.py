"""The trainable projection heads: plain ReLU MLPs from tower features to the shared embedding,
and the released AstroCLIP's cross-attention heads over a tower's tokens (`CrossAttentionHead`).

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

from astroclip_jax.models.specformer import MLP, layer_norm


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


class MultiheadAttention(nn.Module):
    """torch `nn.MultiheadAttention(embed_dim, num_heads, kdim=vdim=kv_dim, batch_first=True)`
    at inference: q/k/v projections, softmax(q k^T / sqrt(embed_dim / num_heads)) v per head
    (torch scales q by the same factor), `out_proj`. The projections are always separate here;
    torch packs them into `in_proj_weight` when kv_dim == embed_dim (the converter splits it)."""

    embed_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, query: jax.Array, key_value: jax.Array) -> jax.Array:
        d, h = self.embed_dim, self.num_heads
        heads = lambda a: a.reshape(*a.shape[:2], h, d // h)
        q = heads(nn.Dense(d, name="q_proj")(query))
        k = heads(nn.Dense(d, name="k_proj")(key_value))
        v = heads(nn.Dense(d, name="v_proj")(key_value))
        y = nn.dot_product_attention(q, k, v, deterministic=True)
        return nn.Dense(d, name="out_proj")(y.reshape(*y.shape[:2], d))


class _CrossAttention(nn.Module):
    """Upstream `modules.CrossAttentionHead`: a learned query attends over the tokens, then
    dropout and LayerNorm (torch's default eps 1e-5)."""

    embed_dim: int
    num_heads: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        query = self.param("query", nn.initializers.normal(1.0), (1, 1, self.embed_dim))  # torch.randn
        query = jnp.broadcast_to(query, (tokens.shape[0], 1, self.embed_dim)).astype(tokens.dtype)
        y = MultiheadAttention(self.embed_dim, self.num_heads, name="multihead_attn")(query, tokens)
        return layer_norm("layernorm")(nn.Dropout(self.dropout, deterministic=not train)(y))


class CrossAttentionHead(nn.Module):
    """The released AstroCLIP's projection head (upstream `ImageHead` / `SpectrumHead` minus the
    backbone): tokens (B, T, kv_dim) -> embedding (B, embed_dim), not L2-normalised (the loss
    normalises).

        a   = LayerNorm(dropout(MultiheadAttention(query, tokens, tokens)))   (B, 1, D)
        out = a + mlp(a)   if residual (upstream's spectrum side)
              mlp(a)       otherwise   (upstream's image side)
        mlp = Linear(D -> mlp_ratio * D) -> exact GELU -> Linear(-> D) -> dropout

    Upstream returns `x.squeeze()` and also indexes the attention output's batch (`attentions[1]`),
    so a batch of one crashes there (and would lose its batch axis): here the output is always
    (B, D), a batch of one included.

    Variables mirror upstream's state_dict below `image_encoder.` / `spectrum_encoder.`:
    `cross_attention/{query, multihead_attn/{q,k,v,out}_proj, layernorm}`, `mlp/{encoder, decoder}`.
    """

    embed_dim: int = 1024
    num_heads: int = 4
    kv_dim: int = 1024  # the tower's token width (upstream `model_embed_dim`)
    mlp_ratio: int = 4
    residual: bool = False
    dropout: float = 0.0  # upstream trains with 0.1; used only with train=True

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        tokens = jnp.asarray(tokens)
        tokens = tokens.astype(jnp.promote_types(tokens.dtype, jnp.float32))
        if tokens.ndim != 3 or tokens.shape[-1] != self.kv_dim:
            raise ValueError(f"tokens of shape {tokens.shape}; expected (batch, tokens, {self.kv_dim})")
        a = _CrossAttention(self.embed_dim, self.num_heads, self.dropout, name="cross_attention")(
            tokens, train)
        y = MLP(self.mlp_ratio * self.embed_dim, self.dropout, name="mlp")(a, train)
        return (a + y if self.residual else y)[:, 0]


def build_head(settings, kv_dim: int) -> nn.Module:
    """The head a `settings.HeadSettings` describes, over features of width `kv_dim`."""
    if settings.kind == "mlp":
        return MLPHead(hidden=tuple(settings.hidden), out=settings.out)
    return CrossAttentionHead(embed_dim=settings.out, num_heads=settings.num_heads, kv_dim=kv_dim,
                              mlp_ratio=settings.hidden[0] // settings.out,
                              residual=settings.residual)


def num_params(tree) -> int:
    """Number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
