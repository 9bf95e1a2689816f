"""main.py turns a missing work directory into one clear line, not a traceback."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mode_on_an_untrained_workdir_says_what_is_missing(tmp_path):
    workdir = tmp_path / "never_trained"
    proc = subprocess.run(
        [sys.executable, "main.py", "--config=configs/spender.py:smoke", "--mode=eval_knn",
         f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"no checkpoints in {workdir}" in proc.stderr and "--mode=train" in proc.stderr
    assert not (workdir / "eval_knn").exists()  # nothing written
