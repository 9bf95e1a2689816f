"""SpecFormer (PolymathicAI/AstroCLIP `astroclip/models/specformer.py`) in Flax: AstroCLIP's
spectrum tower, with its tokenisation inside the model.

    flux (B, L) -> tokenize: per spectrum mean and std (unbiased, clipped >= 0.2), standardise,
                   windows of `slice_section_length` every `section - slice_overlap` pixels (the
                   last window is always dropped, as upstream), each padded with 2 leading zeros,
                   and a first token ((mean - 2) / 2, (std - 2) / 8, 0, ...)
                   DESI (7781 px): 777 windows + 1 = 778 tokens x 22
                -> data_embed Linear(22 -> D) + position_embed (learned, max_len rows)
                -> num_layers x pre-norm block: x + attn(ln1(x)); x + mlp(ln2(x))
                   (no causal mask, LayerNorm eps 1e-5, MLP D -> 4D -> D with exact GELU)
                -> final_layernorm                            "embedding" (B, T, D)
                -> head Linear(D -> 22)                       "reconstructions" (B, T, 22)

`__call__` returns the embedding: the token sequence AstroCLIP's spectrum head attends over
(upstream `SpectrumHead` takes `backbone(x)["embedding"]`, which is after `final_layernorm`).
`reconstruct` gives the masked-modelling output, from tokens, as upstream's training step runs it
(tokenize, then `mask_chunks`, then the model without tokenising again).

Variable names mirror upstream's state_dict ("." -> "/", `blocks.3` -> `blocks_3`, Linear
weight -> transposed `kernel`, LayerNorm weight -> `scale`, Embedding weight -> `embedding`):
`data_embed`, `position_embed`, `blocks_i/{layernorm1, attention/{attention, projection},
layernorm2, mlp/{encoder, decoder}}`, `final_layernorm`, `head`. The converter is a rename.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from astroclip_jax.models import transformer_ops
from astroclip_jax.models.precision import at_least_float32

# The released model (configs/specformer.yaml: 22 -> 768, 6 layers, 6 heads, max_len 800) and
# smaller ones from the same code. The converter reads the actual sizes from the file.
SIZES: dict[str, dict[str, Any]] = {
    "specformer": dict(input_dim=22, embed_dim=768, num_layers=6, num_heads=6, max_len=800),
    "small": dict(input_dim=22, embed_dim=256, num_layers=4, num_heads=4, max_len=800),
    "test": dict(input_dim=22, embed_dim=32, num_layers=2, num_heads=2, max_len=800),
    # configs/astroclip.py:synthetic, pretrained here on a CPU.
    "mini": dict(input_dim=22, embed_dim=96, num_layers=2, num_heads=4, max_len=800),
}

_LN_EPS = 1e-5  # upstream modules.LayerNorm default (Flax's is 1e-6)
_STD_FLOOR = 0.2  # upstream clips each spectrum's std at 0.2 before standardising


def layer_norm(name: str | None, dtype: Any = None) -> nn.LayerNorm:
    """torch LayerNorm numerics: eps 1e-5 and the two-pass variance (Flax's fast E[x^2] - E[x]^2
    loses digits when the mean is large next to the spread); statistics in float32 whatever
    `dtype`."""
    return nn.LayerNorm(epsilon=_LN_EPS, use_fast_variance=False, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


def _dense(features: int, dtype: Any = None, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def num_tokens(length: int, section: int = 20, overlap: int = 10) -> int:
    """Tokens `tokenize` makes of `length` pixels (778 for DESI's 7781): the windows but the
    last, plus the statistics token."""
    return len(range(0, length - overlap, section - overlap))  # one window less, one token more


def tokenize(spectra: jax.Array, section: int = 20, overlap: int = 10) -> jax.Array:
    """Upstream `SpecFormer.preprocess` on (B, L) flux -> tokens (B, num_tokens(L), section + 2).

    Upstream's input is (B, L, 1); here the singleton axis is left out. Its `_slice` always drops
    the last window: its length test reads a transposed axis that is always 1, so a last window
    that happens to be whole is dropped too. Reproduced, so token counts agree.
    """
    x = jnp.asarray(spectra)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if x.ndim != 2:
        raise ValueError(f"spectra of shape {x.shape}; expected (batch, pixels)")
    length = x.shape[1]
    starts = np.arange(0, length - overlap, section - overlap)[:-1]
    if starts.size == 0:
        raise ValueError(f"spectra of {length} pixels: SpecFormer needs more than {section}")
    mean = jnp.mean(x, axis=1, keepdims=True)
    std = jnp.maximum(jnp.std(x, axis=1, ddof=1, keepdims=True), _STD_FLOOR)  # torch: unbiased
    windows = ((x - mean) / std)[:, starts[:, None] + np.arange(section)]  # (B, N, section)
    windows = jnp.pad(windows, ((0, 0), (0, 0), (2, 0)))  # 2 leading zeros per window
    stats = jnp.zeros((x.shape[0], 1, section + 2), x.dtype)
    stats = stats.at[:, 0, 0].set((mean[:, 0] - 2) / 2).at[:, 0, 1].set((std[:, 0] - 2) / 8)
    return jnp.concatenate([stats, windows], axis=1)


def mask_chunks(key: jax.Array, tokens: jax.Array, n_chunks: int = 6, width: int = 50) -> jax.Array:
    """Upstream `SpecFormer.mask_sequence` (its `_mask_seq` on each row) as a pure function.

    tokens (B, T, F): in each row, the sequence is cut into `n_chunks` parts starting at
    i * T // n_chunks; in part i, `width` whole tokens from i * T // n_chunks + offset are set to
    0, offset uniform on {0, ..., T // n_chunks - width - 1} (torch.randint's exclusive high),
    independently per row and part: the same distribution as upstream, drawn from `key` instead
    of torch's global generator. Parts do not overlap, so each row has n_chunks * width zeroed
    tokens (the statistics token included when part 0's offset is 0, as upstream).
    """
    batch, length = tokens.shape[:2]
    if n_chunks * width + (n_chunks - 1) * width > length:  # upstream's own check
        raise ValueError(f"a sequence of {length} tokens is too short to mask "
                         f"{n_chunks} chunks of {width}")
    high = length // n_chunks - width
    if high <= 0:  # torch.randint(0, high) refuses this too
        raise ValueError(f"a sequence of {length} tokens leaves no room for chunks of {width}")
    starts = (np.arange(n_chunks) * length) // n_chunks + jax.random.randint(
        key, (batch, n_chunks), 0, high)
    pos = jnp.arange(length)
    masked = ((pos >= starts[..., None]) & (pos < starts[..., None] + width)).any(axis=1)
    return jnp.where(masked[..., None], jnp.zeros((), tokens.dtype), tokens)


class MLP(nn.Module):
    """Upstream `modules.MLP`: encoder Linear -> exact GELU -> decoder Linear -> dropout."""

    hidden: int
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h = transformer_ops.gelu_exact(_dense(self.hidden, self.dtype, "encoder")(x))
        y = _dense(x.shape[-1], self.dtype, "decoder")(h)
        return nn.Dropout(self.dropout, deterministic=not train)(y)


class SelfAttention(nn.Module):
    """Upstream `modules.SelfAttention` without the causal mask: one packed q|k|v Linear
    (`attention`), softmax(q k^T / sqrt(head_size)) v per head, `projection`, dropout."""

    num_heads: int
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, t, d = x.shape
        q, k, v = transformer_ops.split_heads(_dense(3 * d, self.dtype, "attention")(x),
                                              self.num_heads)
        dropout_rng = self.make_rng("dropout") if train and self.dropout > 0 else None
        y = transformer_ops.attend(q * ((d // self.num_heads) ** -0.5), k, v,
                                   dropout_rng=dropout_rng, dropout_rate=self.dropout)
        y = _dense(d, self.dtype, "projection")(y)
        return nn.Dropout(self.dropout, deterministic=not train)(y)


class TransformerBlock(nn.Module):
    """Upstream `modules.TransformerBlock` (pre-norm; upstream's `norm_first` is never used)."""

    num_heads: int
    dropout: float = 0.0
    mlp_expansion: int = 4
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x + SelfAttention(self.num_heads, self.dropout, self.dtype, name="attention")(
            layer_norm("layernorm1", self.dtype)(x), train)
        return x + MLP(self.mlp_expansion * x.shape[-1], self.dropout, self.dtype, name="mlp")(
            layer_norm("layernorm2", self.dtype)(x), train)


class SpecFormer(nn.Module):
    """SpecFormer on (B, L) flux; fields are upstream's hyper-parameters of the same names
    (`mask_*` belong to the masking function and `norm_first` is unused upstream), and `dtype`,
    the compute dtype name ("float32", "bfloat16"): parameters stay float32, the tokenisation,
    LayerNorm statistics and softmax run in float32, the outputs are float32."""

    input_dim: int = SIZES["specformer"]["input_dim"]
    embed_dim: int = SIZES["specformer"]["embed_dim"]
    num_layers: int = SIZES["specformer"]["num_layers"]
    num_heads: int = SIZES["specformer"]["num_heads"]
    max_len: int = SIZES["specformer"]["max_len"]
    slice_section_length: int = 20
    slice_overlap: int = 10
    dropout: float = 0.0  # the released model's; used only with train=True
    dtype: str | None = None  # None: the input's (float32)

    def __post_init__(self):
        if self.input_dim != self.slice_section_length + 2:
            raise ValueError(f"input_dim {self.input_dim} must be slice_section_length "
                             f"{self.slice_section_length} + 2 (tokens are padded by 2)")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        super().__post_init__()

    def setup(self):
        compute = jnp.dtype(self.dtype) if self.dtype else None
        self.data_embed = _dense(self.embed_dim, compute)
        self.position_embed = nn.Embed(self.max_len, self.embed_dim, dtype=compute,
                                       param_dtype=jnp.float32)
        self.blocks = [TransformerBlock(self.num_heads, self.dropout, dtype=compute,
                                        name=f"blocks_{i}")
                       for i in range(self.num_layers)]
        self.final_layernorm = layer_norm(None, compute)
        self.head = _dense(self.input_dim, compute)
        self.embed_dropout = nn.Dropout(self.dropout)

    def tokenize(self, spectra: jax.Array) -> jax.Array:
        return tokenize(spectra, self.slice_section_length, self.slice_overlap)

    def __call__(self, spectra: jax.Array, train: bool = False) -> jax.Array:
        """Flux (B, L) -> embedding (B, T, embed_dim), T = num_tokens(L)."""
        x = self.embed(self.tokenize(spectra), train)
        if self.is_initializing():  # so init creates the masked-modelling head too
            self.head(x)
        return x

    def embed(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """Tokens (B, T, input_dim) -> embedding (upstream `forward_without_preprocessing`)."""
        t = tokens.shape[1]
        if t > self.max_len:
            raise ValueError(f"cannot forward a sequence of {t} tokens; max_len is {self.max_len}")
        x = self.data_embed(tokens) + self.position_embed(jnp.arange(t))
        x = self.embed_dropout(x, deterministic=not train)
        for block in self.blocks:
            x = block(x, train)
        return at_least_float32(self.final_layernorm(x))

    def reconstruct(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        """Tokens (B, T, input_dim) -> reconstructions (B, T, input_dim) for masked modelling."""
        return at_least_float32(self.head(self.embed(tokens, train)))
