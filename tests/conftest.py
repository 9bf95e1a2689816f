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


@pytest.fixture(scope="session")
def smoke_server(smoke_run):
    """`main.py --mode=serve` over `smoke_run` on a free 127.0.0.1 port, started once for the
    server and browser tests (tests/serving_server.py): `.url`, and `.table`, the embeddings
    table it indexed, read when it started (later tests may re-embed the run)."""
    import types

    import serving_server
    from astroclip_jax.evaluation import embed

    with serving_server.serving(smoke_run) as url:
        table, _, _ = embed.read_embeddings(embed.embeddings_path(smoke_run, "test"))
        yield types.SimpleNamespace(url=url, table=table)
