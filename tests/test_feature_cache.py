"""The frozen-feature cache: exact views, a deterministic sampler, reuse on disk, and a cached
step that equals the online step when the cache holds exactly the online inputs.

Tiny random towers (size "test") on 32x32 images and SDSS-grid spectra; runs on CPU in seconds.
"""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from astroclip_jax import feature_cache as fc
from astroclip_jax import model as model_lib
from astroclip_jax import train_step as train_step_lib
from astroclip_jax.data import grids
from astroclip_jax.models import heads, towers

N, SIZE = 6, 32
L = grids.SDSS_LENGTH


def _config(**augment) -> ml_collections.ConfigDict:
    """The fields model.build and the steps read, at test size, augmentation off by default."""
    return ml_collections.ConfigDict(dict(
        seed=0,
        data=dict(grid="sdss", image_crop=SIZE),
        model=dict(image_tower=dict(weights=None, size="test"),
                   spectrum_tower=dict(weights=None, size="test"),
                   image_head=dict(hidden=(64,), out=32, init_from_tower=False),
                   spectrum_head=dict(hidden=(32, 32), out=32)),
        augment=dict(rotation=False, flip=False, crop=0, blur_sigma_max=0.0, noise_std_max=0.0,
                     spectrum_noise_scale=0.0, **augment),
        train=dict(logit_scale=15.5, learn_logit_scale=False, learning_rate=1e-3, adam_b1=0.9,
                   adam_b2=0.999, adam_eps=1e-8,
                   trainable=(r"image_head/.*", r"spectrum_head/.*")),
        feature_cache=dict(image_draws=1, spectrum_draws=1, dtype="float32", batch_size=4),
    ))


