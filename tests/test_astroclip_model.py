"""The released AstroCLIP's architecture in the one AstroCLIP model (configs/astroclip.py): token
towers, cross-attention heads, heads loaded from a converted directory, a batch of one."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from astroclip_jax import settings as settings_lib
from astroclip_jax.errors import ConfigError
from astroclip_jax.models import astroclip, heads, tower_weights, towers
from configs import astroclip as astroclip_config

SETTINGS = settings_lib.resolve(astroclip_config.get_config("smoke"))


@pytest.fixture(scope="module")
def built():
    return astroclip.build(SETTINGS.model, jax.random.PRNGKey(0))


def _inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    size, length = SETTINGS.model.image_size, SETTINGS.model.spectrum_length
    images = rng.uniform(0, 1, size=(n, size, size, 3)).astype(np.float32)
    spectra = (2 + rng.normal(size=(n, length))).astype(np.float32)  # flux-like
    return images, spectra


def test_token_towers_feed_cross_attention_heads(built):
    model, params = built
    images, spectra = _inputs(2)
    img_tokens, spec_tokens = model.tower_features(params, images, spectra)
    size = SETTINGS.model.image_size
    assert img_tokens.shape[:2] == (2, (size // 12) ** 2)  # patches, no CLS token
    assert spec_tokens.shape[:2] == (2, 778)  # SpecFormer's tokens of 7781 pixels
    assert isinstance(model.image_head, heads.CrossAttentionHead)
    assert model.image_head.residual is False and model.spectrum_head.residual is True
    img, spec = model.embed(params, images, spectra)
    assert img.shape == spec.shape == (2, SETTINGS.model.image_head.out)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(img), axis=1), 1.0, rtol=1e-5)
    # The table's per-galaxy tower features: the token mean.
    np.testing.assert_allclose(np.asarray(towers.pooled(img_tokens)),
                               np.asarray(img_tokens).mean(axis=1), rtol=1e-6)


def test_a_batch_of_one_equals_its_row_in_a_batch_of_eight(built):
    """Upstream's heads crash on one galaxy; here each row equals its row in a batch of 8."""
    model, params = built
    images, spectra = _inputs(8, seed=1)
    embed = jax.jit(model.embed)
    img8, spec8 = map(np.asarray, embed(params, images, spectra))
    for i in (0, 5):
        img1, spec1 = map(np.asarray, embed(params, images[i:i + 1], spectra[i:i + 1]))
        assert img1.shape == (1, img8.shape[1])
        np.testing.assert_allclose(img1[0], img8[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(spec1[0], spec8[i], rtol=1e-5, atol=1e-6)


def _heads_dir(path, params, scale=1.0):
    variables = {"params": {name: jax.tree.map(lambda x: np.asarray(x) * scale,
                                               params[name]["params"])
                            for name in ("image_head", "spectrum_head")}}
    return tower_weights.save_tower(path, astroclip.HEADS_KIND, {"note": "test"}, variables)


def test_heads_start_from_a_converted_heads_directory(built, tmp_path):
    _, params = built
    path = _heads_dir(tmp_path / "heads", params, scale=0.5)  # other values than the init
    model_settings = dataclasses.replace(SETTINGS.model, heads_weights=path)
    _, loaded = astroclip.build(model_settings, jax.random.PRNGKey(0))
    for name in ("image_head", "spectrum_head"):
        got = jax.tree.leaves(loaded[name]["params"])
        want = [np.asarray(x) * 0.5 for x in jax.tree.leaves(params[name]["params"])]
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), w)


def test_converted_heads_of_another_shape_are_named(built, tmp_path):
    _, params = built
    path = _heads_dir(tmp_path / "heads", params)
    wider = dataclasses.replace(SETTINGS.model.image_head, out=64, hidden=(128,))
    model_settings = dataclasses.replace(SETTINGS.model, heads_weights=path, image_head=wider)
    with pytest.raises(ConfigError, match="model.heads_weights: .*image_head"):
        astroclip.build(model_settings, jax.random.PRNGKey(0))


@pytest.mark.parametrize("field, value, needle", [
    ("num_heads", 3, "divisor of model.image_head.out"),
    ("hidden", (48,), "multiple of model.image_head.out"),
    ("residual", True, None),  # allowed on either side of a cross-attention model
])
def test_cross_attention_head_rules(field, value, needle):
    config = astroclip_config.get_config("smoke")
    config.model.image_head[field] = value
    if needle is None:
        settings_lib.resolve(config)
        return
    with pytest.raises(ConfigError, match=needle):
        settings_lib.resolve(config)
