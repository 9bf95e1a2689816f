"""Stein et al.'s MoCo v2 augmentations on the device, in flux units until the RGB transform
(georgestein/ssl-legacysurvey `data_loaders/decals_augmentations.py`, "grrrssgbjcgnrg").

Per view, each image independently, in this order:
  reddening   de-redden by a drawn E(B-V) (lognormal fit), re-redden to E(B-V) ~ U(0, ebv_max):
              x * 10^((ebv_new - ebv_old) * [-1.2856, -0.866, -0.4844])  (g, r, z)
  flips       left-right and up-down, each with p = 1/2, then
  rotation    by U(0, 360) degrees about the centre, bilinear, 0 outside
  size scale  zoom about the centre by s ~ U(0.9, 1.1) on BOTH axes (upstream's rescale with
              `channel_axis=True` scales only axis 0, a bug not copied); the grid keeps its
              size (the crop below takes the centre either way)
  blur        per band to a drawn final PSF: sigma_aug = sqrt(max(final^2 - true^2, 0)), both
              drawn from the lognormal fits (final clipped to the survey's maximum), Gaussian
              filter with scipy's 'reflect' borders and truncate 4
  jitter crop to `size` around the centre moved by U{-j..j} per axis, j = min(7, (H - size)//2)
  noise       per band to a drawn final level the same way (lognormal fits)
  RGB         Stein's ToRGB (`data.preprocess.stein_rgb`)
Flips, rotation and size scale are one inverse affine map, sampled once
(`jax.scipy.ndimage.map_coordinates`, order 1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from astroclip_jax.data import preprocess

# Stein's fits (shape, loc, scale of scipy's lognorm), per band g, r, z.
REDDENING_EXPONENTS = np.array([-1.2856, -0.866, -0.4844], np.float32)
EBV_FIT = (0.67306, 0.001146, 0.03338)
PSF_FIT = (np.array([0.2109966, 0.3008485, 0.3471172]), np.array([1.0807153, 1.2394326, 1.1928363]),
           np.array([1.3153171, 0.9164757, 0.8233702]))
PSF_MAX = np.array([5.0, 4.5, 4.25])  # the survey's largest PSF sigma (pixels)
NOISE_FIT = (np.array([0.2264926, 0.2431146, 0.1334844]),
             np.array([-0.0006735, -0.0023663, -0.0143416]),
             np.array([0.0037602, 0.0067417, 0.0260779]))
TRUNCATE = 4.0
BLUR_RADIUS = int(TRUNCATE * float(PSF_MAX.max()) + 0.5)


class MocoAugment(NamedTuple):
    size: int = 96  # final crop
    jitter: int = 7
    rgb: str = "stein_rgb"  # the RGB the tower is fed later: data.image_transform
    ebv_max: float = 1.0
    scale_min: float = 0.9
    scale_max: float = 1.1


# ---------------------------------------------------------------- deterministic pieces

def redden(images: jax.Array, ebv_old: jax.Array, ebv_new: jax.Array) -> jax.Array:
    """(B, H, W, 3) g, r, z flux seen through E(B-V) ebv_new instead of ebv_old (B,)."""
    exps = jnp.asarray(REDDENING_EXPONENTS)
    factor = 10.0 ** ((ebv_new - ebv_old)[:, None] * exps[None, :])
    return images * factor[:, None, None, :]


def affine_matrices(angles: jax.Array, flip_rows: jax.Array, flip_cols: jax.Array,
                    scales: jax.Array) -> jax.Array:
    """(B, 2, 2) inverse maps (output offset from the centre -> source offset): flip, then
    rotate by `angles` (radians), then zoom by `scales`."""
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    rot_inv = jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], 1)
    flips = jnp.stack([jnp.where(flip_rows, -1.0, 1.0), jnp.where(flip_cols, -1.0, 1.0)], -1)
    return flips[:, :, None] * rot_inv / scales[:, None, None]


def warp(images: jax.Array, matrices: jax.Array) -> jax.Array:
    """Sample each image at centre + M (p - centre) for every pixel p, bilinear, with 0 beyond
    the edges (interpolated towards it within a pixel of the edge: scipy's 'grid-constant')."""
    _, height, width, _ = images.shape
    centre = jnp.array([(height - 1) / 2.0, (width - 1) / 2.0], jnp.float32)
    grid = jnp.stack(jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                                  jnp.arange(width, dtype=jnp.float32), indexing="ij"))
    offsets = grid.reshape(2, -1) - centre[:, None]

    def one(image, m):
        src = centre[:, None] + jnp.dot(m, offsets, precision=jax.lax.Precision.HIGHEST)
        planes = [jax.scipy.ndimage.map_coordinates(image[..., c], [src[0], src[1]], order=1,
                                                    mode="constant", cval=0.0)
                  for c in range(image.shape[-1])]
        return jnp.stack(planes, -1).reshape(image.shape)

    return jax.vmap(one)(images, matrices)


def _kernels(sigmas: jax.Array) -> jax.Array:
    """(..., 2R+1) scipy gaussian_filter1d weights: radius int(4 sigma + 0.5), normalised."""
    taps = jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=jnp.float32)
    s = jnp.maximum(sigmas, 1e-6)[..., None]
    radius = jnp.floor(TRUNCATE * s + 0.5)
    k = jnp.where(jnp.abs(taps) <= radius, jnp.exp(-0.5 * jnp.square(taps / s)), 0.0)
    return k / jnp.sum(k, axis=-1, keepdims=True)


