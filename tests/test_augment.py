"""Augmentations against NumPy/SciPy references and their statistical contracts."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from astroclip_jax import settings
from astroclip_jax.data import shipped_files
from astroclip_jax.data.preprocess import center_crop
from astroclip_jax.training import augment
from configs import spender

KEY = jax.random.PRNGKey(0)
# Jitted once here: eager dispatch compiles every primitive separately and is far slower.
rotate = jax.jit(augment.rotate)
blur = jax.jit(augment.blur, static_argnums=2)
gaussian_blur = jax.jit(augment.gaussian_blur, static_argnums=2)
gaussian_noise = jax.jit(augment.gaussian_noise)  # std_range may be traced
augment_images = jax.jit(augment.augment_images, static_argnums=2)  # settings are hashable

# Augmentation settings: the smoke config's, with every step switched as each test needs.
OFF = dataclasses.replace(settings.resolve(spender.get_config("smoke")).augment, rotation=False,
                          flip=False, crop=0, blur_sigma_max=0.0, noise_std_max=0.0,
                          spectrum_noise_scale=0.0)
CFG = dataclasses.replace(OFF, rotation=True, flip=True, crop=12, blur_sigma_max=1.0,
                          noise_std_max=0.1, spectrum_noise_scale=1.0)


def _images(batch=3, size=16, channels=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, size, size, channels)).astype(np.float32)


def test_rotate_quarter_turns_match_rot90():
    images = _images()
    for k in (1, 2, 3):
        out = rotate(images, jnp.full((3,), k * math.pi / 2))
        # float32 cos(pi/2) is ~4e-8, so coordinates are off by <1e-6 pixel
        np.testing.assert_allclose(out, np.rot90(images, k, axes=(1, 2)), atol=1e-4)


def test_rotate_zero_is_identity_and_angles_are_per_image():
    images = _images()
    np.testing.assert_array_equal(rotate(images, jnp.zeros(3)), images)
    out = rotate(images, jnp.array([0.0, math.pi / 2, math.pi]))
    np.testing.assert_allclose(out[0], images[0], atol=1e-6)
    np.testing.assert_allclose(out[1], np.rot90(images[1]), atol=1e-4)
    np.testing.assert_allclose(out[2], np.rot90(images[2], 2), atol=1e-4)


def test_rotate_matches_scipy_bilinear_at_arbitrary_angle():
    images = _images(batch=1, size=15, channels=1)
    angle = 0.7
    out = np.asarray(rotate(images, jnp.array([angle]), 0.0))[0, ..., 0]
    # Independent inverse map: scipy map_coordinates, order 1, constant 0 outside.
    c = (15 - 1) / 2
    yy, xx = np.meshgrid(np.arange(15) - c, np.arange(15) - c, indexing="ij")
    src = [np.cos(angle) * yy + np.sin(angle) * xx + c, -np.sin(angle) * yy + np.cos(angle) * xx + c]
    ref = scipy.ndimage.map_coordinates(images[0, ..., 0].astype(np.float64), src, order=1,
                                        mode="constant", cval=0.0)
    inner = (np.abs(src[0] - c) < c - 1) & (np.abs(src[1] - c) < c - 1)  # away from the edge rule
    np.testing.assert_allclose(out[inner], ref[inner], atol=1e-5)


def test_random_rotation_keeps_a_centred_disc_and_fills_corners():
    size = 21
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disc = (np.hypot(yy, xx) < 5).astype(np.float32)
    images = np.broadcast_to(disc[None, :, :, None], (4, size, size, 1)).copy()
    out = np.asarray(jax.jit(augment.random_rotation)(KEY, images))
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), disc.sum(), rtol=0.05)
    ones = np.ones((4, size, size, 1), np.float32)
    filled = np.asarray(augment.random_rotation(KEY, ones, fill=-1.0))
    assert (filled[:, 0, 0, 0] < 1).any()  # a corner reads outside for a non-right angle


def test_flips_match_np_flip():
    images = _images(batch=4)
    h = jnp.array([True, False, True, False])
    v = jnp.array([True, True, False, False])
    out = np.asarray(augment.flip(images, h, v))
    np.testing.assert_array_equal(out[0], np.flip(images[0], (0, 1)))
    np.testing.assert_array_equal(out[1], np.flip(images[1], 0))
    np.testing.assert_array_equal(out[2], np.flip(images[2], 1))
    np.testing.assert_array_equal(out[3], images[3])


def test_random_flips_are_each_about_half():
    images = np.broadcast_to(np.arange(4, dtype=np.float32).reshape(1, 2, 2, 1), (2000, 2, 2, 1))
    out = np.asarray(jax.jit(augment.random_flips)(KEY, images))[..., 0]
    horizontal = out[:, 0, 0] % 2 == 1  # top-left now holds a right-column pixel
    vertical = out[:, 0, 0] >= 2  # top-left now holds a bottom-row pixel
    assert abs(horizontal.mean() - 0.5) < 0.05 and abs(vertical.mean() - 0.5) < 0.05
    assert abs((horizontal & vertical).mean() - 0.25) < 0.05  # independent


def test_blur_matches_scipy_gaussian_filter():
    images = _images(batch=3, size=20, channels=2)
    sigmas = np.array([0.0, 0.8, 2.0], np.float32)
    radius = augment.blur_radius(2.0)
    out = np.asarray(blur(images, sigmas, radius))
    np.testing.assert_allclose(out[0], images[0], atol=1e-6)  # sigma 0 is the identity
    for b in (1, 2):
        for c in range(2):
            # same fixed kernel radius; 'mirror' is numpy/torch 'reflect'
            ref = scipy.ndimage.gaussian_filter(images[b, ..., c].astype(np.float64), sigmas[b],
                                                mode="mirror", radius=radius)
            np.testing.assert_allclose(out[b, ..., c], ref, atol=1e-5)


def test_blur_conserves_flux_of_centred_source():
    size = 33
    images = np.zeros((2, size, size, 1), np.float32)
    images[:, size // 2, size // 2] = 1.0
    out = np.asarray(gaussian_blur(KEY, images, (0.5, 2.0)))
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), 1.0, rtol=1e-5)
    assert (out[:, size // 2, size // 2, 0] < 0.9).all()


def test_gaussian_noise_std_statistics():
    images = np.zeros((400, 16, 16, 1), np.float32)
    out = np.asarray(gaussian_noise(KEY, images, (0.3, 0.3)))
    assert abs(out.mean()) < 0.01 and abs(out.std() - 0.3) < 0.003
    # std ~ U[0, 1] per image: per-image stds spread uniformly, mean 0.5
    out = np.asarray(gaussian_noise(KEY, images, (0.0, 1.0)))
    per_image = out.std(axis=(1, 2, 3))
    assert per_image.min() < 0.1 and per_image.max() > 0.9
    assert abs(per_image.mean() - 0.5) < 0.05


def test_spectrum_noise_uses_pixel_std_in_flux_units():
    """Noise of 2 x pixel_std flux on z-scored spectra: divided by each row's flux scale."""
    pixel_std = shipped_files.pixel_std("desi")
    assert pixel_std.shape == (7781,) and np.all(pixel_std > 0)
    spectra = np.ones((500, 7781), np.float32)
    scale = np.tile(np.float32([1.0, 4.0]), 250)  # flux per normalised unit, per row
    out = np.asarray(jax.jit(augment.spectrum_noise)(KEY, spectra, scale, pixel_std, 2.0))
    z = (out - 1.0) * scale[:, None] / (2.0 * pixel_std)
    for rows in (scale == 1.0, scale == 4.0):  # 1.9 M draws each: std error of the std 5e-4
        assert abs(z[rows].mean()) < 0.01 and abs(z[rows].std() - 1.0) < 0.01
    # In normalised units the rows of 4x the flux got 4x less noise.
    ratio = (out[scale == 1.0] - 1.0).std() / (out[scale == 4.0] - 1.0).std()
    assert ratio == pytest.approx(4.0, rel=0.01)


