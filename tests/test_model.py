"""The AstroCLIP model: head sizes against the paper, the trainable/frozen partition, the
gradient touching only trainable parameters, weight loading from tower directories."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astroclip_jax import model as model_lib
from astroclip_jax import tower_weights
from astroclip_jax import train_step as ts
from astroclip_jax.models import heads, towers
from configs import spender


def _config():
    return spender.get_config("smoke")


def _batch(config, n=4, seed=0):
    rng = np.random.default_rng(seed)
    size = model_lib.image_size(config)
    return {"image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
            "spectrum": rng.normal(size=(n, model_lib.spectrum_length(config))).astype(np.float32)}


@pytest.fixture(scope="module")
def built():
    config = _config()
    return config, *model_lib.build(config, jax.random.PRNGKey(0))


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


def test_default_partition_trains_only_the_heads(built):
    config, _, params = built
    trainable, frozen = model_lib.partition(params, model_lib.trainable_patterns(config))
    assert sorted(trainable) == ["image_head", "spectrum_head"]
    assert sorted(frozen) == ["image_tower", "spectrum_tower"]
    merged = model_lib.merge(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    # The image tower carries no MoCo head (it moved to the image head) and Spender no MLP.
    assert "fc_0" not in params["image_tower"]["params"]
    assert not any(k.startswith("mlp_") for k in params["spectrum_tower"]["params"])


def test_batch_stats_never_trainable_and_typos_raise(built):
    _, _, params = built
    trainable, frozen = model_lib.partition(params, (r"image_tower/.*",))
    assert "batch_stats" not in trainable["image_tower"]
    assert "batch_stats" in frozen["image_tower"]
    with pytest.raises(ValueError, match="matches no parameter"):
        model_lib.partition(params, (r"image_haed/.*",))


def test_embeddings_are_normalised_and_split_equals_whole(built):
    config, model, params = built
    batch = _batch(config)
    img, spec = model.embed(params, batch["image"], batch["spectrum"])
    assert img.shape == spec.shape == (4, config.model.image_head.out)
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
    feats = model.tower_features(params, batch["image"], batch["spectrum"])
    img2, spec2 = model.heads_from_features(params, *feats)
    np.testing.assert_array_equal(img, img2)
    np.testing.assert_array_equal(spec, spec2)


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
    config, model, params = built
    config = _config()
    if towers_train:
        config.train.trainable = (r"image_head/.*", r"spectrum_head/.*", r"image_tower/.*",
                                  r"spectrum_tower/.*")
    trainable, frozen = model_lib.partition(params, model_lib.trainable_patterns(config))
    state = ts.init_state(config, trainable, jax.random.PRNGKey(1))
    batch = _batch(config)
    step_jaxpr = jax.make_jaxpr(ts.make_train_step(model, config))(state, frozen, batch).jaxpr
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


def _save(tmp_path, kind, size, variables, extras=None):
    path = str(tmp_path / kind)
    tower_weights.save_tower(path, kind, towers.tower_config(kind, size),
                             jax.tree.map(np.asarray, variables), extras=extras)
    return path


def test_image_head_starts_from_the_tower_moco_head(built, tmp_path):
    # A converted-weights directory: the built tower plus a MoCo head of the "test" size.
    config, _, params = built
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
    config = _config()
    config.model.image_tower.weights = _save(tmp_path, "resnet", "test", tower)
    # (the spectrum tower from disk too: nothing to initialise, a fast test)
    config.model.spectrum_tower.weights = _save(tmp_path, "spender", "test",
                                                params["spectrum_tower"])
    config.model.image_head.hidden = (cfg["head_hidden"],)
    config.model.image_head.out = cfg["head_out"]
    _, loaded = model_lib.build(config, jax.random.PRNGKey(0))
    jax.tree.map(np.testing.assert_array_equal, loaded["image_head"]["params"], moco)
    jax.tree.map(np.testing.assert_array_equal, loaded["image_tower"], params["image_tower"])
    config.model.image_head.hidden = (7,)  # a head that cannot take the MoCo weights
    with pytest.raises(ValueError, match="MoCo head"):
        model_lib.build(config, jax.random.PRNGKey(0))


def test_spender_grid_mismatch_is_a_clear_error(built, tmp_path):
    from astroclip_jax.data import grids

    config = _config()
    config.model.spectrum_tower.weights = _save(
        tmp_path, "spender", "test", built[2]["spectrum_tower"],
        extras={"wave_obs": grids.sdss_wave()})
    with pytest.raises(ValueError, match="grid"):
        model_lib.build(config, jax.random.PRNGKey(0))
