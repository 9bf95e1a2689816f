"""Exact resume: a run killed with SIGKILL and restarted ends bitwise identical to a run
that was never interrupted (trainable params, Adam state, step, rng, plateau, data position,
and the validation losses it logs)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from astroclip_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Shared by the tests that run main.py: the prepared tiny dataset and compiled programs.
DATA_DIR = os.path.join(tempfile.gettempdir(), "astroclip_jax_test_tfds")
JAX_CACHE = os.path.join(tempfile.gettempdir(), "astroclip_jax_test_jax_cache")


def _command(workdir):
    return [sys.executable, "main.py", "--config=configs/spender.py:smoke", "--mode=train",
            f"--workdir={workdir}", f"--config.data.data_dir={DATA_DIR}"]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                JAX_COMPILATION_CACHE_DIR=JAX_CACHE)


def _run(workdir):
    proc = subprocess.run(_command(workdir), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _finished_steps(workdir):
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _val_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["epoch"]: r["val/loss"] for r in map(json.loads, f)}


def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    _run(straight)  # also prepares the dataset on first use

    proc = subprocess.Popen(_command(killed), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not _finished_steps(killed) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # the first checkpoint is complete: kill mid-run
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps_at_kill = _finished_steps(killed)
    _, _, meta_straight = checkpoint.restore_state(straight, "latest")
    assert steps_at_kill and max(steps_at_kill) < meta_straight["step"], steps_at_kill

    _run(killed)  # resumes from the latest complete checkpoint

    _, a, meta_a = checkpoint.restore_state(straight, "latest")
    _, b, meta_b = checkpoint.restore_state(killed, "latest")
    assert int(a["step"]) == int(b["step"]) == 18
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for key in ("epoch", "plateau", "data_state", "val_loss"):
        assert meta_a[key] == meta_b[key], key
    # The killed run's metrics were cut back to its checkpoint and redone: same history.
    assert _val_losses(straight) == _val_losses(killed)
    assert os.path.exists(os.path.join(killed, "training_curves.png"))
