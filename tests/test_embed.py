"""The embeddings file: pooling vs loops, HDF5 round trip, reuse/stale logic, result guard.

End to end (embed mode == notebook Embedder on raw records) on a one-epoch smoke run trained by
the test, or on the run that ASTROCLIP_EVAL_WORKDIR names (ASTROCLIP_EVAL_DATA_DIR for its data).
"""

import os

import h5py
import numpy as np
import pytest

from astroclip_jax.evaluation import embed, plots


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


def test_hdf5_round_trip_keeps_dtypes(tmp_path):
    path = str(tmp_path / "e" / "test.h5")
    arrays = _arrays()
    embed.write_embeddings(path, arrays, {"split": "test", "n": 5}, "key1")
    got, meta, key = embed.read_embeddings(path)
    assert key == "key1" and meta == {"split": "test", "n": 5}
    for name, value in arrays.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value)
    assert os.listdir(tmp_path / "e") == ["test.h5"]  # no temporary left behind
    with h5py.File(path, "r") as f:  # readable by plain h5py
        assert f["targetid"][0] == 2 ** 40


def test_reuse_and_stale_file_kept(tmp_path, monkeypatch):
    from ml_collections import ConfigDict

    config = ConfigDict({"eval": {"split": "test", "checkpoint": "best"},
                         "data": {"name": "synthetic_desi", "builder_config": "tiny"}})
    state = {"step": 6, "computed": 0}
    monkeypatch.setattr(embed, "resolve_checkpoint",
                        lambda workdir, which: (str(tmp_path / "checkpoints"), state["step"]))

    def fake_compute(config, workdir, split, which):
        state["computed"] += 1
        return _arrays(seed=state["step"]), {"split": split, "n": 5,
                                             "checkpoint": {"step": state["step"]}}

    monkeypatch.setattr(embed, "compute_embeddings", fake_compute)
    a1, _ = embed.load_or_compute_embeddings(config, str(tmp_path))
    a2, _ = embed.load_or_compute_embeddings(config, str(tmp_path))
    assert state["computed"] == 1
    np.testing.assert_array_equal(a1["image_embedding"], a2["image_embedding"])
    state["step"] = 12  # a new best checkpoint: recompute, keep the old file under its step
    a3, meta = embed.load_or_compute_embeddings(config, str(tmp_path))
    assert state["computed"] == 2 and meta["checkpoint"]["step"] == 12
    old, _, _ = embed.read_embeddings(str(tmp_path / "embeddings" / "test-step6.h5"))
    np.testing.assert_array_equal(old["image_embedding"], a1["image_embedding"])


def test_result_dir_refuses_to_overwrite(tmp_path):
    out = plots.result_dir(str(tmp_path), "eval_knn", "results.json", overwrite=False)
    plots.write_json(os.path.join(out, "results.json"), {"r2": np.float32(0.5)})
    with pytest.raises(plots.ResultExists, match="overwrite"):
        plots.result_dir(str(tmp_path), "eval_knn", "results.json", overwrite=False)
    assert plots.result_dir(str(tmp_path), "eval_knn", "results.json", overwrite=True) == out


def test_missing_checkpoint_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="mode=train"):
        embed.resolve_checkpoint(str(tmp_path), "best")


def test_embed_file_equals_notebook_embedder(tmp_path):
    """Embed mode's file equals the notebook Embedder on raw records. Uses the run named by
    ASTROCLIP_EVAL_WORKDIR, else trains a one-epoch smoke run here."""
    import subprocess
    import sys
    import tempfile

    from configs import spender

    from astroclip_jax.evaluation import restore

    config = spender.get_config("smoke")
    workdir = os.environ.get("ASTROCLIP_EVAL_WORKDIR")
    if workdir:
        config.data.data_dir = os.environ.get("ASTROCLIP_EVAL_DATA_DIR") or config.data.data_dir
    else:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # The prepared tiny dataset shared with the other tests that run main.py.
        config.data.data_dir = os.path.join(tempfile.gettempdir(), "astroclip_jax_test_tfds")
        workdir = str(tmp_path / "smoke")
        proc = subprocess.run(
            [sys.executable, "main.py", "--config=configs/spender.py:smoke", "--mode=train",
             f"--workdir={workdir}", f"--config.data.data_dir={config.data.data_dir}",
             "--config.train.epochs=1"],
            cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
            timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    diff = restore.verify_round_trip(config, workdir, n=16)
    assert max(diff.values()) <= 1e-5
