"""Nothing lost, nothing silent: a busy work directory, damaged checkpoints, a diverging run and
bad settings, each as a user meets them.

Every user mistake ends in one line `error: ...` (exit 1, no traceback, nothing half written);
a damaged checkpoint step is named and skipped, and training resumes from the newest intact step
to the same state an undamaged resume from that step reaches.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import cli_runs
from astroclip_jax import settings
from astroclip_jax.errors import ConfigError, DataError, TrainingDiverged
from astroclip_jax.evaluation import embed
from astroclip_jax.training import checkpoint, contrastive, steps
from configs import spender

STEPS_PER_EPOCH = 6  # smoke: 204 training pairs, batch 32


def _fails_in_one_line(proc, *needles):
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for needle in needles:
        assert needle in last, last
    return last


def _cli(mode, workdir, *overrides, timeout=600):
    return subprocess.run(cli_runs.command(mode, workdir, *overrides), cwd=cli_runs.ROOT,
                          env=cli_runs.env(), capture_output=True, text=True, timeout=timeout)


def _state(workdir, step):
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    return jax.device_get(ckpt.restore(step)[0])


def _assert_states_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
    """A smoke run of 3 epochs: checkpoints at steps 6, 12 and 18."""
    workdir = str(tmp_path_factory.mktemp("three") / "run")
    cli_runs.run("train", workdir, "--config.train.epochs=3")
    return workdir


def _copy(workdir, tmp_path):
    dest = str(tmp_path / "copy")
    shutil.copytree(workdir, dest, ignore=shutil.ignore_patterns(".lock-*"))
    return dest


# ------------------------------------------------------------------------------- one writer

def test_second_training_stops_at_once_and_the_first_is_unharmed(tmp_path, smoke_run):
    workdir = str(tmp_path / "shared")
    first = subprocess.Popen(cli_runs.command("train", workdir, "--config.train.epochs=1"),
                             cwd=cli_runs.ROOT, env=cli_runs.env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    lock = os.path.join(workdir, ".lock-writer")
    deadline = time.time() + 120
    while not (os.path.exists(lock) and os.path.getsize(lock)) and time.time() < deadline:
        time.sleep(0.1)
    t0 = time.time()
    second = _cli("train", workdir, "--config.train.epochs=1")
    elapsed = time.time() - t0
    _fails_in_one_line(second, "in use by training", f"pid {first.pid}")
    assert elapsed < 5, f"the second training took {elapsed:.1f} s to stop"
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    # The first run ends exactly where a lone run of the same config ends.
    _assert_states_equal(_state(workdir, STEPS_PER_EPOCH), _state(smoke_run, STEPS_PER_EPOCH))


# ------------------------------------------------------------------------------- checkpoints

def _largest_file(folder):
    paths = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]
    return max(paths, key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_file(os.path.join(step_dir, "state"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garbage_manifest(step_dir):
    with open(os.path.join(step_dir, "state", "manifest.ocdbt"), "wb") as f:
        f.write(b"not a manifest")


def _delete_state_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _empty(step_dir):
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


def _flip_a_bit(step_dir):
    path = _largest_file(os.path.join(step_dir, "state"))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def _garbage_metrics(step_dir):
    with open(os.path.join(step_dir, "metrics", "metrics"), "w") as f:
        f.write("{not json")


DAMAGE = {"truncated": _truncate, "garbage_manifest": _garbage_manifest,
          "deleted_metadata": _delete_state_metadata, "empty_step": _empty,
          "bit_flip": _flip_a_bit, "garbage_metrics": _garbage_metrics}


@pytest.mark.parametrize("where", ["latest", "oldest"])
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_step_is_named_and_skipped(three_epochs, tmp_path, kind, where):
    workdir = _copy(three_epochs, tmp_path)
    bad = {"latest": 18, "oldest": 6}[where]
    DAMAGE[kind](os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(bad)))

    reader = checkpoint.Checkpointer(workdir, read_only=True)  # evaluation: looks, moves nothing
    assert set(reader.damaged) == {bad} and reader.latest_step() == (12 if bad == 18 else 18)
    assert reader.best_step() != bad
    assert os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(bad)))

    writer = checkpoint.Checkpointer(workdir)  # training: sets it aside before Orbax starts
    try:
        assert set(writer.damaged) == {bad}
        step = writer.latest_step()
        _assert_states_equal(jax.device_get(writer.restore(step)[0]), _state(three_epochs, step))
    finally:
        writer.close()
    assert os.path.isdir(os.path.join(workdir, checkpoint.DAMAGED_DIR, str(bad)))
    assert not os.path.exists(os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(bad)))


def test_training_resumes_from_the_newest_intact_step(three_epochs, tmp_path):
    workdir = _copy(three_epochs, tmp_path)
    _flip_a_bit(os.path.join(workdir, checkpoint.CHECKPOINT_DIR, "18"))
    proc = cli_runs.run("train", workdir, "--config.train.epochs=3")
    assert "checkpoint step 18" in proc.stderr and "damaged" in proc.stderr
    # Epoch 3 redone from step 12 reaches the state the undamaged run saved at step 18.
    _assert_states_equal(_state(workdir, 18), _state(three_epochs, 18))


def test_evaluation_uses_the_best_intact_checkpoint(three_epochs, tmp_path):
    workdir = _copy(three_epochs, tmp_path)
    best = checkpoint.Checkpointer(workdir, read_only=True).best_step()
    _garbage_manifest(os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(best)))
    proc = cli_runs.run("eval_knn", workdir)
    assert f"checkpoint step {best}" in proc.stderr and "damaged" in proc.stderr
    with open(os.path.join(workdir, "eval_knn", "results.json")) as f:
        used = json.load(f)["checkpoint"]["step"]
    assert used != best and used == checkpoint.Checkpointer(workdir, read_only=True).best_step()


def test_evaluation_of_a_damaged_step_says_which(three_epochs, tmp_path):
    workdir = _copy(three_epochs, tmp_path)
    _truncate(os.path.join(workdir, checkpoint.CHECKPOINT_DIR, "12"))
    _fails_in_one_line(_cli("eval_knn", workdir, "--config.eval.checkpoint=12"),
                       "checkpoint step 12", "damaged")
    for step in (6, 18):
        _empty(os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(step)))
    _fails_in_one_line(_cli("eval_knn", workdir), "no 'best' checkpoint", "step 12 is damaged")
    assert not os.path.exists(os.path.join(workdir, "eval_knn"))


# ------------------------------------------------------------------------------- divergence

def test_a_nan_stops_training_and_keeps_the_good_checkpoints(three_epochs, tmp_path,
                                                             monkeypatch):
    workdir = _copy(three_epochs, tmp_path)
    real = steps.sample_cached_features

    def poisoned(key, cache, index):  # a NaN batch from step 18 on
        image, spectrum = real(key, cache, index)
        return image * np.float32("nan"), spectrum

    monkeypatch.setattr(steps, "sample_cached_features", poisoned)
    config = spender.get_config("smoke")
    config.data.data_dir = cli_runs.DATA_DIR
    config.train.epochs = 4
    with pytest.raises(TrainingDiverged, match="step 19: loss .*nan.*last good checkpoint is "
                                               "step 18"):
        contrastive.run(settings.resolve(config), workdir)
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    assert ckpt.latest_step() == 18 and not ckpt.damaged
    assert np.isfinite(ckpt.restore_meta(ckpt.best_step())["val_loss"])


# ------------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("override, needle", [
    ("--config.train.batch_size=-4", "train.batch_size is -4"),
    ("--config.train.batch_size=0", "train.batch_size is 0"),
    ("--config.train.epochs=-1", "train.epochs is -1"),
    ("--config.train.epoch=2", 'Did you mean "epochs"'),
    ("--config.train.epochs=two", "invalid literal"),
    ("--config.eval.knn_holdout_fraction=1.5", "eval.knn_holdout_fraction"),
    ("--config.data.image_transform=rgb", "data.image_transform"),
])
def test_bad_settings_stop_before_any_work(tmp_path, override, needle):
    workdir = tmp_path / "run"
    _fails_in_one_line(_cli("train", str(workdir), override), needle)
    assert not workdir.exists()


def test_a_batch_larger_than_the_split_is_refused_before_the_cache(smoke_run, tmp_path):
    workdir = tmp_path / "run"
    proc = _cli("train", str(workdir), "--config.train.batch_size=256",
                "--config.train.val_batch_size=32")
    _fails_in_one_line(proc, "train.batch_size is 256", "only 204 examples")
    assert not workdir.exists()  # refused after the lock: the lock file goes too


def test_unknown_search_targetids_in_one_line(smoke_run, tmp_path):
    workdir = _copy(smoke_run, tmp_path)
    _fails_in_one_line(_cli("search", workdir, "--config.eval.search_targetids=(12345,)"),
                       "eval.search_targetids", "12345")
    assert not os.path.exists(os.path.join(workdir, "search"))


def test_resume_refuses_a_change_that_makes_another_run(smoke_run, tmp_path):
    workdir = _copy(smoke_run, tmp_path)
    before = open(os.path.join(workdir, "config.json")).read()
    _fails_in_one_line(_cli("train", workdir, "--config.seed=1", "--config.train.epochs=2"),
                       "config field seed is 1", "started with 0", "cannot change on resume")
    assert open(os.path.join(workdir, "config.json")).read() == before


@pytest.mark.parametrize("change, field", [
    (lambda c: setattr(c.train, "learning_rate", 1e-3), "train.learning_rate"),
    (lambda c: setattr(c.model.spectrum_head, "out", 16), "model.spectrum_head.out"),
    (lambda c: setattr(c.data, "builder_config", "small"), "data.builder_config"),
    (lambda c: setattr(c.augment, "rotation", False), "augment.rotation"),
    (lambda c: setattr(c.train, "batch_size", 64), "train.batch_size"),
])
def test_fields_that_define_the_run_cannot_change(change, field):
    saved = settings.config_json(spender.get_config("smoke"))
    config = spender.get_config("smoke")
    change(config)
    with pytest.raises(ConfigError, match=rf"config field {field} is .* cannot change"):
        settings.changes_on_resume(saved, settings.config_json(config))


def test_resume_records_allowed_changes_and_config_json_tells_the_truth(smoke_run, tmp_path):
    workdir = _copy(smoke_run, tmp_path)
    cli_runs.run("train", workdir, "--config.train.epochs=2", "--config.feature_cache.enabled=False")
    with open(os.path.join(workdir, "config_changes.jsonl")) as f:
        changes = {r["field"]: r for r in map(json.loads, f)}
    assert changes["train.epochs"] == {"step": 6, "field": "train.epochs", "from": 1, "to": 2}
    assert changes["feature_cache.enabled"]["to"] is False
    with open(os.path.join(workdir, "config.json")) as f:
        written = json.load(f)
    assert written["train"]["epochs"] == 2 and written["feature_cache"]["enabled"] is False


# ------------------------------------------------------------------------------- embeddings

def _damage_file(path, kind):
    data = bytearray(open(path, "rb").read())
    if kind == "truncated":
        data = data[:len(data) // 2]
    elif kind == "garbage":
        data = bytearray(b"garbage" * 100)
    else:  # one bit in the middle of the file (the column data)
        data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def embedded(smoke_run, tmp_path_factory):
    workdir = _copy(smoke_run, tmp_path_factory.mktemp("embedded"))
    cli_runs.run("embed", workdir, "--config.eval.embed_chunk_rows=20")  # 3 chunks
    return workdir


@pytest.mark.parametrize("kind", ["truncated", "garbage", "bit_flip"])
def test_a_damaged_embeddings_chunk_is_detected_and_named(embedded, tmp_path, kind):
    path = str(tmp_path / "test")
    shutil.copytree(os.path.join(embedded, "embeddings", "test"), path)
    embed.read_embeddings(path)  # intact: reads
    chunk = os.path.join(path, "chunk-000001.parquet")
    _damage_file(chunk, kind)
    with pytest.raises(DataError, match=f"embeddings file {chunk} "):
        embed.read_embeddings(path)


def test_a_damaged_embeddings_table_is_set_aside_and_recomputed(embedded, tmp_path):
    workdir = _copy(embedded, tmp_path)
    path = os.path.join(workdir, "embeddings", "test")
    good = embed.read_embeddings(path)[0]["image_embedding"]
    chunk = os.path.join(path, "chunk-000002.parquet")
    _damage_file(chunk, "truncated")
    proc = cli_runs.run("embed", workdir, "--config.eval.embed_chunk_rows=20")
    assert f"embeddings file {chunk} " in proc.stdout and "set it aside" in proc.stdout
    assert len([p for p in os.listdir(os.path.dirname(path)) if ".damaged-" in p]) == 1
    np.testing.assert_array_equal(embed.read_embeddings(path)[0]["image_embedding"], good)


@pytest.mark.parametrize("config, needle", [
    ("configs/nope.py", "No such file or directory: 'configs/nope.py'"),
    ("configs/spender.py:bogus", "unknown config variant 'bogus'"),
])
def test_a_bad_config_file_or_variant_in_one_line(tmp_path, config, needle):
    proc = subprocess.run([sys.executable, "main.py", f"--config={config}",
                           "--mode=train", f"--workdir={tmp_path / 'run'}"], cwd=cli_runs.ROOT,
                          env=cli_runs.env(), capture_output=True, text=True, timeout=300)
    _fails_in_one_line(proc, needle)
    assert not (tmp_path / "run").exists()
