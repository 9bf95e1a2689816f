"""The DINOv2 vision transformer (AstroDINO, PolymathicAI's image tower) in Flax.

Layout and numerics follow facebookresearch/dinov2 at the commit AstroCLIP pins
(2302b6bf, `dinov2/models/vision_transformer.py` and `dinov2/layers/`): a Conv patch embedding
(kernel = stride = patch), pre-norm blocks x + ls1(attn(norm1(x))), x + ls2(mlp(norm2(x))) with
LayerScale, one packed qkv Linear with bias, attention scale head_dim ** -0.5, an MLP with exact
(erf) GELU, LayerNorm eps 1e-6 everywhere (two-pass variance, as torch), a final `norm`, a CLS
token and a learned positional embedding for the `img_size` grid (CLS entry first).

Two forwards, because upstream uses the same weights two ways:
  * `__call__(images)` -> (B, T, D) tokens, **exactly as AstroCLIP's ImageHead runs the
    backbone**: norm(blocks(patch_embed(x))). Upstream skips `prepare_tokens_with_masks`
    there, so these tokens get **no CLS token and no positional embedding**; the learned
    cross-attention head was trained on exactly these, so we reproduce it rather than "fix" it.
  * `cls_embedding(images, masks=None)` -> (B, D): the standalone AstroDINO / DINOv2 forward
    (patch tokens, optional iBOT mask token, CLS prepended, positional embedding added,
    interpolated when the grid differs from the training grid, blocks, norm, CLS output).

Variable names mirror dinov2's state_dict ("." -> "/", `blocks.<chunk>.<i>` -> `blocks_<i>`,
Linear/Conv `weight` -> `kernel`, LayerNorm `weight` -> `scale`, named parameters keep their
names: `cls_token`, `pos_embed`, `mask_token`, `ls1/gamma`), so `converters/dinov2.py` is
nearly a rename.

Input: NHWC float32 images, i.e. the NCHW tensor upstream's backbone receives transposed
(0, 2, 3, 1). Matmuls run at `precision` ("highest" by default): full float32 on every backend
(TF32 on a GPU would miss upstream's float32 numbers by ~1e-3).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from astroclip_jax.models import transformer_ops
from astroclip_jax.models.precision import at_least_float32

# Upstream AstroDINO (astroclip/astrodino/config.yaml: vit_large, patch 12, 144 px global crops,
# layerscale 1e-5) and smaller sizes built from the same code.
SIZES: dict[str, dict[str, Any]] = {
    "vit_large_p12": dict(img_size=144, patch_size=12, embed_dim=1024, depth=24, num_heads=16,
                          mlp_hidden=4096),
    "small": dict(img_size=144, patch_size=12, embed_dim=384, depth=12, num_heads=6, mlp_hidden=1536),
    "test": dict(img_size=48, patch_size=12, embed_dim=64, depth=2, num_heads=4, mlp_hidden=256),
    # configs/astroclip.py:synthetic, pretrained here by MoCo v2 on a CPU (96 px: 64 patches).
    "mini": dict(img_size=96, patch_size=12, embed_dim=128, depth=4, num_heads=4, mlp_hidden=512),
}

_LN_EPS = 1e-6  # dinov2: norm_layer = partial(nn.LayerNorm, eps=1e-6)
# torch's bicubic convolution coefficient (upsample_bicubic2d, as in OpenCV); jax.image uses
# Keys' -0.5, see `bicubic_matrix`.
_CUBIC_A = -0.75


def _layer_norm(name: str | None = None, dtype: Any = None) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2] as torch computes it; E[x^2] - mean^2 loses digits
    # on the residual stream, whose mean is large next to its spread. Statistics are reduced in
    # float32 whatever `dtype` (Flax's force_float32_reductions).
    return nn.LayerNorm(epsilon=_LN_EPS, use_fast_variance=False, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


def _dense(features: int, use_bias: bool, precision: Any, name: str,
           dtype: Any = None) -> nn.Dense:
    # dinov2's init_weights_vit_timm: trunc_normal(std 0.02) weights, zero biases.
    return nn.Dense(features, use_bias=use_bias, precision=precision, dtype=dtype,
                    param_dtype=jnp.float32,
                    kernel_init=nn.initializers.truncated_normal(0.02), name=name)


class LayerScale(nn.Module):
    """x * gamma, gamma initialised to `init_values` (dinov2 `layers/layer_scale.py`)."""

    init_values: float

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.constant(self.init_values), (x.shape[-1],),
                           jnp.float32)
        return x * gamma.astype(x.dtype)


class Attention(nn.Module):
    """dinov2 `Attention` (MemEffAttention without xFormers computes the same): packed qkv,
    q scaled by head_dim ** -0.5 before q @ k^T, softmax over keys, proj."""

    num_heads: int
    qkv_bias: bool = True
    proj_bias: bool = True
    precision: Any = "highest"
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        b, n, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"width {c} is not a multiple of num_heads {self.num_heads}")
        hd = c // self.num_heads
        qkv = _dense(3 * c, self.qkv_bias, self.precision, "qkv", self.dtype)(x)
        q, k, v = transformer_ops.split_heads(qkv, self.num_heads)
        out = transformer_ops.attend(q * (hd ** -0.5), k, v, self.precision)
        return _dense(c, self.proj_bias, self.precision, "proj", self.dtype)(out)


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU (torch nn.GELU's default) -> fc2."""

    hidden: int
    bias: bool = True
    precision: Any = "highest"
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        h = _dense(self.hidden, self.bias, self.precision, "fc1", self.dtype)(x)
        h = transformer_ops.gelu_exact(h)
        return _dense(x.shape[-1], self.bias, self.precision, "fc2", self.dtype)(h)


