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
    assert len(parts) >= 11
    assert {"train_step_bf16", "spender_ae"} <= set(parts)  # issue 21's parts
    for name in parts:
        assert f"=== {name} done in" in log, f"part {name} did not finish:\n{log[-4000:]}"
    written = sorted(n for n in os.listdir(tmp_path / "results") if n.endswith(".json"))
    assert len(written) == len(parts), written  # one JSON per part, all in RESULTS
    for name in written:
        with open(tmp_path / "results" / name) as f:
            assert json.load(f), name
    # The install step ran (rehearsed), and the final table has a row per part, each read
    # from its JSON (no '?' or '-' in the ours column) and marked done.
    assert "install (rehearsal): python3 lacks:" in log and "install: " in log
    assert ".[gpu] = jax[cuda13]" in log
    table = (tmp_path / "results" / "gpu_table.txt").read_text().splitlines()
    assert table[0].startswith("| part") and "\n".join(table) in run.stdout  # printed too
    for name in parts:
        rows = [r for r in table[2:] if r.startswith(f"| {name}")]
        assert rows, f"no table row for {name}:\n" + "\n".join(table)
        for r in rows:
            cells = [c.strip() for c in r.strip("|").split("|")]
            assert cells[1] not in ("-", "") and not cells[1].startswith("?"), r
            assert cells[-1] == "done", r


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


def test_the_table_keeps_a_row_for_a_failed_or_skipped_part(tmp_path):
    """A part that wrote no JSON (failed, skipped) still has its row and its status; one whose
    JSON lacks a field says which, instead of stopping the table."""
    from benchmarks import gpu_table

    (tmp_path / "seed_scale-gpu.json").write_text(json.dumps({"benchmark": "seed_scale"}))
    parts = tmp_path / "parts"
    parts.write_text(f"train_step\tFAILED\t12\t{tmp_path}/train_step-gpu.json\n"
                     f"seed_scale\tdone\t30\t{tmp_path}/seed_scale-gpu.json\n"
                     f"moco_step\tSKIPPED\t0\t{tmp_path}/moco_step-gpu.json\n")
    rows, merged = gpu_table.rows_of(str(parts))
    assert [(r["part"], r["ours"], r["status"]) for r in rows] == [
        ("train_step", "-", "FAILED"), ("seed_scale", "? (KeyError: 'cache')", "done"),
        ("moco_step", "-", "SKIPPED")]
    assert list(merged) == ["seed_scale-gpu.json"]
    assert gpu_table.render(rows).count("\n") == len(rows) + 1  # header, rule, a line per row


def test_no_part_starts_past_the_deadline(tmp_path):
    """GPU_DEADLINE_S bounds the whole run: with no time left every part is skipped, reported,
    and the run fails (the benchmarks themselves never start: the shim would say so)."""
    shim = tmp_path / "python"
    shim.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *benchmarks/gpu_table.py*) exec {sys.executable} "$@" ;;
  *benchmarks/*) echo "STARTED $*"; exit 0 ;;
esac
exec {sys.executable} "$@"
""")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    run = _run(tmp_path / "results", PY=str(shim), GPU_DEADLINE_S="1")
    log = run.stdout + run.stderr
    assert run.returncode == 1, log
    assert "STARTED" not in log
    for name in _parts():
        assert f"=== {name} SKIPPED" in log, log
        assert re.search(rf"\| {name}\S* .*\| SKIPPED +\|", run.stdout), run.stdout
