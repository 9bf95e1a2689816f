"""Host preprocessing against slicing, closed forms and hand-computed values of Stein's ToRGB."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astroclip_jax import settings
from astroclip_jax import wavelength_grids as grids
from astroclip_jax.data import preprocess
from configs import spender

DATA = settings.resolve(spender.get_config("smoke")).data


def test_center_crop_is_the_central_slice():
    images = np.random.default_rng(0).normal(size=(2, 152, 152, 3)).astype(np.float32)
    # Stein's CenterCrop: centre 152 // 2 = 76, half-width 48 -> rows and columns 28..123.
    np.testing.assert_array_equal(preprocess.center_crop(images, 96), images[:, 28:124, 28:124])
    odd = np.arange(5 * 5 * 1).reshape(5, 5, 1)
    np.testing.assert_array_equal(preprocess.center_crop(odd, 3), odd[1:4, 1:4])
    nine, ten = images[:1, :9, :9], images[:1, :10, :10]
    np.testing.assert_array_equal(preprocess.center_crop(nine, 4), nine[:, 2:6, 2:6])
    np.testing.assert_array_equal(preprocess.center_crop(ten, 5), ten[:, 3:8, 3:8])
    assert preprocess.center_crop(images, 152) is images  # equal size: the input itself
    with pytest.raises(ValueError, match="cannot crop 200x200 from 152x152"):
        preprocess.center_crop(images, 200)
    with pytest.raises(ValueError, match=r"expects \(\.\.\., H, W, C\) images"):
        preprocess.center_crop(images[0, 0], 2)


def test_center_crop_on_jax_arrays_inside_jit():
    """The same window on the device (the model crops there): traced JAX arrays, jitted."""
    images = np.random.default_rng(1).normal(size=(2, 40, 36, 3)).astype(np.float32)
    crop = jax.jit(preprocess.center_crop, static_argnums=1)
    out = crop(jnp.asarray(images), 16)
    assert isinstance(out, jax.Array) and out.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(out, images[:, 12:28, 10:26])  # 40//2 - 8, 36//2 - 8
    np.testing.assert_array_equal(crop(jnp.asarray(images[:, :16, :16]), 16), images[:, :16, :16])


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
    out, scale = preprocess.zscore_spectra(spectra)
    std = math.sqrt(1.25)
    np.testing.assert_allclose(out[0], [(v - 2.5) / std for v in (1, 2, 3, 4)], rtol=1e-6)
    # std 0.05 < 0.2: divided by 0.2 instead.
    np.testing.assert_allclose(out[1], [-0.25, 0.25, -0.25, 0.25], rtol=1e-6)
    assert out.dtype == np.float32
    # The scale is what the z-score divided by: a flux difference d becomes d / scale.
    np.testing.assert_allclose(scale, [std, 0.2], rtol=1e-6)
    assert scale.dtype == np.float32 and scale.shape == (2,)
    same, ones = preprocess.normalise_spectra(spectra.astype(np.float64), "none")
    assert same.dtype == np.float32 and ones.dtype == np.float32
    np.testing.assert_array_equal(same, spectra)
    np.testing.assert_array_equal(ones, [1.0, 1.0])


def test_preprocess_batch_is_crop_transform_and_zscore():
    """The one host preprocessing, against the slice, the scalar ToRGB and the float64 z-score."""
    rng = np.random.default_rng(2)
    batch = {"image": rng.normal(0.0, 0.3, size=(2, 8, 8, 3)).astype(np.float32),
             "spectrum": rng.normal(3.0, 2.0, size=(2, 50)).astype(np.float32),
             "targetid": np.array([7, 9], np.int64)}
    before = {k: v.copy() for k, v in batch.items()}
    data = dataclasses.replace(DATA, image_crop=4)
    out = preprocess.preprocess_batch(batch, data)
    assert sorted(out) == ["image", "spectrum", "spectrum_scale", "targetid"]
    expected = np.array([_stein_pixel(*map(float, px))
                         for px in batch["image"][:, 2:6, 2:6].reshape(-1, 3)])
    np.testing.assert_allclose(out["image"].reshape(-1, 3), expected, rtol=1e-6, atol=1e-7)
    s = batch["spectrum"].astype(np.float64)
    std = np.maximum(s.std(axis=1), 0.2)
    np.testing.assert_allclose(out["spectrum"], (s - s.mean(axis=1, keepdims=True)) / std[:, None],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["spectrum_scale"], std, rtol=1e-6)
    np.testing.assert_array_equal(out["targetid"], batch["targetid"])
    for k, v in before.items():
        np.testing.assert_array_equal(batch[k], v)  # the input batch is untouched
    # No crop, raw flux, no norm: the image and spectrum pass as float32, scale 1.
    plain = preprocess.preprocess_batch(batch, dataclasses.replace(
        DATA, image_crop=0, image_transform="raw", spectrum_norm="none"))
    np.testing.assert_array_equal(plain["image"], batch["image"])
    np.testing.assert_array_equal(plain["spectrum"], batch["spectrum"])
    np.testing.assert_array_equal(plain["spectrum_scale"], [1.0, 1.0])
    images = preprocess.preprocess_images(batch["image"], data)
    np.testing.assert_array_equal(images, out["image"])
    spectra, scale = preprocess.preprocess_spectra(batch["spectrum"], data)
    np.testing.assert_array_equal(spectra, out["spectrum"])
    np.testing.assert_array_equal(scale, out["spectrum_scale"])


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


def _viewer_rgb_reference(flux_hwc):
    """The Legacy Survey viewer stretch in float64, written from its equations (AstroCLIP's
    ToRGB: channel-first planes, Q = 20, m = 0.03), then AstroCLIP's (0, 3, 2, 1) permute."""
    chw = np.transpose(np.asarray(flux_hwc, np.float64), (2, 0, 1))
    planes = {"g": (2, 6.0), "r": (1, 3.4), "z": (0, 2.2)}
    total = sum(np.maximum(0.0, img * planes[b][1] + 0.03) for img, b in zip(chw, "grz"))
    total = total / 3.0
    f = np.arcsinh(20.0 * total) / np.sqrt(20.0)
    total = total + (total == 0.0) * 1e-6
    rgb = np.zeros(chw.shape[1:] + (3,))
    for img, b in zip(chw, "grz"):
        rgb[:, :, planes[b][0]] = (img * planes[b][1] + 0.03) * f / total
    rgb = np.clip(rgb, 0, 1)  # (H, W, 3)
    tensor = np.transpose(rgb[None], (0, 3, 2, 1))  # the collator's permute: (1, 3, W, H)
    return np.transpose(tensor, (0, 2, 3, 1))[0]  # the NHWC array of that tensor


def test_astroclip_rgb_equals_the_viewer_stretch_and_the_collator_axes():
    rng = np.random.default_rng(3)
    flux = rng.normal(0.02, 0.05, size=(2, 12, 9, 3)).astype(np.float32)  # H != W: axes matter
    flux[0, :2, :2] = -1.0  # I == 0 somewhere: the 1e-6 guard
    ours = preprocess.astroclip_rgb(flux)
    assert ours.shape == (2, 9, 12, 3) and ours.dtype == np.float32
    for i in range(2):
        np.testing.assert_allclose(ours[i], _viewer_rgb_reference(flux[i]), rtol=1e-5, atol=2e-6)