class Block(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))) (eval: no drop path)."""

    num_heads: int
    mlp_hidden: int
    layerscale: float | None = 1e-5
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    precision: Any = "highest"
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        def scaled(y, name):
            # dinov2: `LayerScale(...) if init_values else nn.Identity()`.
            return LayerScale(self.layerscale, name=name)(y) if self.layerscale else y

        y = Attention(self.num_heads, self.qkv_bias, self.proj_bias, self.precision, self.dtype,
                      name="attn")(_layer_norm("norm1", self.dtype)(x))
        x = x + scaled(y, "ls1")
        y = Mlp(self.mlp_hidden, self.ffn_bias, self.precision, self.dtype,
                name="mlp")(_layer_norm("norm2", self.dtype)(x))
        return x + scaled(y, "ls2")


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None) -> np.ndarray:
    """(out_size, in_size) weights of torch's 1-D bicubic resampling (align_corners=False,
    antialias=False), as `F.interpolate(..., mode="bicubic", scale_factor=...)` computes them.

    Written out because jax.image.resize / scale_and_translate differ from torch in two ways that
    move the interpolated positions by far more than 1e-5: their cubic kernel is Keys' a = -0.5
    (torch: -0.75), and at the border they renormalise the in-range taps, where torch repeats the
    edge sample (clamped indices). torch also maps output pixel i to input coordinate
    (i + 0.5) / scale_factor - 0.5 with the scale factor it was given, not in_size / out_size:
    dinov2 passes (grid + 0.1) / M, so the offset changes every weight.

    Args:
      in_size, out_size: lengths of the input and output axis.
      scale_factor: the factor handed to F.interpolate; None: the output size was given, and
        torch uses in_size / out_size.
    """
    # torch computes the coordinate scale as 1 / scale_factor in double, then in float32.
    scale = (1.0 / scale_factor) if scale_factor else in_size / out_size
    src = np.float64(np.float32(scale)) * (np.arange(out_size) + 0.5) - 0.5
    base = np.floor(src)
    t = src - base
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    taps = (far(t + 1), near(t), near(1 - t), far(2 - t))
    out = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    for k, w in enumerate(taps):
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)  # torch clamps at the edge
        np.add.at(out, (rows, idx), w)
    return out.astype(np.float32)


def interpolate_pos_embed(pos_embed: jax.Array, grid_hw: tuple[int, int], offset: float,
                          precision: Any = "highest") -> jax.Array:
    """dinov2's `interpolate_pos_encoding` (pinned commit): the (1, 1 + M*M, D) table of an M x M
    training grid for a (H0, W0) patch grid: the CLS entry as is, the patch entries resampled
    bicubically with scale factor (grid + offset) / M per axis (antialias off, upstream's
    `interpolate_antialias: false`). The table is returned unchanged for the training grid, as
    upstream does. offset 0 means "resample to the size" (dinov2's newer code path)."""
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"pos_embed has {n} patch entries, not a square grid")
    h0, w0 = grid_hw
    if (h0, w0) == (m, m):
        return pos_embed
    rows = bicubic_matrix(m, h0, (h0 + offset) / m if offset else None)
    cols = bicubic_matrix(m, w0, (w0 + offset) / m if offset else None)
    dim = pos_embed.shape[-1]
    grid = pos_embed[0, 1:].astype(jnp.float32).reshape(m, m, dim)
    patch = jnp.einsum("ih,hwd,jw->ijd", rows, grid, cols, precision=precision)
    return jnp.concatenate([pos_embed[:, :1], patch.reshape(1, h0 * w0, dim)], axis=1)


