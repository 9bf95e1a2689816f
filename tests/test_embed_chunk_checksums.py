"""Every chunk of an unfinished embeddings table carries the checksum of the bytes written: an
embed interrupted after seven chunks, five of them then damaged in five ways (bytes flipped,
truncated, a valid Parquet file of the same schema and metadata with other values, another
chunk with its own record, no record), resumes to exactly the table of a clean run (the same
computation on the same device, so bitwise), keeping the chunks that are whole and saying in
one line each which ones it computes again."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cli_runs
from astroclip_jax import settings as settings_lib
from astroclip_jax.evaluation import embed_rows, embedding_files, embeddings
from configs import spender

CHUNK = 4  # the 52 tiny test galaxies in 13 chunks


class Interrupted(Exception):
    pass


def _settings():
    config = spender.get_config("smoke")
    config.data.data_dir = cli_runs.DATA_DIR
    config.eval.embed_chunk_rows = CHUNK
    return settings_lib.resolve(config)


def _copy(smoke_run, workdir):
    shutil.copytree(smoke_run, workdir, ignore=shutil.ignore_patterns(embeddings.EMBEDDINGS_DIR))
    return str(workdir)


@pytest.fixture(scope="module")
def clean(smoke_run, tmp_path_factory):
    workdir = _copy(smoke_run, tmp_path_factory.mktemp("clean") / "run")
    directory, _, _ = embeddings.ensure_embeddings(_settings(), workdir, log=lambda line: None)
    return embeddings.read_embeddings(directory)


def _interrupt_after(monkeypatch, chunks: int):
    """rows_for whose rows fail to read from chunk `chunks` on, as a killed embed stops."""
    real = embed_rows.rows_for

    def rows_for(settings, data, trained):
        rows = real(settings, data, trained)

        def read(start, stop):
            if start >= chunks * CHUNK:
                raise Interrupted
            return rows.read(start, stop)
        return dataclasses.replace(rows, read=read)

    monkeypatch.setattr(embeddings, "rows_for", rows_for)


DAMAGE = {1: "flip", 2: "truncate", 3: "other_values", 4: "other_chunk", 5: "no_record"}
WHOLE = (0, 6)


def _damage(table: str, kind: str, chunk: int) -> None:
    path = embedding_files.chunk_path(table, chunk)
    if kind == "flip":
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif kind == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif kind == "other_values":  # valid Parquet, same schema and metadata, other embeddings
        meta = embedding_files.chunk_meta(path)
        table_ = pq.read_table(path)
        i = table_.schema.get_field_index("image_embedding")
        field = table_.schema.field(i)
        flat = -table_.column(i).combine_chunks().flatten().to_numpy()
        pq.write_table(table_.set_column(i, field, pa.FixedSizeListArray.from_arrays(
            pa.array(flat), field.type.list_size)), path)
        assert embedding_files.chunk_meta(path) == meta
    elif kind == "other_chunk":  # a whole chunk with its own valid record, of other rows
        other = embedding_files.chunk_path(table, WHOLE[-1])
        shutil.copy(other, path)
        shutil.copy(embedding_files.checksum_path(other), embedding_files.checksum_path(path))
    elif kind == "no_record":  # killed between writing the chunk and its record
        os.remove(embedding_files.checksum_path(path))


def test_damaged_chunks_of_an_unfinished_table_are_computed_again(smoke_run, clean, tmp_path,
                                                                  monkeypatch):
    workdir = _copy(smoke_run, tmp_path / "run")
    table = embeddings.embeddings_path(workdir, "test")
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 7)
        with pytest.raises(Interrupted):
            embeddings.ensure_embeddings(_settings(), workdir, log=lambda line: None)
    assert sorted(embedding_files.existing_chunks(table)) == list(range(7))
    assert not os.path.exists(os.path.join(table, embedding_files.MANIFEST))
    for chunk, kind in DAMAGE.items():
        _damage(table, kind, chunk)
    kept = {c: os.stat(embedding_files.chunk_path(table, c)).st_mtime_ns for c in WHOLE}

    lines = []
    directory, manifest, _ = embeddings.ensure_embeddings(_settings(), workdir, log=lines.append)
    for chunk, kind in DAMAGE.items():
        said = [line for line in lines if embedding_files.chunk_path(table, chunk) in line]
        assert len(said) == 1 and said[0].endswith("computing it again"), (kind, lines)
    assert f"{len(WHOLE)} of this process's 13 chunks" in "\n".join(lines)
    for c, mtime in kept.items():  # whole chunks are kept, not recomputed
        assert os.stat(embedding_files.chunk_path(table, c)).st_mtime_ns == mtime
    assert sorted(os.listdir(table)) == sorted(
        [os.path.basename(embedding_files.chunk_path(table, c)) for c in range(13)]
        + [embedding_files.MANIFEST])  # the records are in the manifest now
    got, meta, key = embeddings.read_embeddings(directory)
    want, want_meta, want_key = clean
    assert key == want_key and meta["n"] == manifest["n"] == 52 and got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_sealing_refuses_a_chunk_that_does_not_match_its_record(tmp_path):
    directory = str(tmp_path / "t")
    arrays = {"image_embedding": np.eye(3, dtype=np.float32), "index": np.arange(3)}
    for c in range(3):
        embedding_files.write_chunk(directory, c, {k: v[c:c + 1] for k, v in arrays.items()},
                                    {"embeddings_key": "k", "start": c, "stop": c + 1,
                                     "rows": 1})
        assert embedding_files.chunk_problem(embedding_files.chunk_path(directory, c)) is None
    _damage(directory, "other_values", 1)
    path = embedding_files.chunk_path(directory, 1)
    problem = r"(does not match its checksum|has \d+ bytes, \d+ were written)"
    assert re.fullmatch(problem, embedding_files.chunk_problem(path))
    with pytest.raises(embedding_files.DataError, match=f"embeddings chunk {path} {problem}"):
        embedding_files.write_manifest(directory, "k", {}, range(3))
    assert not os.path.exists(os.path.join(directory, embedding_files.MANIFEST))
