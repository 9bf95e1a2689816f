"""A torch SpecFormer assembled from torch.nn pieces: the reference our Flax SpecFormer is
tested (tests/test_specformer.py) and timed (benchmarks/specformer_forward.py) against.

Upstream's module tree and state_dict names (astroclip/models/specformer.py, astroclip/modules.py)
built from nn.Linear, nn.Embedding, nn.LayerNorm (eps 1e-5), F.scaled_dot_product_attention and
exact F.gelu, eval mode (dropout 0), with upstream's `preprocess` transcribed on (B, L, 1) flux.
Nothing of `astroclip_jax` is used, so it is an independent reference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The sizes of models.specformer.SIZES (kept literal: this file does not import our package).
SIZES = {
    "specformer": dict(input_dim=22, embed_dim=768, num_layers=6, num_heads=6, max_len=800),
    "small": dict(input_dim=22, embed_dim=256, num_layers=4, num_heads=4, max_len=800),
    "test": dict(input_dim=22, embed_dim=32, num_layers=2, num_heads=2, max_len=800),
    "mini": dict(input_dim=22, embed_dim=96, num_layers=2, num_heads=4, max_len=800),
}


class TorchBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.layernorm1, self.layernorm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attention = nn.Module()
        self.attention.attention, self.attention.projection = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.encoder, self.mlp.decoder = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (a.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for a in self.attention.attention(self.layernorm1(x)).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.attention.projection(y)
        return x + self.mlp.decoder(F.gelu(self.mlp.encoder(self.layernorm2(x))))


class TorchSpecFormer(nn.Module):
    """SpecFormer from torch.nn pieces, upstream's state_dict names, upstream's preprocess on
    (B, L, 1) flux."""

    def __init__(self, input_dim, embed_dim, num_layers, num_heads, max_len):
        super().__init__()
        self.data_embed = nn.Linear(input_dim, embed_dim)
        self.position_embed = nn.Embedding(max_len, embed_dim)
        self.blocks = nn.ModuleList([TorchBlock(embed_dim, num_heads) for _ in range(num_layers)])
        self.final_layernorm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, input_dim)

    @staticmethod
    def preprocess(x):
        std, mean = x.std(1, keepdim=True).clip_(0.2), x.mean(1, keepdim=True)
        x = (x - mean) / std
        sections = [x[:, s:s + 20].transpose(1, 2) for s in np.arange(0, x.shape[1] - 10, 10)]
        x = torch.cat(sections[:-1], 1)
        x = F.pad(x, pad=(2, 0, 1, 0), mode="constant", value=0)
        x[:, 0, 0] = (mean.squeeze() - 2) / 2
        x[:, 0, 1] = (std.squeeze() - 2) / 8
        return x

    def forward(self, flux):
        x = self.preprocess(flux[..., None])
        x = self.data_embed(x) + self.position_embed(torch.arange(x.shape[1]))
        for block in self.blocks:
            x = block(x)
        x = self.final_layernorm(x)
        return {"embedding": x, "reconstructions": self.head(x)}


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial weights: every tensor drawn (LayerNorm scales around 1, biases non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif p.ndim >= 2 and "embed" not in name and "query" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[-1]))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return module.eval()


def torch_model(size: str, seed: int = 0) -> TorchSpecFormer:
    """A TorchSpecFormer of SIZES[size] with random, non-trivial weights, in eval mode."""
    return randomize(TorchSpecFormer(**SIZES[size]), seed)
