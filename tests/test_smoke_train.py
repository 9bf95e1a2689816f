"""End to end: `main.py --mode=train` on 8 (host-platform) devices for one epoch, restore
its checkpoint in this separate single-device process and embed with it, then continue the
run on one device."""

import os

import jax
import numpy as np

import cli_runs
from astroclip_jax.evaluation import restore
from astroclip_jax.training import checkpoint, metrics


def test_train_on_8_devices_restore_on_1_and_continue(tmp_path):
    workdir = str(tmp_path / "run")
    log = cli_runs.run("train", workdir, "--config.train.epochs=1", devices=8).stderr
    assert "8 devices" in log

    # This process has one CPU device and never saw the training mesh.
    assert jax.device_count() == 1
    trained = restore.restore_trained_model(workdir, "best")
    run = trained.settings
    assert run.train.epochs == 1 and run.model.image_tower.size == "test"
    assert trained.step == 6  # 204 training pairs / 32 per step, one epoch
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        state, meta = ckpt.restore(ckpt.step_for("latest"))
    finally:
        ckpt.close()
    assert meta["epoch"] == 1 and meta["step"] == 6 and int(state["step"]) == 6
    for head in ("image_head", "spectrum_head"):
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(trained.params[head]),
                                     jax.tree.leaves(state["params"][head])):
            np.testing.assert_array_equal(got, want, err_msg=head + jax.tree_util.keystr(path))
    # Training moved the heads away from their initial values (rebuilt from the seed).
    assert not np.array_equal(trained.params["image_head"]["params"]["fc_0"]["kernel"],
                              trained.initial_params["image_head"]["params"]["fc_0"]["kernel"])
    rng = np.random.default_rng(0)
    size, length = run.model.image_size, run.model.spectrum_length
    img, spec = jax.jit(trained.model.embed)(
        trained.params, rng.normal(size=(3, size, size, 3)).astype(np.float32),
        rng.normal(size=(3, length)).astype(np.float32))
    assert img.shape == spec.shape == (3, 32) and np.all(np.isfinite(img))
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)

    log = cli_runs.run("train", workdir, "--config.train.epochs=2").stderr  # resumes, 1 device
    assert "resumed" in log and "1 devices" in log
    records = metrics.read_metrics(workdir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(np.isfinite(r["val/loss"]) for r in records)
    assert records[1]["step"] == 12
    assert os.path.exists(os.path.join(workdir, "training_curves.png"))
