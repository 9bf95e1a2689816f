"""The grain pipeline over a small prepared tfds dataset: batching, order, state, sharding, eval."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from astroclip_jax.data import builders, pipeline, prepare, preprocess, synthetic

N, SIZE, CROP = 50, 32, 16  # 40 train, 10 test
L = 7781


def _standin(n, seed=0, *, start=0, grid="desi", image_size=152):
    """A fast stand-in with the generator's API: galaxy i depends only on (seed, i)."""
    images, spectra = [], []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i])
        images.append(rng.normal(0.0, 0.2, size=(image_size, image_size, 3)).astype(np.float32))
        spectra.append((rng.normal(size=L) * (1 + i)).astype(np.float32))
    index = np.arange(start, start + n)
    out = {"image": np.stack(images), "spectrum": np.stack(spectra),
           "ivar": np.ones((n, L), np.float32), "targetid": (100 + index).astype(np.int64),
           "artefact": np.zeros(n, np.int8)}
    for k in builders._SYNTHETIC_EXTRA + ("redshift", "log_mstar"):
        out[k] = (0.01 * index).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
    cfg = builders.SyntheticDesiConfig(name="pipe", num_pairs=N, image_size=SIZE, block_size=25)
    config = dict(name="synthetic_desi", builder_config=cfg,
                  data_dir=str(tmp_path_factory.mktemp("tfds")), grid="desi", image_crop=CROP,
                  image_transform="stein_rgb", spectrum_norm="zscore", num_workers=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic, "generate", _standin)
        prepare.prepare(config)
    return config


def _records(config, split):
    source = tfds.data_source("synthetic_desi/pipe", split=split, data_dir=config["data_dir"],
                              download=False)
    return {int(source[i]["targetid"]): source[i] for i in range(len(source))}


def _take(iterator, k):
    return [next(iterator) for _ in range(k)]


def test_train_batches_follow_the_contract(data_config):
    records = _records(data_config, "train")
    batch = next(pipeline.train_loader(data_config, "train", 6, seed=0))
    dtypes = {"image": np.float32, "spectrum": np.float32, "targetid": np.int64,
              "redshift": np.float32, "z_hp": np.float32, "log_mstar": np.float32,
              "has_props": np.bool_}
    assert {k: v.dtype for k, v in batch.items()} == {k: np.dtype(v) for k, v in dtypes.items()}
    assert batch["image"].shape == (6, CROP, CROP, 3) and batch["spectrum"].shape == (6, L)
    for j, tid in enumerate(batch["targetid"]):
        rec = records[int(tid)]
        lo = SIZE // 2 - CROP // 2
        crop = rec["image"][lo:lo + CROP, lo:lo + CROP]
        np.testing.assert_allclose(batch["image"][j], preprocess.stein_rgb(crop), rtol=1e-6)
        s = rec["spectrum"].astype(np.float64)
        np.testing.assert_allclose(batch["spectrum"][j], (s - s.mean()) / max(s.std(), 0.2),
                                   rtol=1e-5, atol=1e-6)
        assert batch["z_hp"][j] == rec["z_hp"] and batch["has_props"][j]


def test_epochs_shuffle_and_drop_remainder(data_config):
    assert pipeline.steps_per_epoch(data_config, "train", 6) == 6  # 40 // 6, 4 dropped
    batches = _take(pipeline.train_loader(data_config, "train", 6, seed=3, num_epochs=2), 12)
    epochs = [np.concatenate([b["targetid"] for b in batches[e * 6:(e + 1) * 6]])
              for e in range(2)]
    for ids in epochs:
        assert len(set(ids.tolist())) == 36 and set(ids.tolist()) <= set(range(100, 140))
    assert epochs[0].tolist() != epochs[1].tolist()  # reshuffled each epoch
    assert epochs[0].tolist() != sorted(epochs[0].tolist())
    with pytest.raises(StopIteration):
        next(pipeline.train_loader(data_config, "train", 6, seed=3, num_epochs=0))
    again = _take(pipeline.train_loader(data_config, "train", 6, seed=3), 12)
    other = _take(pipeline.train_loader(data_config, "train", 6, seed=4), 1)
    assert all(np.array_equal(a["targetid"], b["targetid"]) for a, b in zip(batches, again))
    assert not np.array_equal(other[0]["targetid"], batches[0]["targetid"])


