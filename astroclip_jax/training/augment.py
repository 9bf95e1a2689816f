"""Image and spectrum augmentations: pure, batched functions of a PRNG key.

Images are (B, H, W, C) float32, spectra (B, L) float32. Every function is plain ``jnp`` on
the whole batch (no vmap needed by the caller, no host round-trips), so it runs inside the
jitted train step on global, sharded arrays. Shapes and the config values are static
(Python numbers read at trace time); only the key and the arrays are traced.

Settings read by ``augment_images`` / ``augment_spectra`` (``settings.AugmentSettings``):

  rotation (bool)               random rotation by a uniform angle in [0, 2 pi), bilinear.
  flip (bool)                   horizontal and vertical flips, each with p = 0.5 per image.
  crop (int)                    final centre-crop size; 0 = no crop.
  blur_sigma_max (float)        Gaussian blur, sigma ~ U[0, blur_sigma_max] per image; 0 = off.
  noise_std_max (float)         additive Gaussian noise, std ~ U[0, noise_std_max] per image
                                (upstream ``AddGaussianNoise``); 0 = off.
  spectrum_noise_scale (float)  spectrum noise of ``scale * pixel_std`` in flux units; 0 = off.
                                The spectra arrive normalised (z-scored by the host), so the
                                flux-unit std is divided by each spectrum's ``spectrum_scale``
                                (the std the z-score divided by): the noise has the real DESI
                                amplitude relative to each galaxy's own flux.

Image order: rotation -> flips -> centre crop -> blur -> noise. The crop comes after the
rotation so that, when the input is larger than the crop, the corners the rotation fills
with ``fill`` are cut away; blur and noise come last because they act on the pixels the
model sees (and the noise must not itself be blurred). With rotation on, rotation, flips and
crop run as one gather (``rotate_flip_crop``), which is the same map sampled once.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from astroclip_jax.data.preprocess import center_crop
from astroclip_jax.settings import AugmentSettings


# ---------------------------------------------------------------- deterministic pieces

def rotate(images, angles, fill=0.0):
    """Rotate each image counter-clockwise by ``angles`` (B,) radians about its centre.

    Counter-clockwise as displayed with row 0 on top, i.e. an angle of pi/2 equals
    ``np.rot90(image, 1, axes=(0, 1))`` for square images. Bilinear interpolation; samples
    falling outside the image take ``fill``. The centre is ((H-1)/2, (W-1)/2).
    """
    return rotate_flip_crop(images, angles, fill=fill)


def rotate_flip_crop(images, angles, horizontal=None, vertical=None, size=None, fill=0.0):
    """``center_crop(flip(rotate(images, angles, fill), horizontal, vertical), size)``, one gather.

    A flip after the rotation only negates an output coordinate and a crop only picks the
    output grid, so all three are one inverse affine map per image, sampled bilinearly on
    the (size, size) output grid alone. Separate steps cost ~10x more on CPU: XLA fuses the
    rotation's gathers into every consumer that reads a pixel twice (flip selects, blur taps)
    and recomputes them there. ``horizontal``/``vertical`` None = no flip; ``size`` None = no crop.
    """
    batch, height, width, channels = images.shape
    out_h, out_w = (height, width) if size is None else (int(size), int(size))
    if out_h > height or out_w > width:
        raise ValueError(f"crop {size} larger than image {height}x{width}")
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    top, left = height // 2 - out_h // 2, width // 2 - out_w // 2  # center_crop's window
    # Output-grid offsets from the centre, as (3, P) rows [dy, dx, 1]: static constants.
    dy, dx = np.meshgrid(np.arange(top, top + out_h, dtype=np.float32) - cy,
                         np.arange(left, left + out_w, dtype=np.float32) - cx, indexing="ij")
    basis = np.stack([dy.ravel(), dx.ravel(), np.ones(out_h * out_w, np.float32)])

    angles = jnp.asarray(angles, jnp.float32)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    # A flip negates the offset it acts on (exactly: H-1-y - cy = -(y - cy)).
    sy = jnp.ones_like(cos) if vertical is None else jnp.where(vertical, -1.0, 1.0)
    sx = jnp.ones_like(cos) if horizontal is None else jnp.where(horizontal, -1.0, 1.0)
    # Inverse map: output pixel (y, x) reads the source at R(-angle) (y, x).
    # src_y = cos*dy + sin*dx + cy, src_x = -sin*dy + cos*dx + cx, with flipped offsets.
    coef = jnp.stack([jnp.stack([cos * sy, sin * sx, jnp.full_like(cos, cy)], -1),
                      jnp.stack([-sin * sy, cos * sx, jnp.full_like(cos, cx)], -1)], 1)
    # A dot, not a broadcast: XLA:CPU would otherwise fuse cos/sin into the per-pixel loop and
    # recompute them for every pixel, corner and channel. HIGHEST keeps f32 (no TF32 on GPU).
    src = jnp.einsum("bdk,kp->bdp", coef, basis, precision=jax.lax.Precision.HIGHEST)
    src_y, src_x = src[:, 0], src[:, 1]  # (B, P)

    y0, x0 = jnp.floor(src_y), jnp.floor(src_x)
    wy, wx = src_y - y0, src_x - x0
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    flat = images.reshape(batch, height * width, channels)
    fill = jnp.asarray(fill, images.dtype)

    def corner(yi, xi):
        # One batched gather per corner on the flattened image (partitions along the batch);
        # out-of-range corners give fill.
        inside = (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
        idx = jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
        vals = jnp.take_along_axis(flat, idx[..., None], axis=1)
        return jnp.where(inside[..., None], vals, fill)

    wy, wx = wy[..., None].astype(images.dtype), wx[..., None].astype(images.dtype)
    out = ((1 - wy) * (1 - wx) * corner(y0, x0) + (1 - wy) * wx * corner(y0, x0 + 1)
           + wy * (1 - wx) * corner(y0 + 1, x0) + wy * wx * corner(y0 + 1, x0 + 1))
    return out.reshape(batch, out_h, out_w, channels)


def blur_radius(sigma_max, truncate=4.0):
    """Fixed kernel half-width for sigmas up to ``sigma_max`` (scipy's ``int(t*s + 0.5)``)."""
    return int(truncate * float(sigma_max) + 0.5)


def gaussian_kernels(sigmas, radius):
    """Normalised 1-D Gaussian kernels (B, 2*radius+1), one per sigma; sigma 0 = identity."""
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    # A tiny floor turns sigma = 0 into an exact delta instead of 0/0.
    s = jnp.maximum(jnp.asarray(sigmas, jnp.float32), 1e-6)[:, None]
    k = jnp.exp(-0.5 * jnp.square(offsets[None, :] / s))
    return k / jnp.sum(k, axis=1, keepdims=True)


def _reflect_band(kernels, n, radius):
    """(B, n, n) matrices applying (B, 2r+1) kernels along an axis of length n, reflect-padded.

    Row i holds the taps of output i, with the padding folded in: tap j reads input
    reflect(i + j - r), so no padded copy of the image is ever built.
    """
    src = np.arange(n)[:, None] + np.arange(-radius, radius + 1)[None, :]
    src = np.abs(src)
    src = np.where(src > n - 1, 2 * (n - 1) - src, src)
    onehot = np.zeros((2 * radius + 1, n, n), np.float32)
    for j in range(2 * radius + 1):
        onehot[j, np.arange(n), src[:, j]] = 1.0
    return jnp.einsum("bj,jik->bik", kernels, jnp.asarray(onehot, kernels.dtype),
                      precision=jax.lax.Precision.HIGHEST)


def blur(images, sigmas, radius):
    """Separable Gaussian blur with per-image ``sigmas`` (B,) and a fixed kernel radius.

    Borders are padded by reflection without repeating the edge pixel (numpy 'reflect',
    scipy 'mirror', torch 'reflect' as in torchvision's GaussianBlur); needs radius < H, W.
    """
    if radius == 0:
        return images
    batch, height, width, channels = images.shape
    if radius >= min(height, width):
        raise ValueError(f"blur radius {radius} too large for {height}x{width} images")
    k = gaussian_kernels(sigmas, radius).astype(images.dtype)
    # Along W: one batched matmul (B, C*H, W) x (B, W, W) on channel-first planes, a plain
    # GEMM on CPU. Being a dot, it also materialises its input once: XLA cannot fuse a
    # producer (e.g. the rotation's gathers) into it and recompute it per tap.
    planes = jnp.transpose(images, (0, 3, 1, 2)).reshape(batch, channels * height, width)
    band = _reflect_band(k, width, radius)
    planes = jnp.einsum("bnw,bvw->bnv", planes, band, precision=jax.lax.Precision.HIGHEST)
    planes = planes.reshape(batch, channels, height, width)
    # Along H: 2r+1 shifted adds of whole rows (contiguous in this layout), fused into one
    # pass with the reflect pad and the transpose back to NHWC.
    padded = jnp.pad(planes, ((0, 0), (0, 0), (radius, radius), (0, 0)), mode="reflect")
    out = k[:, 0, None, None, None] * padded[:, :, 0:height]
    for j in range(1, 2 * radius + 1):
        out = out + k[:, j, None, None, None] * padded[:, :, j:j + height]
    return jnp.transpose(out, (0, 2, 3, 1))


def flip(images, horizontal, vertical):
    """Flip images left-right where ``horizontal`` (B,) and top-bottom where ``vertical``."""
    images = jnp.where(horizontal[:, None, None, None], images[:, :, ::-1, :], images)
    return jnp.where(vertical[:, None, None, None], images[:, ::-1, :, :], images)


# ---------------------------------------------------------------- random versions

def _uniform(key, batch, low, high):
    return jax.random.uniform(key, (batch,), jnp.float32, low, high)


def random_rotation(key, images, fill=0.0):
    """Rotate each image by an independent uniform angle in [0, 2 pi)."""
    angles = _uniform(key, images.shape[0], 0.0, 2.0 * math.pi)
    return rotate(images, angles, fill)


def _flip_bits(key, batch):
    kh, kv = jax.random.split(key)
    return jax.random.bernoulli(kh, 0.5, (batch,)), jax.random.bernoulli(kv, 0.5, (batch,))


def random_flips(key, images):
    """Flip each image horizontally and (independently) vertically, each with p = 0.5."""
    return flip(images, *_flip_bits(key, images.shape[0]))


def gaussian_blur(key, images, sigma_range, truncate=4.0):
    """Blur each image with sigma ~ U[sigma_range]; kernel radius fixed by the maximum."""
    low, high = sigma_range
    sigmas = _uniform(key, images.shape[0], low, high)
    return blur(images, sigmas, blur_radius(high, truncate))


def gaussian_noise(key, images, std_range):
    """Add N(0, std^2) noise, std ~ U[std_range] drawn once per image."""
    ks, kn = jax.random.split(key)
    std = _uniform(ks, images.shape[0], *std_range).astype(images.dtype)
    noise = jax.random.normal(kn, images.shape, images.dtype)
    return images + std[:, None, None, None] * noise


def spectrum_noise(key, spectra, spectrum_scale, pixel_std, scale):
    """Add noise of std ``scale * pixel_std`` flux units to normalised spectra (B, L).

    ``pixel_std`` (L,) is a per-pixel flux std on the spectra's grid (the real DESI scatter,
    ``data.shipped_files.pixel_std(grid)``); ``spectrum_scale`` (B,) is the flux per unit of
    the normalised spectra (``data.preprocess.preprocess_batch``), so in normalised units the
    std is ``scale * pixel_std / spectrum_scale``.
    """
    noise = jax.random.normal(key, spectra.shape, spectra.dtype)
    return spectra + spectrum_noise_std(spectra, spectrum_scale, pixel_std, scale) * noise


def spectrum_noise_std(spectra, spectrum_scale, pixel_std, scale):
    """(B, L) std, in the units of the normalised `spectra`, of `scale * pixel_std` flux."""
    if pixel_std.shape[-1] != spectra.shape[-1]:
        raise ValueError(f"pixel_std has {pixel_std.shape[-1]} pixels, the spectra "
                         f"{spectra.shape[-1]}: use the std on the spectra's own grid")
    return (scale * jnp.asarray(pixel_std, spectra.dtype)[None, :]
            / jnp.asarray(spectrum_scale, spectra.dtype)[:, None])


# ---------------------------------------------------------------- composers

def augment_images(key, images, aug: AugmentSettings):
    """Apply the configured image augmentations (order in the module docstring)."""
    k_rot, k_flip, k_blur, k_noise = jax.random.split(key, 4)
    batch, crop = images.shape[0], aug.crop
    if aug.rotation:
        # Rotation, flips and crop as one gather (same draws as the separate steps).
        angles = _uniform(k_rot, batch, 0.0, 2.0 * math.pi)
        horizontal, vertical = _flip_bits(k_flip, batch) if aug.flip else (None, None)
        images = rotate_flip_crop(images, angles, horizontal, vertical, crop or None)
    else:
        if aug.flip:
            images = random_flips(k_flip, images)
        if crop:
            images = center_crop(images, crop)
    if aug.blur_sigma_max > 0:
        images = gaussian_blur(k_blur, images, (0.0, aug.blur_sigma_max))
    if aug.noise_std_max > 0:
        images = gaussian_noise(k_noise, images, (0.0, aug.noise_std_max))
    return images


def augment_spectra(key, spectra, spectrum_scale, pixel_std, aug: AugmentSettings):
    """Apply the configured spectrum augmentation (noise from the real per-pixel flux std)."""
    if aug.spectrum_noise_scale > 0:
        spectra = spectrum_noise(key, spectra, spectrum_scale, pixel_std, aug.spectrum_noise_scale)
    return spectra
