"""The AstroCLIP model: head sizes against the paper, the embeddings against the towers, the
head MLP and the L2 normalisation written out in NumPy float64, the trainable/frozen
partition, the gradient touching only trainable parameters, weight loading from tower
directories."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astroclip_jax import settings as settings_lib
from astroclip_jax import wavelength_grids
from astroclip_jax.models import astroclip, heads, partition, resnet, tower_weights, towers
from astroclip_jax.models import spender as spender_model
from astroclip_jax.training import optimizer, steps
from configs import spender

SETTINGS = settings_lib.resolve(spender.get_config("smoke"))


def _batch(n=4, seed=0, size=None):
    """Random inputs of the smoke model: (n, size, size, 3) images (default: the towers' size),
    (n, L) spectra and a unit flux scale."""
    rng = np.random.default_rng(seed)
    size = size or SETTINGS.model.image_size
    return {"image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
            "spectrum": rng.normal(size=(n, SETTINGS.model.spectrum_length)).astype(np.float32),
            "spectrum_scale": np.ones(n, np.float32)}


@pytest.fixture(scope="module")
def built():
    return astroclip.build(SETTINGS.model, jax.random.PRNGKey(0))


def test_head_parameter_counts_match_the_paper():
    # Paper: 230,272 trainable spectrum-head parameters; 4.5 M for the image head
    # (2048*2048 + 2048 + 2048*128 + 128 = 4,458,624).
    spec = heads.MLPHead(hidden=(256, 256, 256), out=128)
    img = heads.MLPHead(hidden=(2048,), out=128)
    spec_params = jax.eval_shape(spec.init, jax.random.PRNGKey(0), jnp.zeros((1, 256)))
    img_params = jax.eval_shape(img.init, jax.random.PRNGKey(0), jnp.zeros((1, 2048)))
    assert heads.num_params(spec_params) == 230_272
    assert heads.num_params(img_params) == 4_458_624
    assert sorted(img_params["params"]) == ["fc_0", "fc_2"]  # the MoCo head's names


# ---------------------------------------------------------------- the embeddings, independently


def _head_float64(head_params, x, n_hidden):
    """The head in NumPy float64: (Dense -> ReLU) per hidden layer `fc_0, fc_2, ...`, then a
    linear Dense, then x / max(||x||, 1e-3) (torch F.normalize, eps 1e-3, as upstream)."""
    x = np.asarray(x, np.float64)
    for i in range(n_hidden + 1):
        layer = head_params["params"][f"fc_{2 * i}"]
        x = x @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
        if i < n_hidden:
            x = np.maximum(x, 0.0)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-3)


def _tower_features(params, images, spectra):
    """Tower features from modules built here from the named sizes (not the model's own
    modules): the ResNet without its MoCo head, Spender's encoder up to its attention."""
    image_tower = resnet.ResNet(**{**resnet.SIZES["test"], "head_hidden": None})
    spectrum_tower = spender_model.SpectrumEncoder(**spender_model.SIZES["test"])
    image_features = jax.jit(image_tower.apply)(params["image_tower"], images)["features"]
    spectrum_features = jax.jit(lambda v, s: spender_model.features(spectrum_tower, v, s))(
        params["spectrum_tower"], spectra)
    return np.asarray(image_features), np.asarray(spectrum_features)


def test_embeddings_match_towers_and_float64_heads(built):
    """embed_images (with its device-side centre crop of larger images), embed_spectra and
    heads_from_features against the towers applied directly and the heads in float64."""
    model, params = built
    ms = SETTINGS.model
    size = ms.image_size
    big = _batch(n=5, seed=1, size=size + 8)  # 40 px: the model must cut rows/cols 4..35
    centre = big["image"][:, 4:4 + size, 4:4 + size]
    img_f, spec_f = _tower_features(params, centre, big["spectrum"])
    assert img_f.shape == (5, resnet.feature_dim(resnet.SIZES["test"]["width"]))
    assert spec_f.shape == (5, spender_model.SIZES["test"]["filters"][-1] // 2)
    want_img = _head_float64(params["image_head"], img_f, len(ms.image_head.hidden))
    want_spec = _head_float64(params["spectrum_head"], spec_f, len(ms.spectrum_head.hidden))

    got_img = np.asarray(jax.jit(model.embed_images)(params, big["image"]))
    got_spec = np.asarray(jax.jit(model.embed_spectra)(params, big["spectrum"]))
    assert got_img.shape == got_spec.shape == (5, ms.image_head.out)
    np.testing.assert_allclose(got_img, want_img, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_spec, want_spec, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got_img, axis=-1), 1.0, rtol=1e-5)

    # The heads alone, on features that are not the towers' (another spread and sign mix).
    rng = np.random.default_rng(2)
    feats = (rng.normal(0.0, 3.0, img_f.shape).astype(np.float32),
             rng.normal(0.0, 3.0, spec_f.shape).astype(np.float32))
    head_img, head_spec = jax.jit(model.heads_from_features)(params, *feats)
    np.testing.assert_allclose(head_img, _head_float64(params["image_head"], feats[0], 1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head_spec, _head_float64(params["spectrum_head"], feats[1], 2),
                               rtol=1e-5, atol=1e-6)


def test_device_crop_sees_only_the_central_window(built):
    """Pixels outside the centre window of a larger image change nothing; inside they do."""
    model, params = built
    size = SETTINGS.model.image_size
    images = _batch(n=2, seed=3, size=size + 6)["image"]  # 38 px: window rows/cols 3..34
    embed = jax.jit(model.embed_images)
    base = np.asarray(embed(params, images))
    outside = images.copy()
    outside[:, :3] = 50.0
    outside[:, :, size + 3:] = -50.0
    np.testing.assert_array_equal(embed(params, outside), base)
    inside = images.copy()
    inside[:, 3, 3] = 50.0  # the window's corner pixel
    assert np.abs(np.asarray(embed(params, inside)) - base).max() > 1e-4
    # At the towers' size there is nothing to cut: the same as the already-cut window.
    np.testing.assert_array_equal(embed(params, images[:, 3:3 + size, 3:3 + size]), base)


# ---------------------------------------------------------------- partition and logit scale


def test_default_partition_trains_only_the_heads(built):
    _, params = built
    trainable, frozen = partition.partition(params, SETTINGS.train.trainable)
    assert sorted(trainable) == ["image_head", "spectrum_head"]
    assert sorted(frozen) == ["image_tower", "spectrum_tower"]
    merged = partition.merge(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    # The image tower carries no MoCo head (it moved to the image head) and Spender no MLP.
    assert "fc_0" not in params["image_tower"]["params"]
    assert not any(k.startswith("mlp_") for k in params["spectrum_tower"]["params"])


def test_learned_logit_scale_is_trainable_and_starts_at_the_config_value(built):
    model, params = built
    assert "logit_scale" not in params and float(model.scale(params)) == 15.5  # fixed
    config = spender.get_config("smoke")
    config.train.learn_logit_scale = True
    learned = settings_lib.resolve(config)
    assert learned.train.trainable == SETTINGS.train.trainable + (r"logit_scale/.*",)
    model, params = astroclip.build(learned.model, jax.random.PRNGKey(0))
    trainable, _ = partition.partition(params, learned.train.trainable)
    assert sorted(trainable) == ["image_head", "logit_scale", "spectrum_head"]
    assert float(model.scale(params)) == pytest.approx(15.5, rel=1e-6)
    doubled = {**params, "logit_scale": {"log_scale": params["logit_scale"]["log_scale"]
                                         + np.log(2.0)}}
    assert float(model.scale(doubled)) == pytest.approx(31.0, rel=1e-6)  # exp of the parameter


def test_batch_stats_never_trainable_and_typos_raise(built):
    _, params = built
    trainable, frozen = partition.partition(params, (r"image_tower/.*",))
    assert "batch_stats" not in trainable["image_tower"]
    assert "batch_stats" in frozen["image_tower"]
    with pytest.raises(ValueError, match="matches no parameter"):
        partition.partition(params, (r"image_haed/.*",))


def _count(jaxpr, name):
    """Number of `name` primitives in a closed jaxpr, sub-jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for sub in jax.core.jaxprs_in_params(eqn.params):
            total += _count(sub, name)
    return total


@pytest.mark.parametrize("towers_train", [False, True])
def test_no_gradient_is_formed_for_frozen_towers(built, towers_train):
    # Independent of the code's own bookkeeping: count convolutions in the traced train
    # step. Frozen towers run forward only (as many convs as one forward pass); trainable
    # towers add the backward convs (input and kernel gradients).
    model, params = built
    train = SETTINGS.train
    if towers_train:
        train = dataclasses.replace(train, trainable=train.trainable + (
            r"image_tower/.*", r"spectrum_tower/.*"))
    trainable, frozen = partition.partition(params, train.trainable)
    tx = optimizer.make_optimizer(train)
    state = optimizer.init_state(tx, trainable, jax.random.PRNGKey(1))
    batch = _batch()
    step = steps.make_online_train_step(model, tx, SETTINGS.augment, None)
    step_jaxpr = jax.make_jaxpr(step)(state, frozen, batch).jaxpr
    forward_jaxpr = jax.make_jaxpr(model.embed)(params, batch["image"], batch["spectrum"]).jaxpr
    n_step, n_fwd = _count(step_jaxpr, "conv_general_dilated"), _count(forward_jaxpr,
                                                                       "conv_general_dilated")
    assert n_fwd > 0
    if towers_train:
        assert n_step > n_fwd
        assert sorted(state.params) == sorted(params)
    else:
        assert n_step == n_fwd
        # The optimiser holds moments for the heads only.
        mu = state.opt_state.inner_state[0].mu
        assert sorted(mu) == ["image_head", "spectrum_head"]


# ---------------------------------------------------------------- converted tower directories


def _save(tmp_path, kind, size, variables, extras=None):
    path = str(tmp_path / kind)
    tower_weights.save_tower(path, kind, towers.tower_config(kind, size),
                             jax.tree.map(np.asarray, variables), extras=extras)
    return path


def _with_weights(model_settings, **changes):
    """Model settings with some tower/head sub-settings replaced (field=dict of changes)."""
    return dataclasses.replace(model_settings, **{
        name: dataclasses.replace(getattr(model_settings, name), **fields)
        for name, fields in changes.items()})


def test_image_head_starts_from_the_tower_moco_head(built, tmp_path):
    # A converted-weights directory: the built tower plus a MoCo head of the "test" size.
    _, params = built
    cfg = towers.tower_config("resnet", "test")
    feat = params["image_head"]["params"]["fc_0"]["kernel"].shape[0]
    rng = np.random.default_rng(0)
    moco = {"fc_0": {"kernel": rng.normal(size=(feat, cfg["head_hidden"])),
                     "bias": rng.normal(size=(cfg["head_hidden"],))},
            "fc_2": {"kernel": rng.normal(size=(cfg["head_hidden"], cfg["head_out"])),
                     "bias": rng.normal(size=(cfg["head_out"],))}}
    moco = jax.tree.map(lambda x: x.astype(np.float32), moco)
    tower = {"params": {**params["image_tower"]["params"], **moco},
             "batch_stats": params["image_tower"]["batch_stats"]}
    assert SETTINGS.model.image_head.init_from_tower
    model_settings = _with_weights(
        SETTINGS.model,
        image_tower={"weights": _save(tmp_path, "resnet", "test", tower)},
        # (the spectrum tower from disk too: nothing to initialise, a fast test)
        spectrum_tower={"weights": _save(tmp_path, "spender", "test", params["spectrum_tower"])},
        image_head={"hidden": (cfg["head_hidden"],), "out": cfg["head_out"]})
    _, loaded = astroclip.build(model_settings, jax.random.PRNGKey(0))
    jax.tree.map(np.testing.assert_array_equal, loaded["image_head"]["params"], moco)
    jax.tree.map(np.testing.assert_array_equal, loaded["image_tower"], params["image_tower"])
    jax.tree.map(np.testing.assert_array_equal, loaded["spectrum_tower"], params["spectrum_tower"])
    bad = _with_weights(model_settings, image_head={"hidden": (7,)})  # cannot take the MoCo head
    with pytest.raises(ValueError, match="MoCo head"):
        astroclip.build(bad, jax.random.PRNGKey(0))


def test_spender_grid_mismatch_is_a_clear_error(built, tmp_path):
    path = _save(tmp_path, "spender", "test", built[1]["spectrum_tower"],
                 extras={"wave_obs": wavelength_grids.sdss_wave()})
    model_settings = _with_weights(SETTINGS.model, spectrum_tower={"weights": path})
    with pytest.raises(ValueError, match=r"trained on a grid of 3921 pixels.*data.grid='desi' "
                                         r"has 7781 pixels"):
        astroclip.build(model_settings, jax.random.PRNGKey(0))
