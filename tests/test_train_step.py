"""Train and eval steps: learning on a fixed batch, Adam with a settable learning rate, the
plateau rule against torch's ReduceLROnPlateau, masked and cached-feature validation."""

import dataclasses
import types

import jax
import numpy as np
import optax
import pytest

from astroclip_jax import settings as settings_lib
from astroclip_jax.models import astroclip, partition
from astroclip_jax.training import losses, optimizer, steps
from configs import spender


def _infonce_float64(img, spec, scale):
    """Symmetric CLIP loss in NumPy float64: L2-normalise, scaled cosine logits, the mean of
    the row-wise and column-wise cross-entropies with the diagonal as label."""
    img, spec = (np.asarray(x, np.float64) for x in (img, spec))
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    spec = spec / np.linalg.norm(spec, axis=1, keepdims=True)
    logits = scale * img @ spec.T

    def ce(z):
        top = z.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
        return np.mean(lse - np.diag(z))

    return 0.5 * (ce(logits) + ce(logits.T))


@pytest.fixture(scope="module")
def setup():
    settings = settings_lib.resolve(spender.get_config("smoke"))
    # A fixed batch without augmentation: the heads alone must be able to fit it.
    aug = dataclasses.replace(settings.augment, rotation=False, flip=False, blur_sigma_max=0.0)
    train = dataclasses.replace(settings.train, learning_rate=1e-3)
    model, params = astroclip.build(settings.model, jax.random.PRNGKey(0))
    trainable, frozen = partition.partition(params, train.trainable)
    rng = np.random.default_rng(0)
    size, length = settings.model.image_size, settings.model.spectrum_length
    batch = {"image": rng.normal(size=(16, size, size, 3)).astype(np.float32),
             "spectrum": rng.normal(size=(16, length)).astype(np.float32),
             "spectrum_scale": np.ones(16, np.float32)}
    tx = optimizer.make_optimizer(train)
    step = jax.jit(steps.make_online_train_step(model, tx, aug, None))  # compiled once, shared
    # The frozen towers' features of the batch: the heads' inputs in every step below.
    features = jax.jit(model.tower_features)(params, batch["image"], batch["spectrum"])
    return types.SimpleNamespace(settings=settings, step=step, tx=tx, model=model,
                                 trainable=trainable, frozen=frozen, batch=batch,
                                 features=features)


def _embed(s, rows=slice(None)):
    """The embeddings of the batch (rows `rows`) at the initial params."""
    img_f, spec_f = s.features
    params = partition.merge(s.trainable, s.frozen)
    return jax.jit(s.model.heads_from_features)(params, img_f[rows], spec_f[rows])


def test_loss_decreases_on_a_fixed_batch(setup):
    s = setup
    state = optimizer.init_state(s.tx, s.trainable, jax.random.PRNGKey(1))
    found = []
    for _ in range(20):
        state, metrics = s.step(state, s.frozen, s.batch)
        found.append(float(metrics["loss"]))
    assert int(state.step) == 20
    # Starts near chance (ln 16 = 2.77) and must go clearly down.
    assert abs(found[0] - np.log(16)) < 0.5
    assert found[-1] < found[0] - 0.3, found
    # The loss reported is InfoNCE of the embeddings the step saw (frozen params untouched),
    # at the configured logit scale.
    np.testing.assert_allclose(found[0], _infonce_float64(*_embed(s), 15.5), rtol=1e-5)


def test_update_is_adam_with_the_state_learning_rate(setup):
    s = setup
    state = optimizer.set_learning_rate(
        optimizer.init_state(s.tx, s.trainable, jax.random.PRNGKey(1)), 1e-4)
    assert float(optimizer.learning_rate(state)) == pytest.approx(1e-4, rel=1e-7)
    new_state, metrics = s.step(state, s.frozen, s.batch)
    assert float(metrics["learning_rate"]) == pytest.approx(1e-4, rel=1e-7)

    # Reference: the same gradient through a plain optax.adam(1e-4). The towers are frozen, so
    # the gradient w.r.t. the heads is that of the heads on the towers' features.
    def loss(tr):
        img, spec = s.model.heads_from_features(partition.merge(tr, s.frozen), *s.features)
        return losses.infonce(img, spec, s.settings.model.logit_scale)

    ref = optax.adam(1e-4)

    @jax.jit
    def reference(trainable):
        grads = jax.grad(loss)(trainable)
        updates, _ = ref.update(grads, ref.init(trainable), trainable)
        return optax.apply_updates(trainable, updates), optax.global_norm(grads)

    want, grad_norm = reference(s.trainable)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 new_state.params, want)
    np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-5)


def test_plateau_matches_torch_reduce_lr_on_plateau():
    torch = pytest.importorskip("torch")
    losses_seq = [5.0, 4.0, 4.0, 3.9999, 4.1, 4.0, 4.0, 4.0, 3.5, 3.6, 3.6, 3.6, 3.6, 3.6,
                  3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.6, 3.2]
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=5,
                                                       threshold=1e-4)
    p = optimizer.Plateau(lr=5e-4)
    for v in losses_seq:
        sched.step(v)
        p = optimizer.plateau_update(p, v, factor=0.5, patience=5, threshold=1e-4)
        assert p.lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        assert p.num_bad_epochs == sched.num_bad_epochs
    assert p.lr < 5e-4 / 2  # the sequence did trigger two reductions


def test_eval_masks_padding_and_cached_features_agree(setup):
    s = setup
    features_step, heads_step = steps.make_eval_steps(s.model)
    mask = np.arange(16) < 11
    padded = {**s.batch, "mask": mask}
    feats = jax.jit(features_step)(s.frozen, padded)
    got = jax.jit(heads_step)(s.trainable, s.frozen, *feats, mask)
    # Padded rows are neither anchors nor negatives: the loss of the 11 real rows alone.
    np.testing.assert_allclose(got["loss"], _infonce_float64(*_embed(s, slice(0, 11)), 15.5),
                               rtol=1e-5)
    assert float(got["n_valid"]) == 11
    # The frozen-tower features of the padded batch are the towers' on its rows.
    for got_f, want_f in zip(feats, s.features):
        np.testing.assert_allclose(got_f, want_f, rtol=1e-5, atol=1e-6)
