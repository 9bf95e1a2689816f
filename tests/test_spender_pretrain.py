"""Spender pretraining: its pure pieces against spender / torch / NumPy, and the trainer.

- consistency and restframe-similarity losses vs `spender.loss` (torch) on the same tensors;
- the redshift augmentation vs `spender.data.desi.DESI.augment_spectra` with the same z_new;
- the one-cycle lr and beta1 vs torch's `OneCycleLR` driving `torch.optim.Adam`;
- the input normalisation vs a per-row loop with torch.median; the sky-line mask vs spender's;
  the weights vs the synthetic generator's own ivar;
- `--mode=pretrain_spender` on smoke: killed after its first checkpoint and resumed, it ends
  bitwise identical to a straight run; its tower directory restores whole and is what the
  contrastive smoke run then aligns (pretrain -> train -> eval_knn).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import types

import jax
import numpy as np
import pytest
import torch

import cli_runs
import spender
from test_checkpoint_resume import _latest as _state
from test_checkpoint_resume import _latest_complete_step
from spender import loss as spender_loss
from spender.data.desi import DESI

from astroclip_jax import wavelength_grids
from astroclip_jax.data import shipped_files, spender_inputs, synthetic
from astroclip_jax.models import spender_autoencoder as ae
from astroclip_jax.models import tower_weights
from astroclip_jax.training import spender_recipe

PRETRAIN = "configs/spender_pretrain.py"
SMALL = ("--config.train.batch_size=64", "--config.train.epochs=2")  # 3 steps an epoch


def test_consistency_loss_matches_spender():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((9, 5)).astype(np.float32)
    s_aug = (s + 0.3 * rng.standard_normal(s.shape)).astype(np.float32)
    want = float(spender_loss.consistency_loss(torch.from_numpy(s), torch.from_numpy(s_aug)))
    np.testing.assert_allclose(float(spender_recipe.consistency_loss(s, s_aug)), want, rtol=1e-5)


@pytest.mark.parametrize("slope", [0.0, 1.3])
def test_similarity_restframe_loss_matches_spender(slope):
    rng = np.random.default_rng(1)
    wave_rest = np.linspace(3000.0, 8000.0, 601).astype(np.float32)
    restframe = (1 + 0.5 * rng.random((7, 601))).astype(np.float32)
    s = rng.standard_normal((7, 4)).astype(np.float32)
    model = types.SimpleNamespace(decode=lambda _: torch.from_numpy(restframe),
                                  decoder=types.SimpleNamespace(wave_rest=torch.from_numpy(wave_rest)))
    config = spender_loss.LossConfig(similarity_slope=slope)
    want = float(spender_loss.similarity_restframe_loss(model, torch.from_numpy(s), config=config))
    got = spender_recipe.similarity_restframe_loss(restframe, s, wave_rest, slope)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_redshift_augmentation_matches_spender():
    wave = wavelength_grids.desi_wave()
    rng = np.random.default_rng(2)
    n = 4
    # Smooth spectra and weights: the stretched grid is float32 here, float64 in spender (its
    # DESI grid), a difference of ~5e-4 of a pixel, times the change from pixel to pixel.
    y = (1 + 0.3 * np.sin(wave[None, :] / rng.uniform(300, 900, (n, 1)))).astype(np.float32)
    w = (1 + 0.5 * np.cos(wave[None, :] / rng.uniform(200, 400, (n, 1)))).astype(np.float32)
    z = rng.uniform(0.05, 0.4, n).astype(np.float32)
    z_new = rng.uniform(0.0, 0.8, n).astype(np.float32)
    torch.manual_seed(0)  # ratio=0: spender draws noise but keeps none of it
    spec_t, w_t, _ = DESI.augment_spectra(tuple(map(torch.from_numpy, (y, w, z))),
                                          z_new=torch.from_numpy(z_new), ratio=0.0)
    spec, w_new = spender_recipe.redshifted(y, w, z, z_new, np.zeros_like(y), wave)
    np.testing.assert_allclose(np.asarray(spec), spec_t.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(w_new), w_t.numpy(), rtol=1e-5, atol=1e-5)
    assert (spec_t.numpy() == 0).any()  # some pixels moved outside the grid


@pytest.mark.parametrize("total", [7, 25])
def test_one_cycle_matches_torch(total):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1e-3, eps=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=total)
    for step in range(total):
        lr, beta1 = spender_recipe.one_cycle(step, total, 1e-3)
        np.testing.assert_allclose(float(lr), opt.param_groups[0]["lr"], rtol=1e-5)
        np.testing.assert_allclose(float(beta1), opt.param_groups[0]["betas"][0], rtol=1e-6)
        opt.step()
        sched.step()


def test_normalisation_matches_a_torch_median_loop():
    wave = wavelength_grids.desi_wave()
    rng = np.random.default_rng(3)
    y = rng.uniform(0.5, 3.0, (5, wave.size)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, y.shape).astype(np.float32)
    w[:, ::7] = 0
    z = np.array([0.0, 0.1, 0.3, 0.5, 0.9], np.float32)  # z = 0.9: no pixel in the window
    got_y, got_w, norm = spender_inputs.normalise(y, w, z, wave)
    for i in range(5):
        rest = wave / (1 + z[i])
        sel = (w[i] > 0) & (rest > 5300) & (rest < 5850)
        if not sel.any():
            assert norm[i] == 0 and (got_w[i] == 0).all()
            continue
        want = float(torch.median(torch.from_numpy(y[i][sel])))  # the lower median
        assert norm[i] == np.float32(want)
        np.testing.assert_allclose(got_y[i], y[i] / want, rtol=1e-6)
        np.testing.assert_allclose(got_w[i], w[i] * want ** 2, rtol=1e-6)


@pytest.mark.parametrize("grid", ["desi", "sdss"])
def test_skyline_mask_and_weights(grid):
    wave = wavelength_grids.wave(grid)
    mask = shipped_files.skyline_mask(wave)
    np.testing.assert_array_equal(mask, spender.instrument.get_skyline_mask(torch.from_numpy(wave)).numpy())
    weights = spender_inputs.weights(None, grid)  # derived: for data without an ivar
    assert (weights[mask] == 0).all() and 0.05 < mask.mean() < 0.5
    ivar = synthetic.generate(1, grid=grid, image_size=16)["ivar"][0]  # the generator's own
    np.testing.assert_allclose(weights[~mask], ivar[~mask], rtol=1e-6)
    np.testing.assert_array_equal(spender_inputs.weights(ivar[None], grid)[0], weights)


# ------------------------------------------------------------------------------ the trainer

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain") / "straight")
    cli_runs.run("pretrain_spender", workdir, *SMALL, config_file=PRETRAIN)
    return workdir


def test_killed_and_resumed_pretraining_is_bitwise_identical(tmp_path, straight):
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(cli_runs.command("pretrain_spender", killed, *SMALL,
                                             config_file=PRETRAIN),
                            cwd=cli_runs.ROOT, env=cli_runs.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _latest_complete_step(killed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed before the end, after epoch 1's checkpoint
    log = cli_runs.run("pretrain_spender", killed, *SMALL, config_file=PRETRAIN).stderr
    assert "resumed from" in log
    (final, meta_a), (resumed, meta_b) = _state(straight), _state(killed)
    assert int(final["step"]) == 6 and meta_a["val_loss"] == meta_b["val_loss"]
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(final), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    for sub in ("", "decoder"):
        a, b = (tower_weights.flatten(tower_weights.load_tower(
            os.path.join(d, "tower", sub)).variables) for d in (straight, killed))
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{sub}/{name}")


def test_pretrained_tower_restores_whole_and_is_aligned(tmp_path, straight):
    tower = os.path.join(straight, "tower")
    model, params = ae.load_autoencoder(tower)
    state, _ = _state(straight)
    np.testing.assert_array_equal(params["encoder"]["params"]["conv1_0"]["kernel"],
                                  state["params"]["encoder"]["params"]["conv1_0"]["kernel"])
    records = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"train/fidelity", "train/consistency"} <= set(records[-1])
    assert os.path.exists(os.path.join(straight, "training_curves.png"))
    # pretrain -> align -> eval_knn on smoke
    cli_runs.align_and_evaluate("spectrum", tower, str(tmp_path / "aligned"))


def test_default_config_names_the_shipped_pretrained_spectrum_tower():
    """The default run aligns the spectrum tower that configs/spender_pretrain.py made."""
    import importlib.util

    from astroclip_jax.models import spender as spender_model

    def config(path):
        spec = importlib.util.spec_from_file_location(f"cfg_{os.path.basename(path)}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config("")

    weights = config(os.path.join(cli_runs.ROOT, "configs", "spender.py")).model.spectrum_tower.weights
    tw = tower_weights.load_tower(weights, kind="spender")
    np.testing.assert_array_equal(tw.extras["wave_obs"], wavelength_grids.desi_wave())
    pretrain = config(os.path.join(cli_runs.ROOT, PRETRAIN))
    assert tw.config == {k: list(v) if isinstance(v, tuple) else v for k, v in
                         spender_model.SIZES[pretrain.spender_pretrain.encoder_size].items()}
    assert tw.source["command"].startswith(f"python main.py --config={PRETRAIN} --mode=pretrain_spender")
    # what that command's default runs: one epoch of 102 steps of 128 on the 13,107 training spectra
    assert tw.source["step"] == 13107 // pretrain.train.batch_size * pretrain.train.epochs
