"""The frozen-feature cache: exact views, flux-unit spectrum noise, a deterministic sampler,
reuse on disk, and cached steps (device-sampled and host-gathered) that equal the online step
when the cache holds exactly the online inputs.

Tiny random towers (size "test") on 32x32 images and SDSS-grid spectra; runs on CPU in seconds.
"""

from __future__ import annotations

import dataclasses
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astroclip_jax import settings as settings_lib
from astroclip_jax.models import astroclip, partition
from astroclip_jax.training import cached_views, feature_store, optimizer, steps
from astroclip_jax.training.cached_views import ViewSpec
from astroclip_jax.training.feature_store import FeatureCache
from astroclip_jax.wavelength_grids import SDSS_LENGTH as L
from configs import spender

N, SIZE = 6, 32
PIXEL_STD = np.full((L,), 0.3, np.float32)


def _settings() -> settings_lib.RunSettings:
    """The smoke settings on the SDSS grid, every augmentation off, a float32 cache."""
    config = spender.get_config("smoke")
    config.data.grid = "sdss"
    s = settings_lib.resolve(config)
    aug = dataclasses.replace(s.augment, rotation=False, flip=False, crop=0, blur_sigma_max=0.0,
                              noise_std_max=0.0, spectrum_noise_scale=0.0)
    cache = dataclasses.replace(s.feature_cache, image_draws=1, spectrum_draws=1,
                                dtype="float32", batch_size=4)
    train = dataclasses.replace(s.train, learning_rate=1e-3)
    return dataclasses.replace(s, augment=aug, feature_cache=cache, train=train)


def _random_like(abstract, seed=0):
    """NumPy random variables for an abstract tree: fan-in scaled kernels, non-trivial biases,
    BatchNorm statistics and PReLU slopes (the default init's constants would hide a view or
    a statistic applied wrongly)."""
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
    """models.astroclip at test size, its towers' variables replaced by `_random_like` ones."""
    s = _settings()
    model, params = astroclip.build(s.model, jax.random.PRNGKey(0))
    for seed, name in enumerate(("image_tower", "spectrum_tower")):
        params[name] = _random_like(params[name], seed)
    return s, model, params


class ArrayRecords:
    """In-memory `feature_store.Records`: rows of preprocessed arrays."""

    def __init__(self, arrays):
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays["image"])

    def batch(self, indices):
        return {k: v[np.asarray(indices)] for k, v in self.arrays.items()}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return {"image": rng.uniform(0, 1, (N, SIZE, SIZE, 3)).astype(np.float32),
            "spectrum": rng.normal(1, 0.5, (N, L)).astype(np.float32),
            "spectrum_scale": rng.uniform(0.5, 2.0, N).astype(np.float32)}


SPEC = ViewSpec(crop=0, dihedral=True, image_draws=2, spectrum_draws=3, blur_sigma_max=1.0,
                noise_std_max=0.1, spectrum_noise_scale=0.5, dtype="float32", seed=3)


def _towers(params):
    return {"image_tower": params["image_tower"], "spectrum_tower": params["spectrum_tower"]}


def _features(built, data, spec, batch_size=4):
    _, model, params = built
    out = {"image": np.zeros((spec.n_image_views, N, 256), np.float32),
           "spectrum": np.zeros((spec.n_spectrum_views, N, 16), np.float32)}
    feature_store.compute_features(model, _towers(params), ArrayRecords(data), spec, PIXEL_STD,
                                   batch_size, out, progress=False)
    return out


@pytest.fixture(scope="module")
def feats(built, data):
    return _features(built, data, SPEC)


def _np_dihedral(images, d):
    out = np.rot90(images, d % 4, axes=(1, 2))
    return out[:, :, ::-1, :] if d >= 4 else out


def test_view0_is_the_towers_on_clean_inputs(built, data, feats):
    _, model, params = built
    assert SPEC.n_image_views == 16 and SPEC.n_spectrum_views == 3
    img, spec = jax.jit(model.tower_features)(params, data["image"], data["spectrum"])
    assert img.shape == (N, 32 * 8) and spec.shape == (N, 16)
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
    view_fn = jax.jit(lambda x, d: cached_views.image_view(x, d, index, SPEC, jax.random.key(0)))
    for d in range(8):
        view = np.asarray(view_fn(images, d))
        np.testing.assert_array_equal(view, _np_dihedral(data["image"], d))  # exact, no interpolation
        seen.add(view.tobytes())
    assert len(seen) == 8
    image_features = jax.jit(model.image_features)
    for d in (1, 5):
        want = image_features(params, _np_dihedral(data["image"], d).copy())
        np.testing.assert_allclose(feats["image"][d], want, rtol=1e-5, atol=1e-5)


