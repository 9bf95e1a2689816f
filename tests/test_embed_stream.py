"""Streaming `--mode=embed`: an embed SIGKILLed at a random point after its first chunks and
rerun ends with exactly the table of an uninterrupted run (the same computation on the same
device, so bitwise), having kept the chunks it had; a finished table is reused, not recomputed;
the pooled inputs are optional."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

import cli_runs
from astroclip_jax.evaluation import embed, embedding_files

CHUNK = "--config.eval.embed_chunk_rows=4"  # the 52 tiny test galaxies in 13 chunks


def _copy_without_embeddings(smoke_run, workdir):
    """The smoke run's checkpoints, without a table another test may have embedded there."""
    shutil.copytree(smoke_run, workdir, ignore=shutil.ignore_patterns(embed.EMBEDDINGS_DIR))
    return workdir


@pytest.fixture(scope="module")
def uninterrupted(smoke_run, tmp_path_factory):
    workdir = _copy_without_embeddings(smoke_run,
                                       str(tmp_path_factory.mktemp("uninterrupted") / "run"))
    cli_runs.run("embed", workdir, CHUNK)
    return workdir


def test_a_killed_embed_resumes_to_the_uninterrupted_table(smoke_run, uninterrupted, tmp_path):
    workdir = _copy_without_embeddings(smoke_run, str(tmp_path / "run"))
    table = embed.embeddings_path(workdir, "test")
    proc = subprocess.Popen(cli_runs.command("embed", workdir, CHUNK), cwd=cli_runs.ROOT,
                            env=cli_runs.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(embedding_files.chunk_path(table, 0)):
        assert proc.poll() is None and time.time() < deadline, "no chunk was written"
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.3))  # somewhere in the middle
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = embedding_files.existing_chunks(table)
    assert not os.path.exists(os.path.join(table, embedding_files.MANIFEST)), \
        "the embed finished before it was killed"
    assert 1 <= len(done) < 13
    kept = {c: os.stat(p).st_mtime_ns for c, p in done.items()}

    rerun = cli_runs.run("embed", workdir, CHUNK)
    assert f"{len(done)} of this process's 13 chunks" in rerun.stdout
    for c, mtime in kept.items():  # kept, not recomputed
        assert os.stat(embedding_files.chunk_path(table, c)).st_mtime_ns == mtime
    assert not [p for p in os.listdir(table) if p.startswith(".tmp-")]
    got, meta, key = embed.read_embeddings(table)
    want, want_meta, want_key = embed.read_embeddings(embed.embeddings_path(uninterrupted,
                                                                            "test"))
    assert key == want_key and meta["n"] == 52 and got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_a_finished_table_is_reused_and_inputs_are_optional(uninterrupted, tmp_path):
    table = embed.embeddings_path(uninterrupted, "test")
    before = embedding_files.read_manifest(table)
    again = cli_runs.run("embed", uninterrupted, CHUNK)
    assert "embed: wrote" not in again.stdout
    assert embedding_files.read_manifest(table) == before
    arrays, meta, _ = embed.read_embeddings(table)
    assert {"image_inputs", "spectrum_inputs"} <= arrays.keys() and meta["inputs"]

    workdir = str(tmp_path / "run")
    shutil.copytree(uninterrupted, workdir)
    shutil.rmtree(embed.embeddings_path(workdir, "test"))
    cli_runs.run("embed", workdir, CHUNK, "--config.eval.embed_inputs=False")
    lean, _, lean_key = embed.read_embeddings(embed.embeddings_path(workdir, "test"))
    assert lean.keys() == arrays.keys() - {"image_inputs", "spectrum_inputs"}
    assert lean_key != embed.read_embeddings(table)[2]  # another table, another key
    for name, value in lean.items():
        np.testing.assert_array_equal(value, arrays[name], err_msg=name)
