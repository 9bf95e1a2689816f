"""The grain pipeline over a small prepared tfds dataset: batching, the training order, resuming
at a step, sharding over processes, eval, random access to preprocessed records."""

import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from astroclip_jax import settings
from astroclip_jax.data import builders, pipeline, prepare, preprocess, synthetic
from configs import spender

N, SIZE, CROP = 50, 32, 16  # 40 train, 10 test
L = 7781
G = 6  # global batch: 6 steps per epoch of 40 train records, 4 dropped


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
def data(tmp_path_factory):
    cfg = builders.SyntheticDesiConfig(name="pipe", num_pairs=N, image_size=SIZE, block_size=25)
    smoke = settings.resolve(spender.get_config("smoke")).data
    data = dataclasses.replace(smoke, builder_config=cfg,
                               data_dir=str(tmp_path_factory.mktemp("tfds")), grid="desi",
                               image_crop=CROP, image_transform="stein_rgb",
                               spectrum_norm="zscore", num_workers=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic, "generate", _standin)
        prepare.prepare(data)
    return data


def _source(data, split):
    return tfds.data_source("synthetic_desi/pipe", split=split, data_dir=data.data_dir,
                            download=False)


def _records(data, split):
    source = _source(data, split)
    return {int(source[i]["targetid"]): source[i] for i in range(len(source))}


def _targetids(data, split):
    """targetid of each record index of the split, read straight from tfds."""
    source = _source(data, split)
    return np.array([int(source[i]["targetid"]) for i in range(len(source))])


def _take(iterator, k):
    return [next(iterator) for _ in range(k)]


def _loader(data, seed, **kwargs):
    return pipeline.TrainLoader(data, "train", kwargs.pop("batch", G), seed, **kwargs)


def _assert_preprocessed(image, spectrum, scale, record):
    """One preprocessed row against its raw record: centre slice + Stein RGB, float64 z-score."""
    lo = SIZE // 2 - CROP // 2
    crop = record["image"][lo:lo + CROP, lo:lo + CROP]
    np.testing.assert_allclose(image, preprocess.stein_rgb(crop), rtol=1e-6)
    s = record["spectrum"].astype(np.float64)
    std = max(s.std(), 0.2)
    np.testing.assert_allclose(spectrum, (s - s.mean()) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scale, std, rtol=1e-6)


def test_train_batches_follow_the_contract(data):
    records = _records(data, "train")
    with _loader(data, 0) as loader:
        batch = next(loader)
    dtypes = {"image": np.float32, "spectrum": np.float32, "spectrum_scale": np.float32,
              "targetid": np.int64, "redshift": np.float32, "z_hp": np.float32,
              "log_mstar": np.float32, "has_props": np.bool_}
    assert {k: v.dtype for k, v in batch.items()} == {k: np.dtype(v) for k, v in dtypes.items()}
    assert batch["image"].shape == (G, CROP, CROP, 3) and batch["spectrum"].shape == (G, L)
    assert batch["spectrum_scale"].shape == (G,)
    for j, tid in enumerate(batch["targetid"]):
        rec = records[int(tid)]
        _assert_preprocessed(batch["image"][j], batch["spectrum"][j], batch["spectrum_scale"][j],
                             rec)
        assert batch["z_hp"][j] == rec["z_hp"] and batch["has_props"][j]


def test_epochs_shuffle_and_drop_remainder(data):
    assert pipeline.steps_per_epoch(40, G) == 6  # 40 // 6, 4 dropped
    loader = _loader(data, 3, num_epochs=2)
    assert loader.steps_per_epoch == 6
    batches = _take(loader, 12)
    with pytest.raises(StopIteration):  # two epochs of 6 steps, then the end
        next(loader)
    epochs = [np.concatenate([b["targetid"] for b in batches[e * 6:(e + 1) * 6]])
              for e in range(2)]
    for ids in epochs:
        assert len(set(ids.tolist())) == 36 and set(ids.tolist()) <= set(range(100, 140))
    assert epochs[0].tolist() != epochs[1].tolist()  # reshuffled each epoch
    assert epochs[0].tolist() != sorted(epochs[0].tolist())
    with pytest.raises(StopIteration):
        next(_loader(data, 3, num_epochs=0))
    again = _take(_loader(data, 3), 12)
    other = _take(_loader(data, 4), 1)
    assert all(np.array_equal(a["targetid"], b["targetid"]) for a, b in zip(batches, again))
    assert not np.array_equal(other[0]["targetid"], batches[0]["targetid"])


def test_start_step_resumes_at_the_same_example(data):
    """A loader started at step s yields exactly the batches s, s+1, ... of one started at 0
    (here across the epoch boundary at step 6): the data position is the state's step."""
    expected = _take(_loader(data, 1), 10)[4:]
    resumed = _take(_loader(data, 1, start_step=4), 6)
    for a, b in zip(expected, resumed):
        assert sorted(a) == sorted(b)
        np.testing.assert_array_equal(a["targetid"], b["targetid"])
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # Resuming in the middle of a later epoch, and with a finite run: the same steps, then the end.
    late = _loader(data, 1, start_step=9, num_epochs=2)
    assert [b["targetid"].tolist() for b in _take(late, 3)] == [
        b["targetid"].tolist() for b in _take(_loader(data, 1), 12)[9:]]
    with pytest.raises(StopIteration):
        next(late)


