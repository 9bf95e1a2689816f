"""benchmarks/gpu.sh rehearsed on the CPU (GPU_REHEARSAL=1): every part of the GPU script runs at
test size through the same scripts and flags, so a typo or a missing file fails CI, not the few
minutes a GPU is lent. The parts are read from the script itself: a part added later is covered.
Each benchmark checks its own numbers against PyTorch before it writes its JSON."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import pytest

pytest.importorskip("torch")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu.sh")


def _parts() -> list[str]:
    """Part names as the script declares them (`part NAME ...`; `$dtype` loops expanded)."""
    names = []
    with open(SCRIPT) as f:
        text = f.read()
    for name in re.findall(r"^\s*part (\S+) ", text, flags=re.M):
        names += [name.replace("$dtype", d) for d in ("float32", "bfloat16")] if "$dtype" in name \
            else [name]
    return names


def _run(tmp_path, **env):
    return subprocess.run(["bash", SCRIPT], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "GPU_REHEARSAL": "1", "RESULTS": str(tmp_path),
                               "PY": sys.executable, **env})


def test_every_part_runs_at_test_size_on_the_cpu(tmp_path):
    run = _run(tmp_path / "results")
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    parts = _parts()
    assert len(parts) >= 8
    for name in parts:
        assert f"=== {name} done in" in log, f"part {name} did not finish:\n{log[-4000:]}"
    written = sorted(os.listdir(tmp_path / "results"))
    assert len(written) == len(parts), written  # one JSON per part, all in RESULTS
    for name in written:
        with open(tmp_path / "results" / name) as f:
            assert json.load(f), name


def test_a_failing_part_fails_the_run_and_the_others_still_run(tmp_path):
    """PY replaced by a shim: the accelerator check runs for real, every benchmark 'succeeds'
    at once but the SpecFormer one, which fails."""
    shim = tmp_path / "python"
    shim.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *specformer_forward.py*) exit 3 ;;
  *benchmarks/*) exit 0 ;;
esac
exec {sys.executable} "$@"
""")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    run = _run(tmp_path / "results", PY=str(shim))
    log = run.stdout + run.stderr
    assert run.returncode == 1, log
    assert "=== specformer_float32 FAILED" in log and "=== specformer_bfloat16 FAILED" in log
    assert "=== vit_bfloat16 done in" in log  # after the first failure, the rest still ran


def test_without_an_accelerator_the_real_run_stops_at_once_with_one_line(tmp_path):
    run = subprocess.run(["bash", SCRIPT], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "GPU_REHEARSAL": "0", "RESULTS": str(tmp_path),
                              "PY": sys.executable, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 1
    assert "no accelerator visible to jax" in run.stderr and "GPU_REHEARSAL=1" in run.stderr
    assert "===" not in run.stdout  # no part started
