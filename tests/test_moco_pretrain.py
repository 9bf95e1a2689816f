"""MoCo v2 pretraining of the image tower (training/moco.py).

- the ResNet's training-mode BatchNorm (`batch_norm_training=True`) vs torch.nn.BatchNorm2d in training mode: output,
  running mean and running (unbiased) variance over two steps;
- `--mode=pretrain_moco` on smoke: its tower directory restores as the image tower of the
  smoke contrastive model (the head from its fc_0/fc_2), and the run resumed from its epoch-1
  checkpoint ends bitwise identical (state: encoders, key encoder, queue, BN statistics) to a
  straight run.
"""

from __future__ import annotations

import os
import runpy
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import cli_runs
from test_checkpoint_resume import _latest as _state

from astroclip_jax import settings as settings_lib
from astroclip_jax.models import astroclip, resnet, tower_weights, towers

CONFIG = "configs/moco.py"
COSINE = "--config.moco.cosine_epochs=2"  # the schedule of the 2-epoch run, for both


def test_training_batch_norm_matches_torch():
    rng = np.random.default_rng(0)
    c = 4
    torch_bn = torch.nn.BatchNorm2d(c)  # momentum 0.1, eps 1e-5
    scale, bias = rng.uniform(0.5, 2, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    mean0, var0 = rng.normal(size=c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    with torch.no_grad():
        torch_bn.weight.copy_(torch.from_numpy(scale))
        torch_bn.bias.copy_(torch.from_numpy(bias))
        torch_bn.running_mean.copy_(torch.from_numpy(mean0))
        torch_bn.running_var.copy_(torch.from_numpy(var0))
    torch_bn.train()
    bn = resnet.TrainingBatchNorm()
    variables = {"params": {"scale": scale, "bias": bias},
                 "batch_stats": {"mean": mean0, "var": var0}}
    for shift in (0.0, 3.0):  # two steps: the running update compounds
        x = (shift + 2.0 * rng.normal(size=(6, 5, 7, c))).astype(np.float32)
        want = torch_bn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        got, new = bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
        np.testing.assert_allclose(np.asarray(got), want.detach().numpy(), rtol=1e-5, atol=1e-5)
        variables = {"params": variables["params"], "batch_stats": new["batch_stats"]}
        for name, buf in (("mean", torch_bn.running_mean), ("var", torch_bn.running_var)):
            np.testing.assert_allclose(np.asarray(new["batch_stats"][name]), buf.numpy(),
                                       rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("moco") / "straight")
    cli_runs.run("pretrain_moco", workdir, COSINE, config_file=CONFIG)
    return workdir


def test_stopped_and_resumed_moco_is_bitwise_identical(tmp_path, straight):
    # The straight run as it stood after epoch 1 (its step-6 checkpoint; epoch 2's removed),
    # resumed: one run fewer than stopping a run of its own.
    stopped = str(tmp_path / "stopped")
    shutil.copytree(straight, stopped, ignore=lambda d, names: [
        n for n in names if n in (".lock-writer", "tower") or (d.endswith("checkpoints")
                                                               and n == "12")])
    assert int(_state(stopped)[0]["step"]) == 6
    log = cli_runs.run("pretrain_moco", stopped, COSINE, config_file=CONFIG).stderr
    assert "resumed from" in log
    (final, meta_a), (resumed, meta_b) = _state(straight), _state(stopped)
    assert int(final["step"]) == 12 and meta_a["val_loss"] == meta_b["val_loss"]
    assert set(final) >= {"queue", "queue_ptr", "key_params", "key_batch_stats", "batch_stats"}
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(final), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    # Training-mode BatchNorm updated every running statistic of both encoders (init 0 / 1).
    for stats in (final["batch_stats"], final["key_batch_stats"]):
        for name, x in tower_weights.flatten(stats).items():
            assert not np.allclose(x, 0.0 if name.endswith("mean") else 1.0), name
    # The key encoder moved towards the query encoder, the queue holds the last keys.
    k, q = final["key_params"]["fc_2"]["kernel"], final["params"]["fc_2"]["kernel"]
    assert not np.array_equal(k, q)
    np.testing.assert_allclose(np.linalg.norm(final["queue"], axis=1), 1.0, rtol=1e-5)


def test_moco_tower_is_the_image_tower_of_the_contrastive_model(straight):
    tower = os.path.join(straight, "tower")
    module, variables, weights = towers.load_tower_module(tower, kind="resnet")
    state, _ = _state(straight)
    saved = tower_weights.flatten(variables)
    assert saved.keys() == tower_weights.flatten(
        {"params": state["params"], "batch_stats": state["batch_stats"]}).keys()
    for name, x in saved.items():  # the query encoder, its head and running statistics
        collection, rest = name.split("/", 1)
        np.testing.assert_array_equal(np.asarray(x), tower_weights.flatten(state[collection])[rest],
                                      err_msg=name)
    assert weights.source["trained_by"] == "pretrain_moco" and weights.source["step"] == 12
    assert {"fc_0", "fc_2"} <= set(variables["params"])

    config = runpy.run_path(os.path.join(cli_runs.ROOT, "configs", "spender.py"))["get_config"](
        "smoke")
    config.data.data_dir = cli_runs.DATA_DIR
    config.model.image_tower.weights = tower
    settings = settings_lib.resolve(config)
    model, params = astroclip.build(settings.model, jax.random.PRNGKey(0))
    # The MoCo head became the image head; the tower's features are the ResNet's own.
    np.testing.assert_array_equal(np.asarray(params["image_head"]["params"]["fc_0"]["kernel"]),
                                  state["params"]["fc_0"]["kernel"])
    images = jnp.asarray(np.random.default_rng(2).uniform(size=(3, 32, 32, 3)), jnp.float32)
    np.testing.assert_allclose(np.asarray(model.image_features(params, images)),
                               np.asarray(module.apply(variables, images)["features"]),
                               rtol=1e-5, atol=1e-6)
    emb = np.asarray(model.embed_images(params, images))
    assert emb.shape == (3, 32) and np.isfinite(emb).all()


def test_moco_tower_aligns_and_evaluates_on_smoke(tmp_path, straight):
    """pretrain -> align -> eval_knn on smoke: the contrastive run names the MoCo tower."""
    cli_runs.align_and_evaluate("image", os.path.join(straight, "tower"), str(tmp_path / "aligned"))


def test_default_config_names_the_shipped_pretrained_image_tower():
    """The default run aligns the image tower that configs/moco.py's default command made."""
    def config(name):
        return runpy.run_path(os.path.join(cli_runs.ROOT, "configs", name))["get_config"]("")

    moco = config("moco.py")
    tw = tower_weights.load_tower(config("spender.py").model.image_tower.weights, kind="resnet")
    assert tw.config == {k: list(v) if isinstance(v, tuple) else v
                         for k, v in resnet.SIZES[moco.moco.size].items()}
    assert tw.source["trained_by"] == "pretrain_moco"
    assert tw.source["command"].startswith(f"python main.py --config={CONFIG} --mode=pretrain_moco")
    # what that command's default runs: one epoch of 102 steps of 128 on the 13,107 training images
    assert tw.source["step"] == 13107 // moco.train.batch_size * moco.train.epochs
    assert {"fc_0", "fc_2"} <= set(tw.variables["params"])
    # The default model builds on it, its image head seeded by the tower's MoCo head.
    default = config("spender.py")
    default.data.data_dir = cli_runs.DATA_DIR  # resolving reads no dataset; keep it off $HOME
    _, params = astroclip.build(settings_lib.resolve(default).model, jax.random.PRNGKey(0))
    for layer in ("fc_0", "fc_2"):
        np.testing.assert_array_equal(np.asarray(params["image_head"]["params"][layer]["kernel"]),
                                      tw.variables["params"][layer]["kernel"])