def test_state_restore_resumes_at_the_same_example(data_config):
    loader = pipeline.train_loader(data_config, "train", 6, seed=1)
    _take(loader, 4)
    state = loader.get_state()
    json.dumps(state)  # checkpointable as plain JSON
    expected = _take(loader, 5)  # crosses the epoch boundary at step 6
    resumed = pipeline.train_loader(data_config, "train", 6, seed=1)
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 5)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_processes_read_disjoint_parts_of_the_global_batch(data_config):
    whole = _take(pipeline.train_loader(data_config, "train", 8, seed=2), 7)
    parts = [_take(pipeline.train_loader(data_config, "train", 8, seed=2, process_index=p,
                                         process_count=2), 7) for p in range(2)]
    for step in range(7):
        a, b = parts[0][step]["targetid"], parts[1][step]["targetid"]
        assert len(a) == len(b) == 4 and not set(a.tolist()) & set(b.tolist())
        np.testing.assert_array_equal(np.concatenate([a, b]), whole[step]["targetid"])
        np.testing.assert_array_equal(
            np.concatenate([parts[0][step]["image"], parts[1][step]["image"]]),
            whole[step]["image"])
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        pipeline.train_loader(data_config, "train", 8, seed=2, process_count=3)


def test_eval_in_order_padded_with_mask(data_config):
    source = tfds.data_source("synthetic_desi/pipe", split="test",
                              data_dir=data_config["data_dir"], download=False)
    order = [int(source[i]["targetid"]) for i in range(len(source))]
    loader = pipeline.eval_loader(data_config, "test", 4)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [b["mask"].sum() for b in batches] == [4, 4, 2]
    ids = np.concatenate([b["targetid"][b["mask"]] for b in batches])
    assert ids.tolist() == order  # every example once, in record order
    last = batches[-1]
    assert last["targetid"][2:].tolist() == [-1, -1] and not last["has_props"][2:].any()
    assert np.isnan(last["z_hp"][2:]).all() and np.isnan(last["log_mstar"][2:]).all()
    assert (last["image"][2:] == 0).all() and (last["spectrum"][2:] == 0).all()
    assert len(list(loader)) == 3  # re-iterable

    shards = [list(pipeline.eval_loader(data_config, "test", 4, process_index=p,
                                        process_count=2)) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    for step in range(3):
        merged = np.concatenate([shards[p][step]["targetid"] for p in range(2)])
        np.testing.assert_array_equal(merged, batches[step]["targetid"])


def test_worker_processes_give_the_same_batches(data_config):
    threads = _take(pipeline.train_loader(data_config, "train", 6, seed=5), 3)
    config = dict(data_config, num_workers=1)
    loader = pipeline.train_loader(config, "train", 6, seed=5)
    try:
        procs = _take(loader, 3)
    finally:
        loader.close()
    for a, b in zip(threads, procs):
        np.testing.assert_array_equal(a["targetid"], b["targetid"])
        np.testing.assert_array_equal(a["image"], b["image"])


def test_config_errors(data_config):
    with pytest.raises(ValueError, match="wavelength grid mismatch: data has 7781 pixels"):
        pipeline.train_loader(dict(data_config, grid="sdss"), "train", 6, seed=0)
    with pytest.raises(FileNotFoundError, match="not prepared.*--mode=prepare"):
        pipeline.train_loader(dict(data_config, builder_config="small",
                                   data_dir=data_config["data_dir"] + "/nothing"),
                              "train", 6, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch of 64"):
        pipeline.train_loader(data_config, "train", 64, seed=0)
