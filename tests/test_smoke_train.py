"""End to end: `main.py --mode=train` on 8 (host-platform) devices for one epoch, restore
its checkpoint in this separate single-device process and embed with it, then continue the
run on one device."""

import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np

from astroclip_jax import checkpoint
from astroclip_jax import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(tempfile.gettempdir(), "astroclip_jax_test_tfds")  # shared, see resume
JAX_CACHE = os.path.join(tempfile.gettempdir(), "astroclip_jax_test_jax_cache")


def _train(workdir, epochs, devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    else:  # (multi-device CPU programs hang when reloaded from the cache, see test_sharding)
        env["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE
    proc = subprocess.run(
        [sys.executable, "main.py", "--config=configs/spender.py:smoke", "--mode=train",
         f"--workdir={workdir}", f"--config.data.data_dir={DATA_DIR}",
         f"--config.train.epochs={epochs}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def test_train_on_8_devices_restore_on_1_and_continue(tmp_path):
    workdir = str(tmp_path / "run")
    log = _train(workdir, epochs=1, devices=8)
    assert "8 devices" in log

    # This process has one CPU device and never saw the training mesh.
    assert jax.device_count() == 1
    config, model, params = checkpoint.restore_model(workdir, "best")
    assert config.train.epochs == 1 and config.model.image_tower.size == "test"
    _, trainable, meta = checkpoint.restore(workdir, "latest")
    assert meta["epoch"] == 1 and meta["step"] == 6
    np.testing.assert_array_equal(params["image_head"]["params"]["fc_0"]["kernel"],
                                  trainable["image_head"]["params"]["fc_0"]["kernel"])
    rng = np.random.default_rng(0)
    size = model_lib.image_size(config)
    img, spec = model.embed(params, rng.normal(size=(3, size, size, 3)).astype(np.float32),
                            rng.normal(size=(3, model_lib.spectrum_length(config))).astype(
                                np.float32))
    assert img.shape == spec.shape == (3, 32) and np.all(np.isfinite(img))

    log = _train(workdir, epochs=2, devices=1)  # same workdir: resumes, on another topology
    assert "resumed" in log
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(np.isfinite(r["val/loss"]) for r in records)
    assert records[1]["step"] == 12
    assert os.path.exists(os.path.join(workdir, "training_curves.png"))
