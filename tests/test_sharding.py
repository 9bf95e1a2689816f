"""Data parallelism: one train step on 8 (host-platform) devices equals the same step on 1.

Runs in a subprocess because the device count is fixed when JAX starts
(XLA_FLAGS=--xla_force_host_platform_device_count=8).

Tolerance, and why it is not bitwise: the augmentation is bitwise identical (sharding-invariant
threefry), but XLA's CPU convolution and matmul kernels tile their inner reductions by shape,
so the towers' per-example features on a per-device batch of 4 differ from those on a batch
of 32 in the last bit (measured: <= 1e-6 relative; the test asserts 2e-6). The loss and the
gradient norm then agree to 1e-6 relative. Single gradient entries are sums over the batch
with cancellation, and the logits multiply cosine similarities by logit_scale = 15.5, which
amplifies the 1e-6 feature differences 15.5-fold: entries must agree to 1e-6 relative or
within 16e-6 of the tensor's largest entry. A real sharding bug (a per-device loss that drops
negatives: ln 4 instead of ln 32 at init) would miss these by five orders of magnitude.
"""

import json
import subprocess
import sys

import numpy as np

import cli_runs

_SCRIPT = r"""
import dataclasses, json, sys
import jax, numpy as np
from astroclip_jax import settings as settings_lib
from astroclip_jax.data import shipped_files
from astroclip_jax.flat_tree import flatten
from astroclip_jax.models import astroclip, partition
from astroclip_jax.training import optimizer, sharding, steps
from configs import spender

assert jax.device_count() == 8, jax.devices()
settings = settings_lib.resolve(spender.get_config("smoke"))
# Rotation, flips and blur on (the smoke config), and flux-unit spectrum noise: every
# augmentation is sharded too.
aug = dataclasses.replace(settings.augment, spectrum_noise_scale=1.0)
model, params = astroclip.build(settings.model, jax.random.PRNGKey(0))
trainable, frozen = partition.partition(params, settings.train.trainable)
rng = np.random.default_rng(0)
size, length = settings.model.image_size, settings.model.spectrum_length
batch = {"image": rng.normal(size=(32, size, size, 3)).astype(np.float32),
         "spectrum": rng.normal(size=(32, length)).astype(np.float32),
         "spectrum_scale": rng.uniform(0.5, 2.0, 32).astype(np.float32)}
tx = optimizer.make_optimizer(settings.train)
state0 = optimizer.init_state(tx, trainable, jax.random.PRNGKey(1))
train_step = steps.make_online_train_step(model, tx, aug, shipped_files.pixel_std("desi"))

out = {}
for n in (1, 8):
    mesh = sharding.make_mesh(jax.devices()[:n])
    repl = sharding.replicated(mesh)
    step = jax.jit(train_step, in_shardings=(repl, repl, sharding.data_sharded(mesh)),
                   out_shardings=(repl, repl))
    sharded = sharding.shard_batch(batch, mesh)
    assert len(sharded["image"].sharding.device_set) == n
    # Wait for each program: programs with collectives must not overlap on 8 CPU "devices"
    # backed by 2 cores (their rendezvous would time out).
    state, metrics = jax.block_until_ready(
        step(sharding.replicate(state0, mesh), sharding.replicate(frozen, mesh), sharded))
    # After one Adam step the first moment is (1 - b1) * gradient: the gradient itself.
    mu = state.opt_state.inner_state[0].mu
    grads = jax.tree.map(lambda m: np.asarray(m) / (1 - settings.train.adam_b1), mu)
    feats = jax.jit(lambda p, b: model.tower_features(p, b["image"], b["spectrum"]),
                    in_shardings=(repl, sharding.data_sharded(mesh)))(
        sharding.replicate(params, mesh), sharded)
    feats = jax.block_until_ready(feats)
    out[n] = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
              "features": [np.asarray(f).tolist() for f in feats],
              "grads": {k: v.tolist() for k, v in flatten(grads).items()}}
json.dump(out, sys.stdout)
"""


def test_one_step_on_8_devices_equals_1_device():
    # No persistent compilation cache here (cli_runs.env): XLA CPU programs with collectives
    # reloaded from it hang in their first all-gather (seen with jax 0.10.2).
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=cli_runs.ROOT,
                          env=cli_runs.env(devices=8), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    one, eight = out["1"], out["8"]
    assert abs(one["loss"] - np.log(32)) < 1.0  # a real loss, near chance at init
    for f1, f8 in zip(one["features"], eight["features"]):
        f1, f8 = np.asarray(f1), np.asarray(f8)
        np.testing.assert_allclose(f8, f1, rtol=0, atol=2e-6 * np.abs(f1).max())
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-6)
    np.testing.assert_allclose(eight["grad_norm"], one["grad_norm"], rtol=1e-6)
    assert one["grads"].keys() == eight["grads"].keys()
    for name, g1 in one["grads"].items():
        g1, g8 = np.asarray(g1), np.asarray(eight["grads"][name])
        assert np.abs(g1).max() > 0, name
        np.testing.assert_allclose(g8, g1, rtol=1e-6, atol=16e-6 * np.abs(g1).max(),
                                   err_msg=name)
