"""Host-side preprocessing, pure NumPy and vectorised over a batch.

What the frozen towers were trained with:
- images: g, r, z nanomaggie cutouts, centre-cropped to 96x96, then Stein et al.'s ``ToRGB``
  (georgestein/ssl-legacysurvey, ``data_loaders/decals_augmentations.py``);
- spectra: per-spectrum z-score with the standard deviation clipped from below (AstroCLIP v1).
"""

import numpy as np

from astroclip_jax.settings import DataSettings
from astroclip_jax.errors import DataError

# Stein's ToRGB constants. Channel order of the stored cutouts is (g, r, z); ToRGB reorders it
# to (z, r, g) and applies each band's scale.
STEIN_BANDS = ("g", "r", "z")
STEIN_SCALES = {"g": 6.0, "r": 3.4, "z": 2.2}
STEIN_M = 0.03
STEIN_Q = 20.0

IMAGE_TRANSFORMS = ("stein_rgb", "astroclip_rgb", "raw")
# The Legacy Survey viewer's RGB (AstroCLIP's ToRGB, astroclip/astrodino/data/augmentations.py):
# band -> (RGB plane, scale); g, r, z land in planes 2, 1, 0.
VIEWER_PLANES = {"g": (2, 6.0), "r": (1, 3.4), "z": (0, 2.2)}
SPECTRUM_NORMS = ("zscore", "none")
ZSCORE_MIN_STD = 0.2


def center_crop(images, size: int):
    """Central `size` x `size` pixels of (..., H, W, C) images; the input when already that size.

    The window starts at H//2 - size//2, which is what Stein's CenterCrop (JitterCrop without
    jitter) cuts from a 152-pixel cutout: rows 28..123 for size 96. Plain slicing, so it serves
    NumPy arrays on the host and JAX arrays inside jitted code alike.
    """
    if images.ndim < 3:
        raise ValueError(f"center_crop expects (..., H, W, C) images, got shape {images.shape}")
    height, width = images.shape[-3], images.shape[-2]
    if size > height or size > width:
        raise ValueError(f"cannot crop {size}x{size} from {height}x{width} images")
    if size == height and size == width:
        return images
    top = height // 2 - size // 2
    left = width // 2 - size // 2
    return images[..., top:top + size, left:left + size, :]


def stein_rgb(images: np.ndarray, *, scales=STEIN_SCALES, m: float = STEIN_M,
              q: float = STEIN_Q) -> np.ndarray:
    """Stein et al.'s ToRGB of (..., H, W, 3) g, r, z flux images; float32 in [0, 1].

    With x the image reordered to (z, r, g) and s the matching scales (2.2, 3.4, 6.0):
        I   = mean over channels of max(0, x * s + m)
        f   = asinh(Q * I) / sqrt(Q),  I := I + 1e-6 where I == 0
        out = clip(x * (s + m * f / I), 0, 1)
    This is the transform the pretrained MoCo v2 ResNet50 saw (note `x * (s + m f/I)`, not the
    Legacy Survey viewer's `(x s + m) f / I`). Unlike the original it does not modify its input.
    """
    images = np.asarray(images)
    if images.shape[-1] != 3:
        raise ValueError(f"stein_rgb expects 3 bands (g, r, z) last, got shape {images.shape}")
    # float32 throughout (the original mixes in float64; the difference is ~1e-7).
    x = np.asarray(images[..., ::-1], dtype=np.float32)  # (g, r, z) -> (z, r, g)
    s = np.array([scales[b] for b in STEIN_BANDS[::-1]], dtype=np.float32)
    scaled = x * s
    intensity = np.maximum(scaled + np.float32(m), 0.0).sum(axis=-1) / np.float32(3.0)
    qi = np.float32(q) * intensity  # >= 0, so asinh(qi) = log(qi + sqrt(qi^2 + 1)), faster
    stretched = np.log(qi + np.sqrt(qi * qi + 1.0)) / np.float32(np.sqrt(q))
    intensity += (intensity == 0.0) * np.float32(1e-6)
    out = scaled + x * (np.float32(m) * stretched / intensity)[..., None]
    return np.clip(out, 0.0, 1.0, out=out)


def astroclip_rgb(images: np.ndarray, *, m: float = STEIN_M, q: float = STEIN_Q) -> np.ndarray:
    """The released AstroCLIP's image input from (..., H, W, 3) g, r, z flux; float32 in [0, 1].

    The Legacy Survey viewer's stretch, as AstroCLIP's ToRGB computes it (unlike Stein's, which
    the ResNet saw):
        I   = mean over bands of max(0, x_b * s_b + m),  f = asinh(Q I) / sqrt(Q)
        rgb[plane_b] = clip((x_b * s_b + m) * f / I, 0, 1),  I := I + 1e-6 where I == 0
    then the height and width axes swapped: AstroCLIP's collator permutes its (N, H, W, 3)
    batch to (N, 3, W, H), so the NHWC array equal to the tensor its ViT sees is (N, W, H, 3).
    """
    x = np.asarray(images, dtype=np.float32)
    if x.shape[-1] != 3:
        raise ValueError(f"astroclip_rgb expects 3 bands (g, r, z) last, got shape {x.shape}")
    scaled = [x[..., i] * np.float32(VIEWER_PLANES[b][1]) + np.float32(m)
              for i, b in enumerate(STEIN_BANDS)]
    intensity = sum(np.maximum(s, 0.0) for s in scaled) / np.float32(3.0)
    stretched = np.arcsinh(np.float32(q) * intensity) / np.float32(np.sqrt(q))
    intensity = intensity + (intensity == 0.0) * np.float32(1e-6)
    out = np.empty(x.shape, np.float32)
    for s, band in zip(scaled, STEIN_BANDS):
        out[..., VIEWER_PLANES[band][0]] = s * stretched / intensity
    return np.swapaxes(np.clip(out, 0.0, 1.0, out=out), -3, -2)