def test_composer_deterministic_per_key_and_jittable():
    images = _images(batch=2, size=16)
    run = jax.jit(lambda k, x: augment.augment_images(k, x, CFG))
    a, b = run(KEY, images), run(KEY, images)
    c = run(jax.random.PRNGKey(1), images)
    assert a.shape == (2, 12, 12, 2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_composer_disabled_steps_are_noops():
    images = _images(batch=2, size=16)
    np.testing.assert_array_equal(augment_images(KEY, images, OFF), images)
    only_crop = np.asarray(augment_images(KEY, images, dataclasses.replace(OFF, crop=8)))
    np.testing.assert_array_equal(only_crop, images[:, 4:12, 4:12])
    only_flip = np.asarray(augment_images(KEY, images, dataclasses.replace(OFF, flip=True)))
    k_flip = jax.random.split(KEY, 4)[1]  # the composer's key split
    np.testing.assert_array_equal(only_flip, augment.random_flips(k_flip, images))
    spectra = np.ones((2, 7781), np.float32)
    scale = np.ones(2, np.float32)
    std = shipped_files.pixel_std("desi")
    np.testing.assert_array_equal(augment.augment_spectra(KEY, spectra, scale, std, OFF), spectra)
    noisy = jax.jit(lambda k, s: augment.augment_spectra(k, s, scale, std, CFG))(KEY, spectra)
    assert np.abs(np.asarray(noisy) - 1.0).max() > 0


def test_crop_after_rotation_removes_filled_corners():
    images = np.ones((8, 24, 24, 1), np.float32)
    cfg = dataclasses.replace(OFF, rotation=True, crop=16)  # 16 sqrt(2) / 2 < 12: inside the disc
    out = np.asarray(augment_images(KEY, images, cfg))
    np.testing.assert_allclose(out, 1.0, atol=1e-5)


def test_rotate_flip_crop_equals_the_separate_steps():
    images = _images(batch=4, size=20, channels=2)
    angles = jnp.array([0.3, 1.9, 4.0, 5.5])
    h = jnp.array([True, False, True, False])
    v = jnp.array([True, True, False, False])
    fused = jax.jit(augment.rotate_flip_crop, static_argnums=4)(images, angles, h, v, 13)
    steps = center_crop(augment.flip(rotate(images, angles), h, v), 13)
    # same inverse map; float32 coordinates rounded in a different order (<1e-5 pixel)
    np.testing.assert_allclose(fused, steps, atol=1e-4)


def test_composer_equals_the_separate_steps():
    images = _images(batch=4, size=20, channels=2)
    cfg = dataclasses.replace(OFF, rotation=True, flip=True, crop=14, blur_sigma_max=1.5)
    out = augment_images(KEY, images, cfg)
    k_rot, k_flip, k_blur, _ = jax.random.split(KEY, 4)  # the composer's key split
    ref = augment.random_flips(k_flip, augment.random_rotation(k_rot, images))
    ref = augment.gaussian_blur(k_blur, center_crop(ref, 14), (0.0, 1.5))
    np.testing.assert_allclose(out, ref, atol=1e-4)
