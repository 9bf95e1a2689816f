"""Fixtures shared by several test files."""

import pytest

import cli_runs


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The work directory of a one-epoch smoke training run (`main.py --mode=train`), trained
    once per session for the tests that restore, embed or evaluate a real checkpoint."""
    workdir = str(tmp_path_factory.mktemp("smoke_run") / "run")
    cli_runs.run("train", workdir, "--config.train.epochs=1")
    return workdir