def transform_images(images: np.ndarray, transform: str) -> np.ndarray:
    """Apply the configured image transform: "stein_rgb", "astroclip_rgb" or "raw" (flux as
    is, float32)."""
    if transform == "stein_rgb":
        return stein_rgb(images)
    if transform == "astroclip_rgb":
        return astroclip_rgb(images)
    if transform == "raw":
        return np.asarray(images, dtype=np.float32)
    raise ValueError(f"unknown image_transform {transform!r}; expected one of {IMAGE_TRANSFORMS}")


def zscore_spectra(spectra: np.ndarray, min_std: float = ZSCORE_MIN_STD
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per-spectrum z-score of (N, L) spectra: ((x - mean) / s, s) with s = max(std, min_std).

    The floor keeps near-empty spectra from being blown up into noise (AstroCLIP v1 clips the std
    at 0.2). The std is the population std (ddof 0), computed in float64. `s` (N,) float32 is
    what a flux difference is divided by, so noise in flux units is noise / s after it.
    """
    spectra = np.asarray(spectra, dtype=np.float64)
    mean = spectra.mean(axis=-1, keepdims=True)
    std = np.maximum(spectra.std(axis=-1, keepdims=True), min_std)
    return ((spectra - mean) / std).astype(np.float32), std[..., 0].astype(np.float32)


def normalise_spectra(spectra: np.ndarray, norm: str) -> tuple[np.ndarray, np.ndarray]:
    """(normalised spectra, flux units per normalised unit (N,)) for "zscore" or "none"."""
    if norm == "zscore":
        return zscore_spectra(spectra)
    if norm == "none":
        spectra = np.asarray(spectra, dtype=np.float32)
        return spectra, np.ones(spectra.shape[:-1], np.float32)
    raise ValueError(f"unknown spectrum_norm {norm!r}; expected one of {SPECTRUM_NORMS}")


# ---------------------------------------------------------------- the one host preprocessing

def preprocess_images(images: np.ndarray, settings: DataSettings) -> np.ndarray:
    """Raw (N, H, W, 3) g, r, z flux -> what the image tower sees: centre crop, then transform."""
    if settings.image_crop:
        images = center_crop(images, settings.image_crop)
    return transform_images(images, settings.image_transform)


def preprocess_spectra(spectra: np.ndarray, settings: DataSettings
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Raw (N, L) flux -> (normalised spectra, their flux scale (N,)); see `normalise_spectra`."""
    return normalise_spectra(spectra, settings.spectrum_norm)


def preprocess_batch(batch: dict, settings: DataSettings) -> dict:
    """The host preprocessing of a stacked batch of raw records, for training, the feature
    cache, evaluation and the notebook alike: `image` cropped and transformed, `spectrum`
    normalised, and `spectrum_scale` added (flux per normalised unit, for flux-unit noise)."""
    out = dict(batch)
    out["image"] = preprocess_images(batch["image"], settings)
    out["spectrum"], out["spectrum_scale"] = preprocess_spectra(batch["spectrum"], settings)
    return out


def check_grid(data_wave: np.ndarray, encoder_wave: np.ndarray, *, rtol: float = 1e-6) -> None:
    """Raise unless the data's wavelength grid is the one the spectrum encoder was trained on.

    A spectrum on the wrong grid still runs through a conv net, silently giving nonsense.
    """
    data_wave = np.asarray(data_wave, dtype=np.float64)
    encoder_wave = np.asarray(encoder_wave, dtype=np.float64)
    if data_wave.shape != encoder_wave.shape:
        raise DataError(
            f"wavelength grid mismatch: data has {data_wave.size} pixels "
            f"({_describe(data_wave)}), the spectrum encoder expects {encoder_wave.size} "
            f"({_describe(encoder_wave)})")
    close = np.isclose(data_wave, encoder_wave, rtol=rtol, atol=0.0)
    if not close.all():
        worst = int(np.flatnonzero(~close)[0])  # the first pixel that differs
        raise DataError(
            f"wavelength grid mismatch at pixel {worst}: data {data_wave[worst]:.4f} A, encoder "
            f"{encoder_wave[worst]:.4f} A (data {_describe(data_wave)}, encoder "
            f"{_describe(encoder_wave)})")


def _describe(wave: np.ndarray) -> str:
    if wave.size == 0:
        return "empty"
    return f"{wave[0]:.2f}..{wave[-1]:.2f} A"
