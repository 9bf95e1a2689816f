"""Running `main.py` in a subprocess from the tests: one command line, one environment.

The tests that train or embed through the command line share the prepared tiny dataset
(`DATA_DIR`, prepared by the first training run) and a persistent JAX compilation cache
(`JAX_CACHE`) so that later runs skip most of XLA's compile time. Multi-device CPU programs
are never put in that cache: XLA CPU programs with collectives reloaded from it hang in their
first all-gather (seen with jax 0.10.2).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(tempfile.gettempdir(), "astroclip_jax_test_tfds")
JAX_CACHE = os.path.join(tempfile.gettempdir(), "astroclip_jax_test_jax_cache")


def command(mode: str, workdir: str, *overrides: str, config: str = "smoke",
            config_file: str = "configs/spender.py") -> list[str]:
    """`python main.py` on the test dataset; `overrides` are `--config.x=y` flags."""
    return [sys.executable, "main.py", f"--config={config_file}:{config}", f"--mode={mode}",
            f"--workdir={workdir}", f"--config.data.data_dir={DATA_DIR}", *overrides]


def env(devices: int = 1) -> dict[str, str]:
    """CPU only; `devices` > 1 host-platform devices (then without the compilation cache)."""
    out = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out.pop("JAX_COMPILATION_CACHE_DIR", None)
    if devices > 1:
        out["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    else:
        out["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE
    return out


def run(mode: str, workdir: str, *overrides: str, devices: int = 1, timeout: int = 600,
        config_file: str = "configs/spender.py", config: str = "smoke"
        ) -> subprocess.CompletedProcess:
    """Run one mode to completion; fails the test (with the log's tail) unless it exits 0."""
    proc = subprocess.run(command(mode, workdir, *overrides, config=config,
                                  config_file=config_file), cwd=ROOT,
                          env=env(devices),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def align_and_evaluate(kind: str, tower: str, workdir: str) -> dict:
    """pretrain -> align -> eval_knn on smoke: train the smoke contrastive run with the `kind`
    ("image" or "spectrum") tower directory `tower`, check the log names it, evaluate, and
    return eval_knn's R^2 table (every entry checked finite)."""
    import json
    import math

    module = {"image": "resnet", "spectrum": "spender"}[kind]
    log = run("train", workdir, f"--config.model.{kind}_tower.weights={tower}").stderr
    assert f"{module} tower: converted weights from {tower}" in log, log[-2000:]
    run("eval_knn", workdir)
    with open(os.path.join(workdir, "eval_knn", "results.json")) as f:
        r2 = json.load(f)["r2"]
    assert r2 and all(math.isfinite(v) for scores in r2.values() for v in scores.values())
    return r2
