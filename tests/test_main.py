"""main.py turns a user's mistake (a missing work directory, a bad or renamed config field) into
one clear line and exit status 1, not a traceback, and writes nothing."""

import subprocess

import pytest

import cli_runs


def _main(mode, workdir, *overrides):
    return subprocess.run(cli_runs.command(mode, str(workdir), *overrides), cwd=cli_runs.ROOT,
                          env=cli_runs.env(), capture_output=True, text=True, timeout=300)


def test_mode_on_an_untrained_workdir_says_what_is_missing(tmp_path):
    workdir = tmp_path / "never_trained"
    proc = _main("eval_knn", workdir)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"no checkpoints in {workdir}" in proc.stderr and "--mode=train" in proc.stderr
    assert not (workdir / "eval_knn").exists()  # nothing written


@pytest.mark.parametrize("override, words", [
    # A value the settings reject (resolved before any work).
    ("--config.data.grid=hubble", ("config field data.grid is 'hubble'",)),
    # The field renamed by the settings refactor: train.feature_cache -> feature_cache.enabled.
    ("--config.train.feature_cache=False", ("not a config field", "feature_cache")),
])
def test_a_bad_config_field_is_one_line(tmp_path, override, words):
    proc = _main("train", tmp_path / "run", override)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert all(word in line for word in words), line
    assert not (tmp_path / "run" / "checkpoints").exists()
