"""Train and eval steps: learning on a fixed batch, Adam with a settable learning rate, the
plateau rule against torch's ReduceLROnPlateau, masked and cached-feature validation."""

import jax
import numpy as np
import optax
import pytest

from astroclip_jax import losses
from astroclip_jax import model as model_lib
from astroclip_jax import train_step as ts
from configs import spender


@pytest.fixture(scope="module")
def setup():
    config = spender.get_config("smoke")
    # A fixed batch without augmentation: the heads alone must be able to fit it.
    config.augment.rotation = config.augment.flip = False
    config.augment.blur_sigma_max = 0.0
    config.train.learning_rate = 1e-3
    model, params = model_lib.build(config, jax.random.PRNGKey(0))
    trainable, frozen = model_lib.partition(params, model_lib.trainable_patterns(config))
    rng = np.random.default_rng(0)
    size, length = model_lib.image_size(config), model_lib.spectrum_length(config)
    batch = {"image": rng.normal(size=(16, size, size, 3)).astype(np.float32),
             "spectrum": rng.normal(size=(16, length)).astype(np.float32)}
    return config, model, trainable, frozen, batch


def test_loss_decreases_on_a_fixed_batch(setup):
    config, model, trainable, frozen, batch = setup
    state = ts.init_state(config, trainable, jax.random.PRNGKey(1))
    step = jax.jit(ts.make_train_step(model, config))
    found = []
    for _ in range(20):
        state, metrics = step(state, frozen, batch)
        found.append(float(metrics["loss"]))
    assert int(state.step) == 20
    # Starts near chance (ln 16 = 2.77) and must go clearly down.
    assert abs(found[0] - np.log(16)) < 0.5
    assert found[-1] < found[0] - 0.3, found
    # The loss reported is InfoNCE of the embeddings the step saw (frozen params untouched).
    params = model_lib.merge(trainable, frozen)
    img, spec = model.embed(params, batch["image"], batch["spectrum"])
    np.testing.assert_allclose(found[0], losses.infonce(img, spec, 15.5), rtol=1e-5)


def test_update_is_adam_with_the_state_learning_rate(setup):
    config, model, trainable, frozen, batch = setup
    state = ts.set_learning_rate(ts.init_state(config, trainable, jax.random.PRNGKey(1)), 1e-4)
    new_state, _ = jax.jit(ts.make_train_step(model, config))(state, frozen, batch)

    # Reference: the same gradient through a plain optax.adam(1e-4).
    def loss(tr):
        img, spec = model.embed(model_lib.merge(tr, frozen), batch["image"], batch["spectrum"])
        return losses.infonce(img, spec, config.train.logit_scale)

    grads = jax.grad(loss)(trainable)
    tx = optax.adam(1e-4)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    want = optax.apply_updates(trainable, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 new_state.params, want)


def test_plateau_matches_torch_reduce_lr_on_plateau():
    torch = pytest.importorskip("torch")
    losses_seq = [5.0, 4.0, 4.0, 3.9999, 4.1, 4.0, 4.0, 4.0, 3.5, 3.6, 3.6, 3.6, 3.6, 3.6,
                  3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.2]
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=5)
    p = ts.Plateau(lr=5e-4)
    for v in losses_seq:
        sched.step(v)
        p = ts.plateau_update(p, v, factor=0.5, patience=5)
        assert p.lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        assert p.num_bad_epochs == sched.num_bad_epochs
    assert p.lr < 5e-4 / 2  # the sequence did trigger two reductions


def test_eval_masks_padding_and_cached_features_agree(setup):
    config, model, trainable, frozen, batch = setup
    eval_step, features_step, heads_step = ts.make_eval_steps(model, config)
    mask = np.arange(16) < 11
    padded = {**batch, "mask": mask}
    got = jax.jit(eval_step)(trainable, frozen, padded)
    params = model_lib.merge(trainable, frozen)
    img, spec = model.embed(params, batch["image"][:11], batch["spectrum"][:11])
    np.testing.assert_allclose(got["loss"], losses.infonce(img, spec, 15.5), rtol=1e-5)
    feats = jax.jit(features_step)(frozen, padded)
    cached = jax.jit(heads_step)(trainable, frozen, *feats, mask)
    np.testing.assert_allclose(cached["loss"], got["loss"], rtol=1e-6)
    assert float(got["n_valid"]) == 11
