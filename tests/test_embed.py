"""The embeddings table: pooling vs loops, Parquet round trip (pandas, astropy), its key, reuse/stale logic, result
guard; end to end, `--mode=embed` on a one-epoch smoke run equals the notebook Embedder on raw
records, preprocessed as the run was."""

import dataclasses
import json
import os
import types

import jax
import numpy as np
import pytest

import cli_runs
from astroclip_jax import settings as settings_lib
from astroclip_jax.data import pipeline, preprocess
from astroclip_jax.evaluation import embed, embeddings, restore, runner
from configs import spender


def test_pool_and_bin_equal_loops():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 10, 9, 3)).astype(np.float32)
    pooled = embed.pool_images(images, 4)
    want = np.zeros((2, 2, 2, 3))
    for n in range(2):
        for i in range(2):
            for j in range(2):
                want[n, i, j] = images[n, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean(axis=(0, 1))
    np.testing.assert_allclose(pooled, want, rtol=1e-6)
    spectra = rng.normal(size=(3, 21)).astype(np.float32)
    binned = embed.bin_spectra(spectra, 8)
    want = np.array([[s[8 * b:8 * b + 8].mean() for b in range(2)] for s in spectra])
    np.testing.assert_allclose(binned, want, rtol=1e-6)


def _arrays(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"image_embedding": rng.normal(size=(n, 4)).astype(np.float32),
            "targetid": np.arange(n, dtype=np.int64) + 2 ** 40,
            "has_props": np.array([True, False] * (n // 2) + [True] * (n % 2)),
            "artefact": np.zeros(n, np.int8), "z_hp": np.full(n, np.nan, np.float32)}


def test_table_round_trip_keeps_dtypes_and_is_read_by_pandas_and_astropy(tmp_path):
    import pandas as pd
    from astropy.table import Table

    path = str(tmp_path / "e" / "test")
    arrays = {**_arrays(), "image_inputs": np.arange(5 * 12, dtype=np.float16).reshape(5, 2, 2, 3)}
    embed.write_embeddings(path, arrays, {"split": "test", "n": 5}, "key1", chunk_rows=2)
    got, meta, key = embed.read_embeddings(path)
    assert key == "key1" and meta == {"split": "test", "n": 5}
    for name, value in arrays.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value)
    chunks = [f"chunk-00000{i}.parquet" for i in range(3)]
    assert sorted(os.listdir(path)) == sorted(chunks + ["_manifest.json"])  # no temporaries
    assert [len(c["targetid"]) for c in embed.iter_embedding_chunks(path, ["targetid"])] == [2, 2, 1]
    # Readable without this package: pandas reads the directory, astropy one chunk.
    frame = pd.read_parquet(path)
    np.testing.assert_array_equal(frame["targetid"], arrays["targetid"])
    np.testing.assert_array_equal(np.stack(frame["image_embedding"]), arrays["image_embedding"])
    table = Table.read(os.path.join(path, chunks[0]))
    np.testing.assert_array_equal(table["image_embedding"], arrays["image_embedding"][:2])
    assert table["targetid"][0] == 2 ** 40


def _run_settings(**data):
    """The smoke settings with `data` fields replaced."""
    settings = settings_lib.resolve(spender.get_config("smoke"))
    return dataclasses.replace(settings, data=dataclasses.replace(settings.data, **data))


def _params(value):
    return {"image_head": {"params": {"kernel": np.full((3, 2), value, np.float32)}},
            "spectrum_head": {"params": {"bias": np.arange(4, dtype=np.float32)}}}


def test_embeddings_key_follows_params_data_and_split_not_paths():
    data = _run_settings(data_dir="/data/tfds").data
    key = embed.embeddings_key(_params(0.5), data, "test")
    assert len(key) == 20 and int(key, 16) >= 0
    assert embed.embeddings_key(jax.tree.map(np.copy, _params(0.5)), data, "test") == key
    # Where the files sit is not what the rows depend on.
    for moved in (dict(data_dir="/data/tfds/"), dict(data_dir="/elsewhere"), dict(data_dir=None),
                  dict(manual_dir="/m"), dict(provabgs_path="/p.h5"), dict(num_workers=4)):
        assert embed.embeddings_key(_params(0.5), dataclasses.replace(data, **moved),
                                    "test") == key, moved
    # One parameter one ulp off, another split, dataset or host preprocessing: another key.
    nudged = _params(0.5)
    nudged["spectrum_head"]["params"]["bias"][2] = np.nextafter(np.float32(2), np.float32(3))
    assert embed.embeddings_key(nudged, data, "test") != key
    assert embed.embeddings_key(_params(0.5), data, "train") != key
    for changed in (dict(builder_config="small"), dict(name="astroclip_desi"),
                    dict(grid="sdss"), dict(image_crop=24), dict(image_transform="raw"),
                    dict(spectrum_norm="none")):
        assert embed.embeddings_key(_params(0.5), dataclasses.replace(data, **changed),
                                    "test") != key, changed


def test_reuse_and_stale_file_kept(tmp_path, monkeypatch):
    run = _run_settings()  # the run's own settings, as its checkpoint stores them
    trained = {"step": 6, "params": _params(0.5)}
    computed = []
    monkeypatch.setattr(embeddings.restore, "restore_trained_model", lambda workdir, which: (
        types.SimpleNamespace(settings=run, **trained)))

    last = {}

    def fake_rows(settings, data, trained_model):  # what would be embedded
        last["data"] = data
        return embed.RowsToEmbed(name="test", n=5, modalities=(), read=None, identity="test", meta={})

    def fake_compute(trained_model, rows, directory, key, *args, **kwargs):
        computed.append(last["data"])
        step = trained_model.step
        embed.write_embeddings(directory, _arrays(seed=step),
                               {"split": "test", "n": 5, "checkpoint": {"step": step}}, key)
        return embed.embedding_manifest(directory)

    monkeypatch.setattr(embeddings, "rows_for", fake_rows)
    monkeypatch.setattr(embeddings, "embed_to_directory", fake_compute)
    cli = _run_settings(data_dir="/data/tfds")
    a1, _, data = embed.load_or_compute_embeddings(cli, str(tmp_path))
    # The dataset the command line names, preprocessed as the run's model saw its data.
    assert computed == [data] and data == embed.data_for_run(cli.data, run)
    assert data.data_dir == "/data/tfds"
    a2, _, _ = embed.load_or_compute_embeddings(cli, str(tmp_path))
    np.testing.assert_array_equal(a1["image_embedding"], a2["image_embedding"])
    # The same rows whatever the path to the data or the command line's preprocessing:
    # reused, not recomputed.
    for other in (_run_settings(data_dir="/data/tfds/"), _run_settings(data_dir="/moved"),
                  _run_settings(data_dir="/data/tfds", image_transform="raw", image_crop=16)):
        embed.load_or_compute_embeddings(other, str(tmp_path))
    assert len(computed) == 1
    path = tmp_path / "embeddings" / "test"
    old_key = embed.read_embeddings(str(path))[2]
    assert old_key == embed.embeddings_key(_params(0.5), data, "test", {"inputs": True})

    trained.update(step=12, params=_params(0.25))  # a new best checkpoint: recompute
    a3, meta, _ = embed.load_or_compute_embeddings(cli, str(tmp_path))
    assert len(computed) == 2 and meta["checkpoint"]["step"] == 12
    assert embed.read_embeddings(str(path))[2] == embed.embeddings_key(
        _params(0.25), data, "test", {"inputs": True})
    # The old table is kept under its step and the first 8 characters of its key.
    assert sorted(os.listdir(tmp_path / "embeddings")) == sorted(
        ["test", f"test-step6-{old_key[:8]}"])
    old, old_meta, kept_key = embed.read_embeddings(
        str(tmp_path / "embeddings" / f"test-step6-{old_key[:8]}"))
    assert kept_key == old_key and old_meta["checkpoint"]["step"] == 6
    np.testing.assert_array_equal(old["image_embedding"], a1["image_embedding"])
    assert not np.array_equal(a3["image_embedding"], a1["image_embedding"])


def test_result_dir_refuses_to_overwrite(tmp_path):
    out = runner.result_dir(str(tmp_path), "eval_knn", overwrite=False)
    assert out == str(tmp_path / "eval_knn") and not os.path.exists(out)  # creates nothing
    runner.write_json(os.path.join(out, runner.RESULT_FILE), {"r2": np.float32(0.5)})
    with open(os.path.join(out, runner.RESULT_FILE)) as f:
        assert json.load(f) == {"r2": 0.5}
    with pytest.raises(runner.ResultExists, match="overwrite"):
        runner.result_dir(str(tmp_path), "eval_knn", overwrite=False)
    assert runner.result_dir(str(tmp_path), "eval_knn", overwrite=True) == out


def test_missing_checkpoint_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="mode=train"):
        restore.restore_trained_model(str(tmp_path), "best")
    with pytest.raises(FileNotFoundError, match="mode=train"):
        embed.load_or_compute_embeddings(_run_settings(), str(tmp_path))
    assert not os.path.exists(tmp_path / "embeddings")


def _raw_records(data, split):
    source = pipeline.data_source(data, split)
    return pipeline.read_records(source, np.arange(len(source)))


def test_embed_mode_equals_notebook_embedder_with_the_runs_preprocessing(smoke_run):
    """`--mode=embed` writes what the notebook Embedder gives on the raw records, with the
    RUN's host preprocessing: a command line asking for another image transform and spectrum
    normalisation changes nothing."""
    cli_runs.run("embed", smoke_run, "--config.data.image_transform=raw",
                 "--config.data.spectrum_norm=none")
    arrays, meta, _ = embed.read_embeddings(embed.embeddings_path(smoke_run, "test"))
    assert meta["inputs"] and meta["chunk_rows"] == 4096
    embedder = restore.load_embedder(smoke_run, "best")
    run_data = embedder.trained.settings.data
    assert (run_data.image_transform, run_data.spectrum_norm) == ("stein_rgb", "zscore")
    assert meta["image_transform"] == "stein_rgb" and meta["n"] == 52  # the tiny test split
    assert meta["checkpoint"]["step"] == embedder.step == 6

    raw = _raw_records(dataclasses.replace(run_data, data_dir=cli_runs.DATA_DIR), "test")
    np.testing.assert_array_equal(arrays["targetid"], raw["targetid"])
    np.testing.assert_array_equal(arrays["index"], np.arange(52))
    image_emb = embedder.embed_images(raw["image"])
    spectrum_emb = embedder.embed_spectra(raw["spectrum"])
    # float32 on differently batched calls (embed mode: batches of 32; the Embedder: one
    # call, padded to 128 rows).
    np.testing.assert_allclose(arrays["image_embedding"], image_emb, rtol=0, atol=1e-5)
    np.testing.assert_allclose(arrays["spectrum_embedding"], spectrum_emb, rtol=0, atol=1e-5)
    # The pooled model inputs are the run's preprocessed inputs too (stored as float16).
    np.testing.assert_allclose(arrays["image_inputs"],
                               embed.pool_images(embedder.preprocess_images(raw["image"])),
                               rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(arrays["spectrum_inputs"],
                               embed.bin_spectra(embedder.preprocess_spectra(raw["spectrum"])),
                               rtol=1e-3, atol=1e-3)
    # ... and the command line's preprocessing would have given other embeddings.
    raw_run = dataclasses.replace(run_data, image_transform="raw")
    other = embedder.embed_images(preprocess.preprocess_images(raw["image"], raw_run),
                                  preprocessed=True)
    assert np.abs(other - image_emb).max() > 1e-2