class VisionTransformer(nn.Module):
    """DINOv2 ViT (no registers, MLP FFN). Sizes in `SIZES`; the converter reads them from a file.

    Attributes:
      img_size: training crop size; sets the positional-embedding grid (img_size // patch_size)^2.
      patch_size: square patch side (pixels); inputs must be multiples of it.
      in_chans: image channels.
      embed_dim, depth, num_heads, mlp_hidden: width, blocks, heads, MLP hidden width.
      layerscale: LayerScale init value; None or 0: no LayerScale (as dinov2's init_values).
      qkv_bias, proj_bias, ffn_bias: biases of qkv, attention proj, and the MLP's Linears.
      interpolate_offset: dinov2's positional-embedding interpolation offset (0.1).
      precision: matmul precision ("highest": float32 everywhere).
      dtype: compute dtype name ("float32", "bfloat16"): parameters stay float32, activations
        and matmuls run in `dtype`, LayerNorm statistics and the softmax in float32; the output
        is float32 (the heads and the loss stay float32).
    """

    img_size: int = 144
    patch_size: int = 12
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_hidden: int = 4096
    layerscale: float | None = 1e-5
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    interpolate_offset: float = 0.1
    precision: Any = "highest"
    dtype: str | None = None  # None: the input's (float32)

    def setup(self):
        d = self.embed_dim
        n_patches = (self.img_size // self.patch_size) ** 2
        compute = jnp.dtype(self.dtype) if self.dtype else None
        self.patch_embed = PatchEmbed(self.patch_size, d, self.precision, compute)
        # dinov2 init_weights: cls_token ~ N(0, 1e-6), pos_embed ~ trunc_normal(0.02), mask 0.
        self.cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d), jnp.float32)
        self.pos_embed = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                                    (1, n_patches + 1, d), jnp.float32)
        self.mask_token = self.param("mask_token", nn.initializers.zeros, (1, d), jnp.float32)
        self.blocks = [Block(self.num_heads, self.mlp_hidden, self.layerscale, self.qkv_bias,
                             self.proj_bias, self.ffn_bias, self.precision, compute)
                       for i in range(self.depth)]
        # setup names submodules by attribute: blocks_<i>, norm
        self.norm = _layer_norm(dtype=compute)

    def _blocks_norm(self, x):
        for block in self.blocks:
            x = block(x)
        return at_least_float32(self.norm(x))

    def __call__(self, images, train: bool = False):
        """(B, H, W, C) images -> (B, (H/p)(W/p), D) tokens as AstroCLIP's image head uses them:
        norm(blocks(patch_embed(x))), NO CLS token and NO positional embedding (upstream's
        ImageHead.forward bypasses prepare_tokens_with_masks). `train` is accepted for a uniform
        tower API and changes nothing (no dropout or drop path at inference)."""
        del train
        x, _ = self.patch_embed(jnp.asarray(images, self.dtype or jnp.float32))
        return self._blocks_norm(x)

    def cls_embedding(self, images, masks=None):
        """(B, H, W, C) images -> (B, D): DINOv2's `forward` (x_norm_clstoken), the standalone
        AstroDINO embedding. `masks` (B, (H/p)(W/p)) bool replaces those patch tokens by
        `mask_token` before the positions are added (iBOT), as upstream."""
        x, grid = self.patch_embed(jnp.asarray(images, self.dtype or jnp.float32))
        if masks is not None:
            x = jnp.where(jnp.asarray(masks)[..., None], self.mask_token[None].astype(x.dtype), x)
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, self.embed_dim))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + interpolate_pos_embed(self.pos_embed, grid, self.interpolate_offset,
                                      self.precision).astype(x.dtype)
        return self._blocks_norm(x)[:, 0]


class MocoViT(VisionTransformer):
    """The ViT with a MoCo v2 projection head on its CLS embedding, for `--mode=pretrain_moco`
    ("any image tower in any image trainer"): the same interface as `resnet.ResNet` there
    ({"features", "head"}, a `batch_norm_training` switch: the ViT has no BatchNorm).

    The head's layers `fc_0` (Dense -> ReLU) and `fc_2` sit beside the ViT's own parameters, so
    the trained tower directory is a plain "dinov2_vit" tower plus its MoCo head, which
    AstroCLIP drops (`towers.KINDS` own_head) or uses to seed an MLP image head."""

    head_hidden: int = 1024
    head_out: int = 128

    def setup(self):
        super().setup()
        self.fc_0 = nn.Dense(self.head_hidden, name="fc_0")
        self.fc_2 = nn.Dense(self.head_out, name="fc_2")

    def __call__(self, images, batch_norm_training: bool = False):
        del batch_norm_training
        features = self.cls_embedding(images)
        return {"features": features, "head": self.fc_2(nn.relu(self.fc_0(features)))}


class PatchEmbed(nn.Module):
    """Conv2d(kernel = stride = patch) -> (B, H0 * W0, D) tokens in row-major patch order (torch's
    flatten(2).transpose(1, 2)); returns (tokens, (H0, W0))."""

    patch_size: int
    embed_dim: int
    precision: Any = "highest"
    dtype: Any = None

    @nn.compact
    def __call__(self, images):
        if images.ndim != 4:
            raise ValueError(f"VisionTransformer expects NHWC images (B, H, W, C), got {images.shape}")
        b, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:  # dinov2 asserts the same
            raise ValueError(f"image size {h} x {w} is not a multiple of the patch size {p}")
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID",
                    precision=self.precision, dtype=self.dtype, param_dtype=jnp.float32,
                    name="proj")(images)
        return x.reshape(b, (h // p) * (w // p), self.embed_dim), (h // p, w // p)
