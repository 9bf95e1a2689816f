"""The Flax CrossAttentionHead and its converter mapping against torch.nn.MultiheadAttention.

The reference is upstream's head rebuilt from torch.nn pieces with upstream's state_dict names
(`cross_attention.query`, `cross_attention.multihead_attn` = nn.MultiheadAttention(batch_first,
kdim = vdim = tower width), `cross_attention.layernorm` = nn.LayerNorm, `mlp.encoder` /
`mlp.decoder` = nn.Linear with exact nn.GELU between), random non-trivial weights, at full size
(1024-d, 4 heads): the spectrum side (kdim 768 != 1024: separate q/k/v_proj_weight; residual) and
the image side (kdim 1024: packed in_proj_weight; no residual). 1e-4 relative in float32.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from torch import nn

from astroclip_jax.models.heads import CrossAttentionHead
from astroclip_jax.models.tower_weights import unflatten
from converters import specformer as converter
from converters.common import ConversionError

RTOL = 1e-4


class TorchHead(nn.Module):
    """Upstream's ImageHead / SpectrumHead without the backbone, in eval mode."""

    def __init__(self, embed_dim: int, num_heads: int, kv_dim: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.cross_attention = nn.Module()
        self.cross_attention.query = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.cross_attention.multihead_attn = nn.MultiheadAttention(
            embed_dim, num_heads, batch_first=True, kdim=kv_dim, vdim=kv_dim)
        self.cross_attention.layernorm = nn.LayerNorm(embed_dim)
        self.mlp = nn.Module()
        self.mlp.encoder = nn.Linear(embed_dim, 4 * embed_dim)
        self.mlp.decoder = nn.Linear(4 * embed_dim, embed_dim)

    def forward(self, tokens):
        ca = self.cross_attention
        query = ca.query.repeat(tokens.shape[0], 1, 1)
        a = ca.layernorm(ca.multihead_attn(query, tokens, tokens, need_weights=False)[0])
        y = self.mlp.decoder(nn.functional.gelu(self.mlp.encoder(a)))
        return (a + y if self.residual else y)[:, 0]


def torch_head(embed_dim, num_heads, kv_dim, residual, seed=0) -> TorchHead:
    torch.manual_seed(seed)
    head = TorchHead(embed_dim, num_heads, kv_dim, residual)
    with torch.no_grad():  # non-trivial: biases (zero in torch's init) and LayerNorm drawn
        for name, p in head.named_parameters():
            if "bias" in name or "layernorm" in name:
                p.add_(0.3 * torch.randn(p.shape))
    return head.eval()


def convert(head: TorchHead, prefix: str, **kw):
    sd = {prefix + k: v.detach().numpy() for k, v in head.state_dict().items()}
    sd[prefix + "backbone.blocks.0.weight"] = np.zeros(1, np.float32)  # the tower: not the head's
    config, flat = converter.convert_head(sd, prefix, "astroclip.ckpt", **kw)
    return CrossAttentionHead(**config), {"params": unflatten(flat)["params"]}, config, sd


def max_rel(ours, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("prefix, kv_dim, tokens, packed", [
    ("spectrum_encoder.", 768, 778, False),  # SpecFormer tokens; upstream SpectrumHead
    ("image_encoder.", 1024, 144, True),  # AstroDINO patch tokens; upstream ImageHead
])
def test_head_matches_torch_full_size(prefix, kv_dim, tokens, packed):
    residual = prefix == "spectrum_encoder."
    head = torch_head(1024, 4, kv_dim, residual)
    module, variables, config, sd = convert(head, prefix)
    assert converter.is_packed(sd, prefix) == packed
    assert config == dict(embed_dim=1024, num_heads=4, kv_dim=kv_dim, mlp_ratio=4,
                          residual=residual, dropout=0.0)
    x = np.random.default_rng(1).normal(0, 1, (8, tokens, kv_dim)).astype(np.float32)
    with torch.no_grad():
        ref = head(torch.from_numpy(x)).numpy()
    apply = jax.jit(module.apply)
    ours = np.asarray(apply(variables, x))
    assert ours.shape == (8, 1024)
    assert max_rel(ours, ref) < RTOL
    # A batch of one (upstream crashes there) is the same galaxy's row of the batch of eight.
    for i in (0, 6):
        one = np.asarray(apply(variables, x[i:i + 1]))
        assert one.shape == (1, 1024)
        np.testing.assert_allclose(one[0], ours[i], rtol=0, atol=1e-5 * np.abs(ours[i]).max())


def test_residual_is_what_differs():
    # Same weights, residual on and off: the outputs differ by exactly LayerNorm(attention).
    head = torch_head(64, 4, 48, residual=True)
    on, variables, _, _ = convert(head, "spectrum_encoder.")
    off = CrossAttentionHead(embed_dim=64, num_heads=4, kv_dim=48, residual=False)
    x = np.random.default_rng(2).normal(0, 1, (3, 20, 48)).astype(np.float32)
    ca = head.cross_attention
    with torch.no_grad():
        q = ca.query.repeat(3, 1, 1)
        ln = ca.layernorm(ca.multihead_attn(q, torch.from_numpy(x), torch.from_numpy(x))[0])[:, 0]
    diff = np.asarray(on.apply(variables, x)) - np.asarray(off.apply(variables, x))
    assert max_rel(diff, ln.numpy()) < RTOL


def _error(sd, prefix) -> str:
    with pytest.raises(ConversionError) as e:
        converter.convert_head(sd, prefix, "astroclip.ckpt")
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("prefix, kv_dim", [("spectrum_encoder.", 48), ("image_encoder.", 64)])
def test_head_mapping_strictness(prefix, kv_dim):
    _, _, _, sd = convert(torch_head(64, 4, kv_dim, prefix == "spectrum_encoder."), prefix)
    mha = prefix + "cross_attention.multihead_attn."
    missing = {k: v for k, v in sd.items() if k != prefix + "mlp.decoder.bias"}
    assert f"'{prefix}mlp.decoder.bias'" in _error(missing, prefix)
    extra = dict(sd, **{prefix + "cross_attention.extra": np.zeros(2, np.float32)})
    assert f"'{prefix}cross_attention.extra'" in _error(extra, prefix)
    wrong = dict(sd, **{mha + "out_proj.weight": np.zeros((64, 63), np.float32)})
    assert f"'{mha}out_proj.weight'" in _error(wrong, prefix)
    bias = dict(sd, **{mha + "in_proj_bias": np.zeros(190, np.float32)})
    assert f"'{mha}in_proj_bias'" in _error(bias, prefix)
    if prefix == "image_encoder.":
        packed = dict(sd, **{mha + "in_proj_weight": np.zeros((192, 63), np.float32)})
        assert f"'{mha}in_proj_weight'" in _error(packed, prefix)
    else:
        k = dict(sd, **{mha + "k_proj_weight": np.zeros((64, 47), np.float32)})
        assert f"'{mha}k_proj_weight'" in _error(k, prefix)
    with pytest.raises(ConversionError, match="num_heads = 3"):
        converter.convert_head(sd, prefix, "astroclip.ckpt", num_heads=3)


def test_head_rejects_tokens_of_another_width():
    head = CrossAttentionHead(embed_dim=16, num_heads=2, kv_dim=8)
    x = np.zeros((2, 5, 8), np.float32)
    variables = jax.jit(head.init)(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"expected \(batch, tokens, 8\)"):
        head.apply(variables, np.zeros((2, 5, 9), np.float32))