def test_step_indices_is_the_training_order(data):
    """`step_indices` (what the cached step reads) names the records TrainLoader yields, and
    epoch e is the permutation rng([seed, e]) cut into global batches."""
    ids = _targetids(data, "train")
    assert len(ids) == 40
    whole = _take(_loader(data, 2), 9)
    for step, batch in enumerate(whole):
        indices = pipeline.step_indices(40, 2, step, G)
        np.testing.assert_array_equal(ids[indices], batch["targetid"])
        epoch, within = divmod(step, 6)
        permutation = np.random.default_rng([2, epoch]).permutation(40)
        np.testing.assert_array_equal(indices, permutation[within * G:(within + 1) * G])
    epoch0 = np.concatenate([pipeline.step_indices(40, 2, s, G) for s in range(6)])
    assert len(set(epoch0.tolist())) == 36 and set(epoch0.tolist()) <= set(range(40))


def test_processes_read_disjoint_parts_of_the_global_batch(data):
    ids = _targetids(data, "train")
    whole = _take(_loader(data, 2, batch=8), 7)
    parts = [_take(_loader(data, 2, batch=8, process_index=p, process_count=2), 7)
             for p in range(2)]
    rows = [pipeline.process_rows(8, p, 2) for p in range(2)]
    assert rows == [slice(0, 4), slice(4, 8)]
    for step in range(7):
        a, b = parts[0][step]["targetid"], parts[1][step]["targetid"]
        assert len(a) == len(b) == 4 and not set(a.tolist()) & set(b.tolist())
        np.testing.assert_array_equal(np.concatenate([a, b]), whole[step]["targetid"])
        np.testing.assert_array_equal(
            np.concatenate([parts[0][step]["image"], parts[1][step]["image"]]),
            whole[step]["image"])
        indices = pipeline.step_indices(40, 2, step, 8)
        for p in range(2):  # each process's rows of the one training order
            np.testing.assert_array_equal(ids[indices[rows[p]]], parts[p][step]["targetid"])
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        _loader(data, 2, batch=8, process_count=3)
    with pytest.raises(ValueError, match=r"process_index 2 outside \[0, 2\)"):
        pipeline.process_rows(8, 2, 2)


def test_eval_in_order_padded_with_mask(data):
    order = _targetids(data, "test").tolist()
    loader = pipeline.EvalLoader(data, "test", 4)
    assert len(loader.source) == 10
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

    shards = [list(pipeline.EvalLoader(data, "test", 4, process_index=p, process_count=2))
              for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    for step in range(3):
        merged = np.concatenate([shards[p][step]["targetid"] for p in range(2)])
        np.testing.assert_array_equal(merged, batches[step]["targetid"])


def test_preprocessed_records_random_access(data):
    """What the feature cache reads: rows in the order asked for, preprocessed as the loaders."""
    source = _source(data, "train")
    records = pipeline.PreprocessedRecords(data, "train")
    assert len(records) == 40
    indices = [5, 0, 39, 5]
    out = records.batch(indices)
    assert sorted(out) == ["image", "spectrum", "spectrum_scale"]
    assert all(v.dtype == np.float32 and len(v) == 4 for v in out.values())
    for j, i in enumerate(indices):
        _assert_preprocessed(out["image"][j], out["spectrum"][j], out["spectrum_scale"][j],
                             source[i])
    raw = pipeline.read_records(source, indices, ("targetid", "spectrum"))
    assert sorted(raw) == ["spectrum", "targetid"] and raw["targetid"].dtype == np.int64
    np.testing.assert_array_equal(raw["targetid"], [source[i]["targetid"] for i in indices])
    np.testing.assert_array_equal(raw["spectrum"][1], source[0]["spectrum"])  # raw: not z-scored


def test_worker_processes_give_the_same_batches(data):
    threads = _take(_loader(data, 5), 3)
    with _loader(dataclasses.replace(data, num_workers=1), 5) as loader:
        procs = _take(loader, 3)
    for a, b in zip(threads, procs):
        np.testing.assert_array_equal(a["targetid"], b["targetid"])
        np.testing.assert_array_equal(a["image"], b["image"])


def test_config_errors(data):
    with pytest.raises(ValueError, match="wavelength grid mismatch: data has 7781 pixels"):
        _loader(dataclasses.replace(data, grid="sdss"), 0)
    with pytest.raises(FileNotFoundError, match="not prepared.*--mode=prepare"):
        _loader(dataclasses.replace(data, builder_config="small",
                                    data_dir=data.data_dir + "/nothing"), 0)
    with pytest.raises(ValueError, match="fewer than one global batch of 64"):
        _loader(data, 0, batch=64)
