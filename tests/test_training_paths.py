"""The two training paths are one: the online and the cached step, end to end, and switching.

With the augmentations off, the cached views are the clean inputs (one image view, one
spectrum view), so the cached step computes what the online step computes, from the same
galaxies at the same step (`data.pipeline.step_indices`): a run trained online for two epochs,
one trained from the cache for one epoch and resumed online for the second, and one trained
online then resumed from the cache must end at the same parameters. If a resumed run took its
data position from anywhere but `state.step` (say, replayed the order from step 0), its second
epoch would see other batches and the parameters would differ by far more than the tolerance.

Tolerance: the cache stores float32 features computed in batches of 256, the online step in
batches of 32; XLA's CPU convolutions round differently per batch shape, and 12 Adam steps carry
that into the heads: measured 2.2e-7 at most. Replaying the order from step 0 on resume (the bug
this guards against) moved the parameters by 2.3e-3, 100 times the tolerance.
"""

import jax
import numpy as np
import pytest

from astroclip_jax import settings
from astroclip_jax.models import astroclip, partition
from astroclip_jax.training import contrastive
from configs import spender

ATOL = 2e-5


def _config(epochs, cached):
    c = spender.get_config("smoke")
    c.augment.rotation = c.augment.flip = False
    c.augment.blur_sigma_max = 0.0
    c.feature_cache.enabled = cached
    c.feature_cache.dtype = "float32"
    c.train.epochs = epochs
    return c


def _train(workdir, *legs):
    """Run the legs [(epochs, cached), ...] one after the other in `workdir`; the final state."""
    state = None
    for epochs, cached in legs:
        state = contrastive.run(settings.resolve(_config(epochs, cached)), str(workdir))
    return jax.device_get(state)


@pytest.fixture(scope="module")
def online_two_epochs(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("online"), (2, False))


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_online_run_trains(online_two_epochs):
    """The online branch end to end: 12 steps that move the head parameters far."""
    assert int(online_two_epochs.step) == 12
    run = settings.resolve(_config(2, False))
    _, params = astroclip.build(run.model, jax.random.PRNGKey(run.seed))
    initial, _ = partition.partition(params, run.train.trainable)
    assert _max_diff(initial, online_two_epochs.params) > 50 * ATOL


@pytest.mark.parametrize("first_cached", [True, False], ids=["cached_then_online",
                                                             "online_then_cached"])
def test_switching_step_on_resume_continues_the_same_order(online_two_epochs, tmp_path,
                                                           first_cached):
    state = _train(tmp_path, (1, first_cached), (2, not first_cached))
    assert int(state.step) == 12
    diff = _max_diff(state.params, online_two_epochs.params)
    assert diff < ATOL, f"max |param difference| {diff:.2e}"
    np.testing.assert_allclose(np.asarray(state.opt_state.hyperparams["learning_rate"]),
                               np.asarray(online_two_epochs.opt_state.hyperparams["learning_rate"]))
