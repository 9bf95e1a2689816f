"""`towers.features` on a CPU runs the batch in blocks of `Kind.cpu_block` galaxies: the same
features as the whole batch at once (float rounding apart: a GEMM's blocking depends on its row
count), for every tower kind, batch sizes that are and are not a multiple of the block, and
inside a jitted program; the blocks are really used on one CPU device, and not when the
computation may span several devices."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astroclip_jax.models import towers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"resnet": (32, 32, 3), "spender": (7781,), "dinov2_vit": (48, 48, 3),
          "specformer": (400,)}


def _tower(kind):
    config = towers.tower_config(kind, "test")
    module = towers.build_tower(kind, config)
    variables = towers.init_tower(kind, config, jax.random.PRNGKey(0), (1,) + SHAPES[kind])
    return module, variables


def _whole(kind, module, variables, x):
    out = module.apply(variables, x, **dict(towers.kind_of(kind).feature_args))
    return out["features"] if isinstance(out, dict) else out


@pytest.mark.parametrize("kind", sorted(towers.KINDS))
def test_blocks_give_the_whole_batch_features(kind):
    module, variables = _tower(kind)
    block = towers.kind_of(kind).cpu_block or 1
    rng = np.random.default_rng(0)
    features = jax.jit(lambda v, x: towers.features(kind, module, v, x))
    whole = jax.jit(lambda v, x: _whole(kind, module, v, x))
    for n in (1, 2 * block, 3 * block + 1):
        x = (1 + 0.5 * rng.normal(size=(n,) + SHAPES[kind])).astype(np.float32)
        a, b = np.asarray(features(variables, x)), np.asarray(whole(variables, x))
        assert a.shape == b.shape and a.shape[0] == n
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_in_blocks_is_row_wise_exact():
    x = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
    seen = []

    def fn(rows):
        seen.append(rows.shape[0])
        return jnp.stack([rows.sum(1), rows[:, 0]], 1)

    out = np.asarray(towers.in_blocks(fn, jnp.asarray(x), 5))
    np.testing.assert_array_equal(out, np.stack([x.sum(1), x[:, 0]], 1))
    assert seen == [5, 3]  # four blocks of 5 in one loop body, then the last 3 on their own


@pytest.mark.parametrize("kind", [k for k in sorted(towers.KINDS) if towers.kind_of(k).cpu_block])
def test_the_blocks_are_a_loop_on_one_cpu_device(kind):
    module, variables = _tower(kind)
    x = jnp.zeros((4 * towers.kind_of(kind).cpu_block,) + SHAPES[kind])
    hlo = jax.jit(lambda v, x: towers.features(kind, module, v, x)).lower(variables, x).as_text()
    assert "while" in hlo  # lax.map's loop
    assert jax.device_count() == 1 and jax.default_backend() == "cpu"


def test_no_blocks_when_the_computation_may_span_devices():
    # a fresh process with 2 CPU devices: the whole batch at once (no loop in the program)
    code = (
        "import jax, jax.numpy as jnp\n"
        "from astroclip_jax.models import towers\n"
        "c = towers.tower_config('resnet', 'test'); m = towers.build_tower('resnet', c)\n"
        "v = towers.init_tower('resnet', c, jax.random.PRNGKey(0), (1, 32, 32, 3))\n"
        "x = jnp.zeros((32, 32, 32, 3))\n"
        "print(jax.device_count(), 'while' in jax.jit(lambda v, x: towers.features("
        "'resnet', m, v, x)).lower(v, x).as_text())\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["2", "False"]
