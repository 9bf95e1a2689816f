"""Stein et al.'s image tower: torchvision ResNet50 (v1.5) with the MoCo v2 MLP head, in Flax.

Layout matches `torchvision.models.resnet50` exactly so converted weights give the same numbers:
stride 2 sits on the 3x3 conv of a bottleneck (v1.5), every pad is explicit and symmetric (Flax
'SAME' pads asymmetrically at stride 2, torch does not), max pooling pads with -inf, and
BatchNorm uses its running statistics with torch's eps 1e-5 (the tower is frozen), unless called
with `batch_norm_training=True` (MoCo pretraining): then batch statistics, and torch's running
update (momentum 0.1, unbiased variance), in the mutable `batch_stats` collection.

Variable names mirror torchvision with "." -> "_" inside a block name (`layer1_0/conv1`,
`layer1_0/downsample_0`, `fc_0`, `fc_2`), so converting a checkpoint is nearly a rename.
Input: NHWC float32 images. Output: {"features": (N, 32 * width) = (N, 2048), "head": (N, head_out)}.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_EXPANSION = 4  # bottleneck output channels = planes * 4

# Real size and smaller sizes built from the same code. `features` = width * 8 * 4.
SIZES: dict[str, dict[str, Any]] = {
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), width=64, head_hidden=2048, head_out=128),
    "small": dict(stage_sizes=(1, 1, 1, 1), width=16, head_hidden=512, head_out=128),
    "test": dict(stage_sizes=(1, 1, 1, 1), width=8, head_hidden=64, head_out=32),
}


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """torch's symmetric padding k // 2 on both spatial axes."""
    return ((k // 2, k // 2), (k // 2, k // 2))


def _batch_norm(name: str, dtype: Any, training: bool = False) -> nn.Module:
    # Plain nn.BatchNorm (not a wrapper) so variables sit at <name>/{scale,bias,mean,var};
    # TrainingBatchNorm keeps the same names, so one variable tree serves both.
    if training:
        return TrainingBatchNorm(dtype=dtype, name=name)
    return nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


class TrainingBatchNorm(nn.Module):
    """torch.nn.BatchNorm2d in training mode, with nn.BatchNorm's variable names: normalise by
    the batch's mean and biased variance over (N, H, W); running mean/var <- 0.9 old + 0.1 batch
    with the UNBIASED variance, as torch does (flax's BatchNorm keeps the biased one)."""

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(xf, axis=axes)
        var = jnp.mean(jnp.square(xf - mean), axis=axes)
        if not self.is_initializing():
            n = xf.size // c
            m = self.momentum
            ra_mean.value = (1 - m) * ra_mean.value + m * mean
            ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


def _conv(features: int, k: int, stride: int, name: str, dtype: Any) -> nn.Conv:
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=_pad(k), use_bias=False,
                   dtype=dtype, param_dtype=jnp.float32, name=name)


class Bottleneck(nn.Module):
    """torchvision Bottleneck: 1x1 -> 3x3 (stride here, v1.5) -> 1x1 (x4), projection shortcut."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    bn_training: bool = False

    @nn.compact
    def __call__(self, x):
        d, t = self.dtype, self.bn_training
        y = nn.relu(_batch_norm("bn1", d, t)(_conv(self.planes, 1, 1, "conv1", d)(x)))
        y = nn.relu(_batch_norm("bn2", d, t)(_conv(self.planes, 3, self.stride, "conv2", d)(y)))
        y = _batch_norm("bn3", d, t)(_conv(self.planes * _EXPANSION, 1, 1, "conv3", d)(y))
        if self.downsample:
            x = _batch_norm("downsample_1", d, t)(
                _conv(self.planes * _EXPANSION, 1, self.stride, "downsample_0", d)(x))
        return nn.relu(y + x)


class ResNet(nn.Module):
    """torchvision-layout ResNet with an optional MoCo v2 head.

    Attributes:
      stage_sizes: bottleneck blocks per stage ((3, 4, 6, 3) for ResNet50).
      width: stem channels and planes of stage 1 (64 for ResNet50); stage i has width * 2**i planes.
      head_hidden: hidden size of the MoCo v2 MLP head; None or 0 means no head.
      head_out: output size of the head (128 for Stein et al.).
      dtype: compute dtype name ("float32", "bfloat16"); parameters are always float32.
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    head_hidden: int | None = 2048
    head_out: int = 128
    dtype: str = "float32"

    @nn.compact
    def __call__(self, images, train: bool = False, batch_norm_training: bool = False):
        """images: (N, H, W, 3) float. `train` is accepted for a uniform tower API but changes
        nothing (the contrastive run keeps the tower frozen); `batch_norm_training=True` (MoCo)
        normalises by batch statistics and updates the running ones (mutable "batch_stats")."""
        del train
        t = batch_norm_training
        if images.ndim != 4:
            raise ValueError(f"ResNet expects NHWC images (N, H, W, C), got shape {images.shape}")
        d = jnp.dtype(self.dtype)
        x = images.astype(d)
        x = _conv(self.width, 7, 2, "conv1", d)(x)
        x = nn.relu(_batch_norm("bn1", d, t)(x))
        # max_pool pads with the reduction's identity (-inf), as torch's MaxPool2d does.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, n_blocks in enumerate(tuple(self.stage_sizes)):
            planes = self.width * 2**i
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = Bottleneck(planes, stride=stride, downsample=(j == 0), dtype=d,
                               bn_training=t, name=f"layer{i + 1}_{j}")(x)
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out = {"features": features}
        if self.head_hidden:
            h = nn.relu(nn.Dense(self.head_hidden, dtype=d, name="fc_0")(features.astype(d)))
            out["head"] = nn.Dense(self.head_out, dtype=d, name="fc_2")(h).astype(jnp.float32)
        return out


def feature_dim(width: int) -> int:
    """Size of `features` for a given width (2048 for width 64)."""
    return width * 8 * _EXPANSION
