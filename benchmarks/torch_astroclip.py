"""The released AstroCLIP's embedding in PyTorch, built from its state_dict: the reference our
Flax `models.astroclip.AstroCLIP` is timed against (benchmarks/astroclip_embed.py).

Image side: timm's `VisionTransformer` with DINOv2's options (pre-norm blocks with LayerScale,
exact GELU, LayerNorm eps 1e-6), run as upstream's `ImageHead` runs the backbone:
norm(blocks(patch_embed(x))), no CLS token, no positional embedding. Spectrum side: the
SpecFormer of benchmarks/torch_specformer.py. Heads: upstream's `CrossAttentionHead` +
`MLP` from torch.nn pieces (`nn.MultiheadAttention` with the tower's key/value width, LayerNorm,
GELU MLP; residual on the spectrum side only), then L2 normalisation as our model's `embed`.
Nothing of `astroclip_jax` is used.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_specformer import TorchSpecFormer


class TorchHead(nn.Module):
    """Upstream's cross-attention head: a learned query attends over the tower's tokens."""

    def __init__(self, embed_dim: int, kv_dim: int, n_head: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.query = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.multihead_attn = nn.MultiheadAttention(embed_dim, n_head, batch_first=True,
                                                    kdim=kv_dim, vdim=kv_dim)
        self.layernorm = nn.LayerNorm(embed_dim)
        self.encoder, self.decoder = nn.Linear(embed_dim, 4 * embed_dim), nn.Linear(4 * embed_dim, embed_dim)

    def forward(self, tokens):
        query = self.query.expand(tokens.shape[0], -1, -1)
        x = self.layernorm(self.multihead_attn(query, tokens, tokens, need_weights=False)[0])
        mlp = self.decoder(F.gelu(self.encoder(x)))
        return (x + mlp if self.residual else mlp)[:, 0]

    def load_upstream(self, state: Mapping[str, torch.Tensor], prefix: str) -> None:
        mha = prefix + "cross_attention.multihead_attn."
        self.load_state_dict({
            "query": state[prefix + "cross_attention.query"],
            **{"multihead_attn." + k[len(mha):]: v for k, v in state.items() if k.startswith(mha)},
            **{f"layernorm.{p}": state[f"{prefix}cross_attention.layernorm.{p}"]
               for p in ("weight", "bias")},
            **{f"{m}.{p}": state[f"{prefix}mlp.{m}.{p}"]
               for m in ("encoder", "decoder") for p in ("weight", "bias")}})


def _timm_vit(sizes: Mapping[str, int]):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=sizes["img_size"], patch_size=sizes["patch_size"], embed_dim=sizes["vit_dim"],
        depth=sizes["vit_depth"], num_heads=sizes["vit_heads"],
        mlp_ratio=sizes["vit_mlp"] / sizes["vit_dim"], qkv_bias=True, init_values=1.0,
        num_classes=0, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU)


class TorchAstroCLIP(nn.Module):
    """Both towers and both heads of an `astroclip.ckpt` state_dict (upstream's key names)."""

    def __init__(self, state: Mapping[str, np.ndarray], sizes: Mapping[str, int]):
        super().__init__()
        state = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
        self.vit = _timm_vit(sizes)
        prefix = "image_encoder.backbone."
        # timm names DINOv2's chunked blocks `blocks.CHUNK.INDEX` as `blocks.INDEX`; no mask token
        self.vit.load_state_dict({
            re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k[len(prefix):]): v
            for k, v in state.items() if k.startswith(prefix) and k != prefix + "mask_token"})
        self.specformer = TorchSpecFormer(
            input_dim=22, embed_dim=sizes["spec_dim"], num_layers=sizes["spec_layers"],
            num_heads=sizes["spec_heads"], max_len=sizes["max_len"])
        prefix = "spectrum_encoder.backbone."
        self.specformer.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                         if k.startswith(prefix)})
        e, n = sizes["embed_dim"], sizes["n_head"]
        self.image_head = TorchHead(e, sizes["vit_dim"], n, residual=False)
        self.image_head.load_upstream(state, "image_encoder.")
        self.spectrum_head = TorchHead(e, sizes["spec_dim"], n, residual=True)
        self.spectrum_head.load_upstream(state, "spectrum_encoder.")
        self.eval()

    @torch.no_grad()
    def forward(self, images_nchw: torch.Tensor, flux: torch.Tensor):
        tokens = self.vit.norm(self.vit.blocks(self.vit.patch_embed(images_nchw)))
        image = self.image_head(tokens)
        spectrum = self.spectrum_head(self.specformer(flux)["embedding"])
        return F.normalize(image, dim=-1), F.normalize(spectrum, dim=-1)
