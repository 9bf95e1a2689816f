"""The fixed augmented views that the feature cache runs the frozen towers over.

Views (all deterministic given `ViewSpec.seed` and the galaxy's index in the data source):
  image view v:    dihedral element d = v % 8 of the square crop (rot90^(d % 4), then a left-right
                   flip if d >= 4: exact pixel permutations, no interpolation), and draw r = v // 8:
                   r = 0 is clean, r > 0 adds a Gaussian blur (sigma ~ U[0, blur_sigma_max]) and
                   noise (std ~ U[0, noise_std_max]), as `augment.augment_images` does online.
                   View 0 is the un-augmented image.
  spectrum view v: v = 0 is the clean spectrum, v > 0 adds noise of `spectrum_noise_scale *
                   pixel_std` flux units, as `augment.augment_spectra` does online.
Only 8 rotations are cached instead of a continuous angle: the price of exact, cheap views.
Pure JAX, jittable; `view` may be traced (one compiled program for every view).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from astroclip_jax.data.preprocess import center_crop
from astroclip_jax.settings import AugmentSettings, FeatureCacheSettings
from astroclip_jax.training import augment

N_DIHEDRAL = 8


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """Which augmented views are cached.

    Attributes:
      crop: centre-crop size applied before the views (0 = images are already square crops).
      dihedral: cache the 8 rotations/flips (True) or only the identity (False).
      image_draws: blur + noise draws per dihedral element; draw 0 is clean.
      spectrum_draws: spectrum views; view 0 is clean, the others add pixel-std noise.
      blur_sigma_max, noise_std_max, spectrum_noise_scale: as in `augment` (0 = off).
      dtype: storage dtype of the features ("float16" halves the size; "float32" exact).
      seed: seed of the random draws.
    """

    crop: int
    dihedral: bool
    image_draws: int
    spectrum_draws: int
    blur_sigma_max: float
    noise_std_max: float
    spectrum_noise_scale: float
    dtype: str
    seed: int

    @property
    def n_image_views(self) -> int:
        return (N_DIHEDRAL if self.dihedral else 1) * self.image_draws

    @property
    def n_spectrum_views(self) -> int:
        return self.spectrum_draws


def view_spec(augment_settings: AugmentSettings, cache: FeatureCacheSettings,
              seed: int) -> ViewSpec:
    """The cached views of a run: draws and dtype from the cache settings, strengths from the
    online augmentation (so the cached views follow it)."""
    aug = augment_settings
    return ViewSpec(
        crop=aug.crop,
        dihedral=aug.rotation or aug.flip,
        # Without a random blur/noise every draw would be the same view: keep one.
        image_draws=cache.image_draws if (aug.blur_sigma_max or aug.noise_std_max) else 1,
        spectrum_draws=cache.spectrum_draws if aug.spectrum_noise_scale else 1,
        blur_sigma_max=aug.blur_sigma_max,
        noise_std_max=aug.noise_std_max,
        spectrum_noise_scale=aug.spectrum_noise_scale,
        dtype=cache.dtype,
        seed=seed,
    )


# ---------------------------------------------------------------- the views (pure, jittable)


def dihedral(images: jax.Array, d) -> jax.Array:
    """Element d (0..7, may be traced) of the dihedral group on square (B, H, W, C) images:
    rot90 counter-clockwise (d % 4) times, then a left-right flip when d >= 4."""
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"dihedral views need square images, got {images.shape[1:3]}")
    branches = [(lambda x, k=k, f=f: _rot_flip(x, k, f)) for f in (False, True) for k in range(4)]
    return jax.lax.switch(d, branches, images)


def _rot_flip(images, k, flip):
    out = jnp.rot90(images, k, axes=(1, 2))
    return out[:, :, ::-1, :] if flip else out


def _galaxy_keys(base: jax.Array, view, index: jax.Array) -> jax.Array:
    """One key per galaxy: fold in the view, then the galaxy's global index (batch-size free)."""
    k = jax.random.fold_in(base, view)
    return jax.vmap(lambda i: jax.random.fold_in(k, i))(index)


def image_view(images: jax.Array, view, index: jax.Array, views: ViewSpec,
               base_key: jax.Array) -> jax.Array:
    """Image view `view` (may be traced) of a batch whose global indices are `index` (B,)."""
    if views.crop:
        images = center_crop(images, views.crop)
    n_dihedral = N_DIHEDRAL if views.dihedral else 1
    d, draw = view % n_dihedral, view // n_dihedral
    images = dihedral(images, d) if views.dihedral else images
    if views.blur_sigma_max <= 0 and views.noise_std_max <= 0:
        return images
    keys = _galaxy_keys(base_key, view, index)
    split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
    kb, kn, ks = split[:, 0], split[:, 1], split[:, 2]
    noisy = images
    if views.blur_sigma_max > 0:
        sigmas = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, 0.0, views.blur_sigma_max))(kb)
        noisy = augment.blur(noisy, sigmas, augment.blur_radius(views.blur_sigma_max))
    if views.noise_std_max > 0:
        std = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, 0.0, views.noise_std_max))(ks)
        noise = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:], images.dtype))(kn)
        noisy = noisy + std[:, None, None, None].astype(images.dtype) * noise
    return jnp.where(draw == 0, images, noisy)  # draw 0 stays clean


def spectrum_view(spectra: jax.Array, spectrum_scale: jax.Array, view, index: jax.Array,
                  views: ViewSpec, base_key: jax.Array, pixel_std: jax.Array | None) -> jax.Array:
    """Spectrum view `view` (may be traced): 0 clean, else flux-unit pixel-std noise."""
    if views.spectrum_noise_scale <= 0:
        return spectra
    keys = _galaxy_keys(jax.random.fold_in(base_key, 1), view, index)
    noise = jax.vmap(lambda k: jax.random.normal(k, spectra.shape[1:], spectra.dtype))(keys)
    std = augment.spectrum_noise_std(spectra, spectrum_scale, pixel_std, views.spectrum_noise_scale)
    return jnp.where(view == 0, spectra, spectra + std * noise)