def blur_bands(images: jax.Array, sigmas: jax.Array) -> jax.Array:
    """Gaussian filter of each image's bands with `sigmas` (B, 3) (0: unchanged), scipy's
    'reflect' borders (the edge pixel repeated), separable."""
    batch, height, width, channels = images.shape
    r, n = BLUR_RADIUS, batch * channels
    k = _kernels(sigmas).reshape(n, 2 * r + 1).T  # (taps, B*C), kernels are symmetric
    # One depthwise convolution per axis: every (image, band) plane is its own group.
    x = jnp.transpose(images, (1, 2, 0, 3)).reshape(1, height, width, n)
    x = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="symmetric")
    for kernel in (k[:, None, None, :], k[None, :, None, :]):
        x = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=n,
                                         precision=jax.lax.Precision.HIGHEST)
    x = jnp.transpose(x.reshape(height, width, batch, channels), (2, 0, 1, 3))
    return jnp.where((sigmas > 0)[:, None, None, :], x, images)


def jitter_crop(images: jax.Array, shifts: jax.Array, size: int) -> jax.Array:
    """(B, size, size, C) windows centred at H // 2 + shifts[:, 0], W // 2 + shifts[:, 1]."""
    _, height, width, channels = images.shape
    starts = jnp.stack([height // 2 + shifts[:, 0], width // 2 + shifts[:, 1]], -1) - size // 2
    return jax.vmap(lambda im, s: jax.lax.dynamic_slice(im, (s[0], s[1], 0),
                                                        (size, size, channels)))(images, starts)


def added_sigma(true: jax.Array, final: jax.Array) -> jax.Array:
    """What to add (in quadrature) to go from `true` to `final`: sqrt(max(f^2 - t^2, 0))."""
    return jnp.sqrt(jnp.maximum(jnp.square(final) - jnp.square(true), 0.0))


def to_rgb(images: jax.Array) -> jax.Array:
    """`data.preprocess.stein_rgb` in jnp (the same float32 formula)."""
    s = [preprocess.STEIN_SCALES[b] for b in preprocess.STEIN_BANDS[::-1]]
    x = images[..., ::-1]
    scaled = x * jnp.asarray(s, jnp.float32)
    m, q = preprocess.STEIN_M, preprocess.STEIN_Q
    intensity = jnp.sum(jnp.maximum(scaled + m, 0.0), axis=-1) / 3.0
    stretched = jnp.arcsinh(q * intensity) / math.sqrt(q)
    intensity = jnp.where(intensity == 0.0, 1e-6, intensity)
    return jnp.clip(scaled + x * (m * stretched / intensity)[..., None], 0.0, 1.0)


def astroclip_rgb(images: jax.Array) -> jax.Array:
    """`data.preprocess.astroclip_rgb` in jnp: the viewer stretch, then height and width
    swapped (what the released AstroCLIP's ViT is fed)."""
    m, q = preprocess.STEIN_M, preprocess.STEIN_Q
    scaled = [images[..., i] * preprocess.VIEWER_PLANES[b][1] + m
              for i, b in enumerate(preprocess.STEIN_BANDS)]
    intensity = sum(jnp.maximum(s, 0.0) for s in scaled) / 3.0
    stretched = jnp.arcsinh(q * intensity) / math.sqrt(q)
    intensity = jnp.where(intensity == 0.0, 1e-6, intensity)
    planes = sorted(zip((preprocess.VIEWER_PLANES[b][0] for b in preprocess.STEIN_BANDS), scaled))
    rgb = jnp.stack([s * stretched / intensity for _, s in planes], axis=-1)
    return jnp.swapaxes(jnp.clip(rgb, 0.0, 1.0), -3, -2)


# ---------------------------------------------------------------- the random view

def _lognormal(key, fit, shape):
    shape_p, loc, scale = (jnp.asarray(v, jnp.float32) for v in fit)
    return jnp.exp(jnp.log(scale) + shape_p * jax.random.normal(key, shape)) + loc


def view(key: jax.Array, images: jax.Array, aug: MocoAugment = MocoAugment()) -> jax.Array:
    """One augmented RGB view (B, size, size, 3) of (B, H, W, 3) g, r, z flux images."""
    batch, height, width, _ = images.shape
    keys = jax.random.split(key, 12)
    ebv_old = _lognormal(keys[0], EBV_FIT, (batch,))
    ebv_new = jax.random.uniform(keys[1], (batch,), maxval=aug.ebv_max)
    x = redden(images, ebv_old, ebv_new)
    angles = jax.random.uniform(keys[2], (batch,), maxval=2 * math.pi)
    flips = jax.random.bernoulli(keys[3], 0.5, (2, batch))
    scales = jax.random.uniform(keys[4], (batch,), minval=aug.scale_min, maxval=aug.scale_max)
    x = warp(x, affine_matrices(angles, flips[0], flips[1], scales))
    psf_final = jnp.minimum(_lognormal(keys[5], PSF_FIT, (batch, 3)), jnp.asarray(PSF_MAX, jnp.float32))
    x = blur_bands(x, added_sigma(_lognormal(keys[6], PSF_FIT, (batch, 3)), psf_final))
    jitter = min(aug.jitter, (min(height, width) - aug.size) // 2)
    shifts = jax.random.randint(keys[7], (batch, 2), -jitter, jitter + 1)
    x = jitter_crop(x, shifts, aug.size)
    sigma = added_sigma(_lognormal(keys[8], NOISE_FIT, (batch, 3)),
                        _lognormal(keys[9], NOISE_FIT, (batch, 3)))
    x = x + sigma[:, None, None, :] * jax.random.normal(keys[10], x.shape)
    return astroclip_rgb(x) if aug.rgb == "astroclip_rgb" else to_rgb(x)