def test_spectrum_views_add_noise_in_flux_units(data):
    """View v > 0 adds spectrum_noise_scale * pixel_std of FLUX: in the normalised units of the
    cached spectra that is divided by each spectrum's scale. So (view - clean) * scale /
    (noise_scale * pixel_std) must be standard normal, for every galaxy whatever its scale."""
    spectra, scale = jnp.asarray(data["spectrum"]), jnp.asarray(data["spectrum_scale"])
    view_fn = jax.jit(lambda v: cached_views.spectrum_view(
        spectra, scale, v, jnp.arange(N), SPEC, jax.random.key(SPEC.seed), jnp.asarray(PIXEL_STD)))
    np.testing.assert_array_equal(view_fn(0), data["spectrum"])  # view 0 is clean
    for v in (1, 2):
        z = ((np.asarray(view_fn(v), np.float64) - data["spectrum"])
             * data["spectrum_scale"][:, None] / (SPEC.spectrum_noise_scale * PIXEL_STD))
        # L = 3921 draws per galaxy: the std of a sample std is ~1 / sqrt(2 L) = 0.011.
        np.testing.assert_allclose(z.std(axis=1), 1.0, atol=0.06)
        assert np.abs(z.mean(axis=1)).max() < 0.08  # ~5 standard errors of 1 / sqrt(L)
    assert not np.array_equal(view_fn(1), view_fn(2))


def _tagged_cache():
    """Cache whose entries encode (view, galaxy): value = 1000 * view + galaxy."""
    vi, n = np.meshgrid(np.arange(5), np.arange(40), indexing="ij")
    vs, ns = np.meshgrid(np.arange(3), np.arange(40), indexing="ij")
    return FeatureCache(image=np.repeat((1000 * vi + n)[..., None], 2, -1).astype(np.float32),
                        spectrum=np.repeat((1000 * vs + ns)[..., None], 4, -1).astype(np.float32))


def test_sampler_is_deterministic_and_picks_valid_views():
    cache = _tagged_cache()
    sample = feature_store.sample_cached_features
    idx = np.array([3, 17, 3, 39, 0, 21, 8, 8])
    a = sample(jax.random.key(1), cache, idx)
    b = sample(jax.random.key(1), cache, idx)
    c = sample(jax.random.key(2), cache, idx)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))
    for feats, n_views in ((a[0], 5), (a[1], 3)):
        view, galaxy = np.divmod(feats[:, 0].astype(int), 1000)
        np.testing.assert_array_equal(galaxy, idx)
        assert ((view >= 0) & (view < n_views)).all()
    # Over many draws every view shows up; the device (jnp) path picks the same views.
    views = np.concatenate([sample(jax.random.key(k), cache, idx)[0][:, 0] // 1000
                            for k in range(30)])
    assert set(views.astype(int)) == set(range(5))
    dev = jax.jit(sample)(jax.random.key(1), cache.to_device(), jnp.asarray(idx))
    for x, y in zip(a, dev):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_build_or_load_writes_once_and_reuses(built, data, tmp_path, monkeypatch):
    _, model, params = built
    spec = dataclasses.replace(SPEC, image_draws=1, spectrum_draws=1, blur_sigma_max=0.0,
                               noise_std_max=0.0, spectrum_noise_scale=0.0, dtype="float16")
    records = ArrayRecords(data)
    cache = feature_store.build_or_load_cache(model, params, records, spec, str(tmp_path), 4,
                                              None, log=None)
    assert cache.image.dtype == np.float16 and cache.image.shape == (8, N, 256)
    assert cache.spectrum.shape == (1, N, 16)
    # No temporary left beside the cache (only the builders' lock file, which stays).
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".lock-")] == [
        os.path.basename(cache.path)]
    # What was written is the towers' features (float16-rounded): view 0 clean.
    img, spec_f = jax.jit(model.tower_features)(params, data["image"], data["spectrum"])
    np.testing.assert_allclose(np.asarray(cache.image[0], np.float32), img, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(np.asarray(cache.spectrum[0], np.float32), spec_f, rtol=2e-3,
                               atol=2e-3)

    def boom(*args, **kwargs):
        raise AssertionError("towers must not run again")

    monkeypatch.setattr(feature_store, "compute_features", boom)
    again = feature_store.build_or_load_cache(model, params, records, spec, str(tmp_path), 4,
                                              None, log=None)
    assert again.path == cache.path
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(cache.image))
    # Other tower weights, other data or another spec: another fingerprint.
    towers = _towers(params)
    fp = feature_store.fingerprint(towers, records, spec, None)
    other = jax.tree.map(lambda x: x + 1, towers)
    assert feature_store.fingerprint(other, records, spec, None) != fp
    brighter = ArrayRecords({**data, "image": data["image"] * 2})
    assert feature_store.fingerprint(towers, brighter, spec, None) != fp
    assert feature_store.fingerprint(towers, records, dataclasses.replace(spec, seed=1),
                                     None) != fp
    # With spectrum noise the views depend on the pixel std and the spectra's flux scale too.
    noisy = dataclasses.replace(spec, spectrum_draws=2, spectrum_noise_scale=0.5)
    fp_noisy = feature_store.fingerprint(towers, records, noisy, PIXEL_STD)
    assert feature_store.fingerprint(towers, records, noisy, 2 * PIXEL_STD) != fp_noisy
    rescaled = ArrayRecords({**data, "spectrum_scale": 2 * data["spectrum_scale"]})
    assert feature_store.fingerprint(towers, rescaled, noisy, PIXEL_STD) != fp_noisy


