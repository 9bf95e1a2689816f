"""Stein et al.'s MoCo augmentations on the device, each against an independent computation:
scipy.ndimage (affine map, Gaussian filter), NumPy slicing and formulas, and the host ToRGB."""

import jax
import numpy as np
import pytest
from scipy import ndimage

from astroclip_jax.data import preprocess
from astroclip_jax.training import moco_augment as ma


def _images(n=3, size=48, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, (n, size, size, 3)).astype(np.float32)


def test_reddening_is_stein_s_transmission_ratio():
    x = _images()
    old, new = np.array([0.01, 0.2, 0.05]), np.array([0.5, 0.0, 0.9])
    exps = np.array([-1.2856, -0.866, -0.4844])
    want = x / 10 ** (old[:, None] * exps)[:, None, None, :] * 10 ** (new[:, None] * exps)[:, None, None, :]
    got = ma.redden(x, old.astype(np.float32), new.astype(np.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_flip_rotate_scale_is_scipy_affine_transform():
    x = _images(n=4, size=33)
    angles = np.array([0.3, 2.0, 4.4, np.pi / 2], np.float32)
    flip_rows, flip_cols = np.array([0, 1, 0, 0], bool), np.array([1, 1, 0, 0], bool)
    scales = np.array([0.9, 1.07, 1.0, 1.0], np.float32)
    m = np.asarray(ma.affine_matrices(angles, flip_rows, flip_cols, scales))
    got = np.asarray(ma.warp(x, m))
    centre = np.array([16.0, 16.0])
    for b in range(4):
        for c in range(3):
            want = ndimage.affine_transform(x[b, ..., c].astype(np.float64), m[b],
                                            offset=centre - m[b] @ centre, order=1,
                                            mode="grid-constant", cval=0.0)
            np.testing.assert_allclose(got[b, ..., c], want, rtol=1e-5, atol=1e-5)
    # a quarter turn without zoom moves pixels exactly (np.rot90, one of its two senses)
    assert any(np.allclose(got[3], np.rot90(x[3], k, axes=(0, 1)), atol=1e-5) for k in (1, 3))


def test_band_blur_is_scipy_gaussian_filter_reflect():
    x = _images(n=2, size=48)
    sigmas = np.array([[0.0, 1.3, 4.9], [2.2, 0.4, 3.1]], np.float32)
    got = np.asarray(ma.blur_bands(x, sigmas))
    for b in range(2):
        for c in range(3):
            want = ndimage.gaussian_filter(x[b, ..., c].astype(np.float64), float(sigmas[b, c]),
                                           mode="reflect", truncate=4.0)
            np.testing.assert_allclose(got[b, ..., c], want, rtol=1e-5, atol=1e-6)


def test_jitter_crop_is_the_shifted_centre_window():
    x = _images(n=2, size=40)
    shifts = np.array([[-3, 2], [4, -4]], np.int32)
    got = np.asarray(ma.jitter_crop(x, shifts, 24))
    for b, (dy, dx) in enumerate(shifts):
        top, left = 20 + dy - 12, 20 + dx - 12
        np.testing.assert_array_equal(got[b], x[b, top:top + 24, left:left + 24])


def test_noise_and_blur_add_in_quadrature():
    true, final = np.array([[0.01, 0.02, 0.03]]), np.array([[0.02, 0.01, 0.05]])
    want = np.sqrt(np.maximum(final ** 2 - true ** 2, 0))
    np.testing.assert_allclose(np.asarray(ma.added_sigma(true, final)), want, rtol=1e-6)
    assert float(ma.added_sigma(true, final)[0, 1]) == 0.0  # already noisier: nothing added


def test_to_rgb_matches_the_host_transform():
    x = (_images(n=2, size=16) - 0.2) * 0.5  # negative flux too
    np.testing.assert_allclose(np.asarray(ma.to_rgb(x)), preprocess.stein_rgb(x),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size,crop", [(64, 32)])
def test_views_are_independent_draws_in_range(size, crop):
    x = _images(n=2, size=size) * 0.05  # nanomaggie-like fluxes
    view = jax.jit(lambda k, im: ma.view(k, im, ma.MocoAugment(size=crop)))
    a, b = np.asarray(view(jax.random.PRNGKey(0), x)), np.asarray(view(jax.random.PRNGKey(1), x))
    assert a.shape == (2, crop, crop, 3) and 0 <= a.min() and a.max() <= 1
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, np.asarray(view(jax.random.PRNGKey(0), x)))
