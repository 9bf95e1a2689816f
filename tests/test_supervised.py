"""Supervised bounds (training/supervised.py): each network's train step lowers the loss on a
fixed batch, and the loss is the NumPy mean squared error of its predictions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astroclip_jax import settings as settings_lib
from astroclip_jax.training import optimizer, supervised
from configs import spender

# Small inputs: both towers take any size (fast compiles on a shared 2-core CPU).
SHAPES = {"photometry": (3,), "spectrum": (1000,), "image": (16, 16, 3)}


@pytest.mark.parametrize("modality", list(SHAPES))
def test_train_step_lowers_the_loss_on_a_fixed_batch(modality):
    probe = settings_lib.resolve(spender.get_config("smoke")).probe
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16,) + SHAPES[modality]).astype(np.float32)
    # Targets the inputs determine (a fixed random function), standardised.
    y = np.stack([x.reshape(16, -1)[:, :3].sum(1), x.reshape(16, -1)[:, -1]], 1)
    y = ((y - y.mean(0)) / y.std(0)).astype(np.float32)
    module = supervised.network(modality, probe, 2)
    variables = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    fixed = {k: v for k, v in variables.items() if k != "params"}
    train = settings_lib.resolve(spender.get_config("smoke")).train
    tx = optimizer.make_optimizer(train.__class__(**{**train.__dict__, "learning_rate": 3e-3}))
    state = optimizer.init_state(tx, variables["params"], jax.random.PRNGKey(1))
    step = jax.jit(supervised.make_train_step(module, tx, fixed))
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    losses = []
    for _ in range(25):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    # jitted: an eager ResNet would compile each of its operations on its own
    pred = np.asarray(jax.jit(module.apply)({"params": state.params, **fixed}, x), np.float64)
    final = float(jax.jit(lambda p: supervised.mse(module, p, fixed, batch["x"], batch["y"]))(
        state.params))
    assert final == pytest.approx(np.mean((pred - y) ** 2), rel=1e-4)
    assert final < 0.5 * losses[0], (modality, losses[0], final)
    assert int(state.step) == 25