def _random_like(abstract, seed=0):
    """NumPy random variables for an abstract tree (no XLA compile of Flax init): fan-in
    scaled kernels, non-trivial biases, BatchNorm statistics and PReLU slopes."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            return rng.normal(0, 1 / np.sqrt(np.prod(x.shape[:-1])), x.shape).astype(np.float32)
        if name.endswith("['scale']") or name.endswith("['var']"):
            return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        if name.endswith("['negative_slope']"):
            return rng.uniform(-0.5, 0.8, x.shape).astype(np.float32)
        return rng.normal(0, 0.1, x.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


@pytest.fixture(scope="module")
def built():
    """model.AstroCLIP at test size with random towers (eager Flax init of the towers takes
    minutes on a loaded CPU; random NumPy variables of the right shapes take none)."""
    config = _config()
    model = model_lib.AstroCLIP(
        image_tower=towers.build_tower("resnet", {**towers.tower_config("resnet", "test"),
                                                  "head_hidden": None}),
        spectrum_tower=towers.build_tower("spender", towers.tower_config("spender", "test")),
        image_head=heads.MLPHead(hidden=(64,), out=32),
        spectrum_head=heads.MLPHead(hidden=(32, 32), out=32))

    def init(key):
        k = jax.random.split(key, 4)
        return {"image_tower": model.image_tower.init(k[0], jnp.zeros((1, SIZE, SIZE, 3))),
                "spectrum_tower": model.spectrum_tower.init(k[1], jnp.zeros((1, L)), features_only=True),
                "image_head": model.image_head.init(k[2], jnp.zeros((1, 256))),
                "spectrum_head": model.spectrum_head.init(k[3], jnp.zeros((1, 16)))}

    return config, model, _random_like(jax.eval_shape(init, jax.random.key(0)))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return {"image": rng.uniform(0, 1, (N, SIZE, SIZE, 3)).astype(np.float32),
            "spectrum": rng.normal(1, 0.5, (N, L)).astype(np.float32)}


SPEC = fc.ViewSpec(dihedral=True, image_draws=2, spectrum_draws=3, blur_sigma_max=1.0,
                   noise_std_max=0.1, spectrum_noise_scale=0.5, dtype="float32", seed=3)


def _features(built, data, spec, batch_size=4):
    _, model, params = built
    fns, variables = fc.model_towers(model, params)
    std = np.full((L,), 0.3, np.float32)
    return fc.compute_features(fns, variables, fc.ArraySource(data), spec, std, batch_size)


@pytest.fixture(scope="module")
def feats(built, data):
    return _features(built, data, SPEC)


def _np_dihedral(images, d):
    out = np.rot90(images, d % 4, axes=(1, 2))
    return out[:, :, ::-1, :] if d >= 4 else out


def test_view0_is_the_towers_on_clean_inputs(built, data, feats):
    _, model, params = built
    assert feats["image"].shape == (16, N, 32 * 8) and feats["spectrum"].shape == (3, N, 16)
    img, spec = jax.jit(model.tower_features)(params, data["image"], data["spectrum"])
    np.testing.assert_allclose(feats["image"][0], img, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats["spectrum"][0], spec, rtol=1e-5, atol=1e-5)
    # Noisy views really differ, and do not depend on the batch size used to build them.
    assert np.abs(feats["image"][8] - feats["image"][0]).max() > 1e-3
    assert np.abs(feats["spectrum"][1] - feats["spectrum"][0]).max() > 1e-3
    again = _features(built, data, SPEC, batch_size=5)
    for k in feats:
        np.testing.assert_allclose(feats[k], again[k], rtol=1e-5, atol=1e-5)


def test_dihedral_views_are_exact_rot90_and_flips(built, data, feats):
    _, model, params = built
    images = jnp.asarray(data["image"])
    index = jnp.arange(N)
    seen = set()
    view_fn = jax.jit(lambda x, d: fc.image_view(x, d, index, SPEC, jax.random.key(0)))
    for d in range(8):
        view = np.asarray(view_fn(images, d))
        np.testing.assert_array_equal(view, _np_dihedral(data["image"], d))  # exact, no interpolation
        seen.add(view.tobytes())
    assert len(seen) == 8
    image_features = jax.jit(model.image_features)
    for d in (1, 5):
        want = image_features(params, _np_dihedral(data["image"], d).copy())
        np.testing.assert_allclose(feats["image"][d], want, rtol=1e-5, atol=1e-5)


def _tagged_cache():
    """Cache whose entries encode (view, galaxy): value = 1000 * view + galaxy."""
    vi, n = np.meshgrid(np.arange(5), np.arange(40), indexing="ij")
    vs, ns = np.meshgrid(np.arange(3), np.arange(40), indexing="ij")
    return fc.FeatureCache(image=np.repeat((1000 * vi + n)[..., None], 2, -1).astype(np.float32),
                           spectrum=np.repeat((1000 * vs + ns)[..., None], 4, -1).astype(np.float32))


def test_sampler_is_deterministic_and_picks_valid_views():
    cache = _tagged_cache()
    idx = np.array([3, 17, 3, 39, 0, 21, 8, 8])
    a = fc.sample_cached_features(jax.random.key(1), cache, idx)
    b = fc.sample_cached_features(jax.random.key(1), cache, idx)
    c = fc.sample_cached_features(jax.random.key(2), cache, idx)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))
    for feats, n_views in ((a[0], 5), (a[1], 3)):
        view, galaxy = np.divmod(feats[:, 0].astype(int), 1000)
        np.testing.assert_array_equal(galaxy, idx)
        assert ((view >= 0) & (view < n_views)).all()
    # Over many draws every view shows up; the device (jnp) path picks the same views.
    views = np.concatenate([fc.sample_cached_features(jax.random.key(k), cache, idx)[0][:, 0] // 1000
                            for k in range(30)])
    assert set(views.astype(int)) == set(range(5))
    dev = jax.jit(fc.sample_cached_features)(jax.random.key(1), cache.to_device(), jnp.asarray(idx))
    for x, y in zip(a, dev):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_build_or_load_writes_once_and_reuses(built, data, tmp_path):
    _, model, params = built
    fns, variables = fc.model_towers(model, params)
    spec = fc.ViewSpec(dihedral=True, image_draws=1, spectrum_draws=1, dtype="float16")
    cache = fc.build_or_load_cache(spec, str(tmp_path), fns, variables, data, log=None)
    assert cache.image.dtype == np.float16 and cache.image.shape == (8, N, 256)
    assert [p for p in os.listdir(tmp_path)] == [os.path.basename(cache.path)]  # no temp left

    def boom(v, x):
        raise AssertionError("towers must not run again")

    again = fc.build_or_load_cache(spec, str(tmp_path), {"image": boom, "spectrum": boom}, variables,
                                   data, log=None)
    assert again.path == cache.path
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(cache.image))
    # Other tower weights, other data or another spec: another fingerprint.
    other_vars = jax.tree.map(lambda x: x + 1, variables)
    fp = fc.fingerprint(variables, fc.ArraySource(data), spec)
    assert fc.fingerprint(other_vars, fc.ArraySource(data), spec) != fp
    assert fc.fingerprint(variables, fc.ArraySource({**data, "image": data["image"] * 2}), spec) != fp
    assert fc.fingerprint(variables, fc.ArraySource(data), fc.ViewSpec(seed=1)) != fp


def test_cached_step_equals_online_step_without_augmentation(built, data, tmp_path):
    config, model, params = built
    trainable, frozen = model_lib.partition(params, model_lib.trainable_patterns(config))
    state = train_step_lib.init_state(config, trainable, jax.random.key_data(jax.random.key(7)))
    online = jax.jit(train_step_lib.make_train_step(model, config))
    cached = jax.jit(fc.make_cached_train_step(model, config))
    fns, variables = fc.model_towers(model, params)
    cache = fc.build_or_load_cache(config, str(tmp_path), fns, variables, data, log=None)
    assert cache.image.shape[0] == 1 and cache.spectrum.shape[0] == 1  # one view: no augmentation

    s_on, s_ca = state, state
    for step in range(2):
        idx = np.array([0, 2, 4, 5]) if step == 0 else np.array([1, 3, 2, 0])
        s_on, m_on = online(s_on, frozen, {"image": data["image"][idx], "spectrum": data["spectrum"][idx]})
        img_f, spec_f = fc.sample_cached_features(fc.sampling_key(state.rng, step), cache, idx)
        s_ca, m_ca = cached(s_ca, frozen, {"image_features": img_f, "spectrum_features": spec_f})
        np.testing.assert_allclose(m_ca["loss"], m_on["loss"], rtol=1e-5)
        np.testing.assert_allclose(m_ca["grad_norm"], m_on["grad_norm"], rtol=1e-4)
    chex.assert_trees_all_close(s_ca.params, s_on.params, rtol=1e-4, atol=1e-6)
    assert int(s_ca.step) == 2

    # The device-resident variant samples inside the step and gives the same update.
    dev = jax.jit(fc.make_device_cached_train_step(model, config))
    arrays = {"image": jnp.asarray(cache.image), "spectrum": jnp.asarray(cache.spectrum)}
    s_dev, m_dev = dev(state, frozen, arrays, jnp.array([0, 2, 4, 5]))
    _, m_on = online(state, frozen, {"image": data["image"][[0, 2, 4, 5]],
                                     "spectrum": data["spectrum"][[0, 2, 4, 5]]})
    np.testing.assert_allclose(m_dev["loss"], m_on["loss"], rtol=1e-5)
