"""Host preprocessing against slicing, closed forms and hand-computed values of Stein's ToRGB."""

import math

import numpy as np
import pytest

from astroclip_jax.data import grids, preprocess


def test_center_crop_is_the_central_slice():
    images = np.random.default_rng(0).normal(size=(2, 152, 152, 3)).astype(np.float32)
    # Stein's CenterCrop: centre 152 // 2 = 76, half-width 48 -> rows and columns 28..123.
    np.testing.assert_array_equal(preprocess.center_crop(images, 96), images[:, 28:124, 28:124])
    odd = np.arange(5 * 5 * 1).reshape(5, 5, 1)
    np.testing.assert_array_equal(preprocess.center_crop(odd, 3), odd[1:4, 1:4])
    with pytest.raises(ValueError, match="cannot crop 200x200 from 152x152"):
        preprocess.center_crop(images, 200)


def _stein_pixel(g, r, z):
    """Stein's ToRGB for one pixel, written out with scalars (math module only)."""
    x = (z, r, g)
    s = (2.2, 3.4, 6.0)
    m, q = 0.03, 20.0
    i = sum(max(0.0, xi * si + m) for xi, si in zip(x, s)) / 3.0
    f = math.asinh(q * i) / math.sqrt(q)
    if i == 0.0:
        i = 1e-6
    return tuple(min(1.0, max(0.0, xi * (si + m * f / i))) for xi, si in zip(x, s))


def test_stein_rgb_hand_computed_pixel():
    # g, r, z = 0.1, 0.2, 0.3 nanomaggies. By hand: x s + m = (0.69, 0.71, 0.63), I = 0.676667,
    # asinh(13.5333) / sqrt(20) = 3.299665 / 4.472136 = 0.737828, f / I = 1.090386;
    # out = (0.3 (2.2 + 0.032712), 0.2 (3.4 + 0.032712), 0.1 (6.0 + 0.032712)).
    image = np.array([0.1, 0.2, 0.3], np.float32).reshape(1, 1, 3)
    out = preprocess.stein_rgb(image)
    np.testing.assert_allclose(out[0, 0], [0.669813, 0.686542, 0.603271], atol=2e-6)
    np.testing.assert_allclose(out[0, 0], _stein_pixel(0.1, 0.2, 0.3), rtol=1e-6)


def test_stein_rgb_matches_scalar_transcription_and_edge_cases():
    rng = np.random.default_rng(1)
    images = rng.normal(0.0, 0.3, size=(2, 4, 5, 3)).astype(np.float32)
    images[0, 0, 0] = 0.0          # I = m: output 0
    images[0, 0, 1] = -1.0         # I = 0 -> 1e-6, negative output clipped to 0
    images[0, 0, 2] = [5, 5, 5]    # saturates at 1
    out = preprocess.stein_rgb(images)
    assert out.dtype == np.float32 and out.shape == images.shape
    expected = np.array([_stein_pixel(*map(float, px)) for px in images.reshape(-1, 3)])
    np.testing.assert_allclose(out.reshape(-1, 3), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out[0, 0, 0], 0.0)
    np.testing.assert_array_equal(out[0, 0, 1], 0.0)
    np.testing.assert_array_equal(out[0, 0, 2], 1.0)
    before = images.copy()
    preprocess.stein_rgb(images)
    np.testing.assert_array_equal(images, before)  # pure: the input is untouched


def test_zscore_closed_form_and_std_floor():
    spectra = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.1, 0.0, 0.1]], np.float32)
    out = preprocess.zscore_spectra(spectra)
    std = math.sqrt(1.25)
    np.testing.assert_allclose(out[0], [(v - 2.5) / std for v in (1, 2, 3, 4)], rtol=1e-6)
    # std 0.05 < 0.2: divided by 0.2 instead.
    np.testing.assert_allclose(out[1], [-0.25, 0.25, -0.25, 0.25], rtol=1e-6)
    assert out.dtype == np.float32


def test_transform_and_norm_dispatch():
    images = np.ones((1, 2, 2, 3), np.float64)
    assert preprocess.transform_images(images, "raw").dtype == np.float32
    with pytest.raises(ValueError, match="unknown image_transform 'rgb'"):
        preprocess.transform_images(images, "rgb")
    with pytest.raises(ValueError, match="unknown spectrum_norm 'max'"):
        preprocess.normalise_spectra(np.ones((1, 3)), "max")


def test_check_grid():
    preprocess.check_grid(grids.desi_wave(), np.linspace(3600.0, 9824.0, 7781))
    with pytest.raises(ValueError, match="data has 3921 pixels .* expects 7781"):
        preprocess.check_grid(grids.sdss_wave(), grids.desi_wave())
    with pytest.raises(ValueError, match="mismatch at pixel 0"):
        preprocess.check_grid(grids.desi_wave() + 2.0, grids.desi_wave())
