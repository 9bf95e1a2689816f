"""AstroCLIP's alignment recipe (train.schedule="warmup_cosine"): AdamW with decoupled weight
decay, gradients clipped to a global norm, linear warmup then a cosine, against torch.optim."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from astroclip_jax import settings as settings_lib
from astroclip_jax.training import optimizer
from configs import spender


def _train(**changes):
    train = settings_lib.resolve(spender.get_config("smoke")).train
    return dataclasses.replace(train, **changes)


def test_warmup_cosine_closed_form():
    peak, warmup, total = 1e-4, 10, 110
    schedule = optimizer.warmup_cosine_schedule(peak, warmup, total)
    for t, want in [(0, 0.0), (5, peak / 2), (10, peak), (60, peak / 2), (110, 0.0), (500, 0.0),
                    (35, peak * 0.5 * (1 + math.cos(math.pi * 0.25)))]:
        assert float(schedule(t)) == pytest.approx(want, rel=1e-6, abs=1e-12), t


@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_adamw_clip_and_schedule_equal_torch(clip_norm):
    """Ten updates of a quadratic: ours vs torch AdamW + clip_grad_norm_ + the same lr(t)."""
    train = _train(schedule="warmup_cosine", learning_rate=1e-2, weight_decay=0.05,
                   warmup_steps=3, cosine_steps=10, clip_norm=clip_norm, adam_b1=0.9,
                   adam_b2=0.999, adam_eps=1e-8)
    tx = optimizer.make_optimizer(train)
    rng = np.random.default_rng(0)
    w0, target = rng.normal(size=(5, 4)), rng.normal(size=(5, 4)) * 3

    def loss(w):
        return 0.5 * jnp.sum((w - target) ** 2)

    params = jnp.asarray(w0, jnp.float32)
    state = tx.init(params)
    w_t = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([w_t], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    schedule = optimizer.warmup_cosine_schedule(1e-2, 3, 10)
    for t in range(10):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        opt.zero_grad()
        (0.5 * ((w_t - torch.tensor(target)) ** 2).sum()).backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_([w_t], clip_norm)
        for group in opt.param_groups:
            group["lr"] = float(schedule(t))
        opt.step()
    np.testing.assert_allclose(np.asarray(params), w_t.detach().numpy(), rtol=2e-5, atol=2e-6)


def test_the_plateau_optimizer_is_unchanged():
    """The paper's Adam keeps its state layout (older checkpoints restore)."""
    tx = optimizer.make_optimizer(_train())
    state = tx.init(jnp.zeros(3))
    assert set(state.hyperparams) == {"learning_rate", "b1", "b2", "eps", "eps_root"}
