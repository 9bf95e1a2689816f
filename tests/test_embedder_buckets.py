"""The notebook Embedder (evaluation/restore.py) pads its inputs to a few bucket sizes: any N
gives the rows that embedding one galaxy at a time gives, N = 0 gives (0, D), and the jitted
functions compile once per bucket, not once per N.

The model is built from the smoke settings (no checkpoint needed), with heads of different
widths (24 and 16) so that a mixed-up modality shows in the shapes.
"""

import dataclasses

import jax
import numpy as np
import pytest

from astroclip_jax import settings as settings_lib
from astroclip_jax.evaluation import restore
from astroclip_jax.models import astroclip
from configs import spender

D_IMAGE, D_SPECTRUM = 24, 16
RAW_SIZE = 40  # raw cutouts larger than the host crop (32)
N_MAX = 300


@pytest.fixture(scope="module")
def embedder():
    config = spender.get_config("smoke")
    settings = settings_lib.resolve(config)
    model_settings = dataclasses.replace(
        settings.model, image_head=dataclasses.replace(settings.model.image_head, out=D_IMAGE),
        spectrum_head=dataclasses.replace(settings.model.spectrum_head, out=D_SPECTRUM))
    settings = dataclasses.replace(settings, model=model_settings)
    model, params = astroclip.build(settings.model, jax.random.PRNGKey(0))
    trained = restore.TrainedModel(settings=settings, config=config, model=model, params=params,
                                   initial_params=params, step=0, checkpoint_dir="")
    return restore.Embedder(trained)


@pytest.fixture(scope="module")
def raw():
    rng = np.random.default_rng(0)
    length = settings_lib.resolve(spender.get_config("smoke")).model.spectrum_length
    return {"image": rng.gamma(2.0, 0.05, (N_MAX, RAW_SIZE, RAW_SIZE, 3)).astype(np.float32),
            "spectrum": rng.normal(1.0, 0.3, (N_MAX, length)).astype(np.float32)}


@pytest.fixture(scope="module")
def one_at_a_time(embedder, raw):
    """Each galaxy embedded on its own (one padded call each)."""
    return {"image": np.concatenate([embedder.embed_images(raw["image"][i:i + 1])
                                     for i in range(N_MAX)]),
            "spectrum": np.concatenate([embedder.embed_spectra(raw["spectrum"][i:i + 1])
                                        for i in range(N_MAX)])}


def test_no_galaxies_give_zero_rows_of_each_width(embedder, raw):
    images = embedder.embed_images(raw["image"][:0])
    spectra = embedder.embed_spectra(raw["spectrum"][:0])
    assert images.shape == (0, D_IMAGE) and images.dtype == np.float32
    assert spectra.shape == (0, D_SPECTRUM) and spectra.dtype == np.float32


def test_one_galaxy_equals_the_model_on_its_unpadded_inputs(embedder, raw, one_at_a_time):
    """Padding must not leak into a row: one galaxy (padded to 8 rows) gives what the model
    gives on that galaxy alone, preprocessed as in training."""
    model, params = embedder.model, embedder.params
    image = embedder.preprocess_images(raw["image"][:1])
    spectrum = embedder.preprocess_spectra(raw["spectrum"][:1])
    assert image.shape == (1, 32, 32, 3) and spectrum.shape == (1, raw["spectrum"].shape[1])
    np.testing.assert_allclose(one_at_a_time["image"][:1],
                               jax.jit(model.embed_images)(params, image), rtol=0, atol=1e-6)
    np.testing.assert_allclose(one_at_a_time["spectrum"][:1],
                               jax.jit(model.embed_spectra)(params, spectrum), rtol=0, atol=1e-6)
    # A single (H, W, 3) image or (L,) spectrum is one galaxy.
    np.testing.assert_array_equal(embedder.embed_images(raw["image"][0]),
                                  one_at_a_time["image"][:1])
    np.testing.assert_array_equal(embedder.embed_spectra(raw["spectrum"][0]),
                                  one_at_a_time["spectrum"][:1])
    np.testing.assert_allclose(np.linalg.norm(one_at_a_time["image"], axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 3, 9, N_MAX])
def test_any_number_of_galaxies_gives_the_one_at_a_time_rows(embedder, raw, one_at_a_time, n):
    # N = 9 pads to 32 rows; N = 300 runs as 256 rows + 44 rows padded to 128. XLA's CPU
    # kernels tile their reductions by batch shape: rows of unit vectors agree to float32
    # rounding, not bitwise (measured <= 3.2e-7; a padding row leaking into the others would
    # move them by ~1e-1).
    np.testing.assert_allclose(embedder.embed_images(raw["image"][:n]), one_at_a_time["image"][:n],
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(embedder.embed_spectra(raw["spectrum"][:n]),
                               one_at_a_time["spectrum"][:n], rtol=0, atol=1e-6)


def test_compiles_once_per_bucket_for_any_n(embedder, raw):
    sizes = [0, 1, 2, 5, 7, 8, 9, 17, 31, 32, 33, 64, 100, 127, 128, 129, 200, 255, 256, 257,
             N_MAX]
    for n in sizes:
        assert embedder.embed_images(raw["image"][:n]).shape == (n, D_IMAGE)
        assert embedder.embed_spectra(raw["spectrum"][:n]).shape == (n, D_SPECTRUM)
        assert embedder._image_fn._cache_size() <= 4, n
        assert embedder._spectrum_fn._cache_size() <= 4, n
    # Every bucket (8, 32, 128, 256) was used, each compiled exactly once.
    assert embedder._image_fn._cache_size() == embedder._spectrum_fn._cache_size() == 4
    # More than one largest bucket's worth: several calls, still no new program.
    many = np.concatenate([raw["image"]] * 2)
    assert embedder.embed_images(many).shape == (2 * N_MAX, D_IMAGE)
    assert embedder._image_fn._cache_size() == 4