def test_cached_steps_equal_online_step_without_augmentation(built, data, tmp_path):
    s, model, params = built
    trainable, frozen = partition.partition(params, s.train.trainable)
    tx = optimizer.make_optimizer(s.train)
    state = optimizer.init_state(tx, trainable, jax.random.key_data(jax.random.key(7)))
    online = jax.jit(steps.make_online_train_step(model, tx, s.augment, None))
    on_device = jax.jit(steps.make_cached_train_step(model, tx))
    gathered = jax.jit(steps.make_features_train_step(model, tx))
    spec = cached_views.view_spec(s.augment, s.feature_cache, s.seed)
    cache = feature_store.build_or_load_cache(model, frozen, ArrayRecords(data), spec,
                                              str(tmp_path), s.feature_cache.batch_size, None,
                                              log=None)
    assert cache.image.shape[0] == 1 and cache.spectrum.shape[0] == 1  # one view: no augmentation
    device_cache = cache.to_device()

    s_on, s_dev, s_host = state, state, state
    for step in range(2):
        idx = np.array([0, 2, 4, 5]) if step == 0 else np.array([1, 3, 2, 0])
        s_on, m_on = online(s_on, frozen, {k: data[k][idx] for k in data})
        s_dev, m_dev = on_device(s_dev, frozen, device_cache, jnp.asarray(idx))
        img_f, spec_f = feature_store.sample_cached_features(
            steps.step_key(state.rng, step, steps.CACHED_VIEW_STREAM), cache, idx)
        s_host, m_host = gathered(s_host, frozen, {"image_features": img_f,
                                                   "spectrum_features": spec_f})
        for m in (m_dev, m_host):
            np.testing.assert_allclose(m["loss"], m_on["loss"], rtol=1e-5)
            np.testing.assert_allclose(m["grad_norm"], m_on["grad_norm"], rtol=1e-4)
    for s_cached in (s_dev, s_host):
        chex.assert_trees_all_close(s_cached.params, s_on.params, rtol=1e-4, atol=1e-6)
        assert int(s_cached.step) == 2


def test_host_gathered_views_are_the_device_sampled_ones(built, data, feats):
    """With several views per galaxy, the host path (`feature_cache.on_device=False`) gathers,
    with `step_key(rng, step, CACHED_VIEW_STREAM)`, the views the device step samples."""
    s, model, params = built
    trainable, frozen = partition.partition(params, s.train.trainable)
    tx = optimizer.make_optimizer(s.train)
    state = optimizer.init_state(tx, trainable, jax.random.key_data(jax.random.key(7)))
    cache = FeatureCache(image=feats["image"], spectrum=feats["spectrum"])
    idx = np.array([5, 1, 4, 0])
    _, m_dev = jax.jit(steps.make_cached_train_step(model, tx))(state, frozen, cache.to_device(),
                                                               jnp.asarray(idx))
    img_f, spec_f = feature_store.sample_cached_features(
        steps.step_key(state.rng, 0, steps.CACHED_VIEW_STREAM), cache, idx)
    _, m_host = jax.jit(steps.make_features_train_step(model, tx))(
        state, frozen, {"image_features": img_f, "spectrum_features": spec_f})
    np.testing.assert_allclose(m_host["loss"], m_dev["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_host["grad_norm"], m_dev["grad_norm"], rtol=1e-6)
    # ... and another step's key picks other views (a different loss).
    img_f1, spec_f1 = feature_store.sample_cached_features(
        steps.step_key(state.rng, 1, steps.CACHED_VIEW_STREAM), cache, idx)
    assert not (np.array_equal(img_f1, img_f) and np.array_equal(spec_f1, spec_f))
