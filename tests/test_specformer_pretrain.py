"""`--mode=pretrain_specformer` (SpecFormer's masked-chunk modelling), and the released
AstroCLIP's path made here end to end on the smoke data: pretrain_specformer -> MoCo v2 on the
small ViT -> align the cross-attention heads -> eval_knn."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cli_runs
from astroclip_jax.models import specformer, tower_weights
from astroclip_jax.training import specformer_pretrain

SPECFORMER = "configs/specformer_pretrain.py"
ASTROCLIP = "configs/astroclip.py"


def test_the_loss_is_upstreams():
    """mse(out * locs, target * locs) / mean(locs), locs where masking changed a value, in
    torch on the same tokens, mask and reconstruction (upstream's training_step)."""
    model = specformer.SpecFormer(**specformer.SIZES["test"])
    rng = np.random.default_rng(0)
    spectra = jnp.asarray(3 + rng.normal(size=(2, 7781)), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), spectra)
    key = jax.random.PRNGKey(7)
    ours = float(specformer_pretrain.masked_modelling_loss(model, params, spectra, key, 6, 50))
    target = specformer.tokenize(spectra)
    masked = specformer.mask_chunks(key, target, 6, 50)
    out = model.apply(params, masked, method=specformer.SpecFormer.reconstruct)
    t, m, o = (torch.tensor(np.asarray(a), dtype=torch.float64) for a in (target, masked, out))
    locs = (m != t).to(o.dtype)
    want = F.mse_loss(o * locs, t * locs, reduction="mean") / locs.mean()
    assert ours == pytest.approx(float(want), rel=1e-5)
    # The two leading zeros of each window are never counted (masking leaves them 0).
    assert float(locs[..., :2].sum()) == 0.0 and float(locs.sum()) > 0


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if "loss" in k} for line in f]


def test_smoke_pretraining_learns_and_resumes_bitwise(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    fixed = "--config.train.cosine_steps=12"  # the schedule must not depend on train.epochs
    cli_runs.run("pretrain_specformer", straight, fixed, config="smoke", config_file=SPECFORMER)
    cli_runs.run("pretrain_specformer", resumed, fixed, "--config.train.epochs=1",
                 config="smoke", config_file=SPECFORMER)
    log = cli_runs.run("pretrain_specformer", resumed, fixed, config="smoke",
                       config_file=SPECFORMER).stderr
    assert "resumed from" in log
    assert _metrics(straight) == _metrics(resumed)
    losses = [m["train/loss"] for m in _metrics(straight)]
    assert losses[-1] < losses[0]
    a = tower_weights.load_tower(os.path.join(straight, "tower"), kind="specformer")
    b = tower_weights.load_tower(os.path.join(resumed, "tower"), kind="specformer")
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
        np.testing.assert_array_equal(x, y)
    assert a.source["trained_by"] == "pretrain_specformer"


def test_the_released_path_made_here_runs_end_to_end(tmp_path):
    """smoke: SpecFormer pretrained here, the ViT pretrained here by MoCo v2 (any image tower in
    any image trainer), the cross-attention heads aligned on both, then eval_knn."""
    spectrum, image, run = (str(tmp_path / n) for n in ("specformer", "moco_vit", "align"))
    cli_runs.run("pretrain_specformer", spectrum, config="smoke", config_file=SPECFORMER)
    cli_runs.run("pretrain_moco", image, config="astroclip_smoke", config_file="configs/moco.py")
    vit = tower_weights.load_tower(os.path.join(image, "tower"), kind="dinov2_vit")
    assert {"fc_0", "fc_2"} <= set(vit.variables["params"])  # the MoCo head rides along
    towers = (f"--config.model.spectrum_tower.weights={spectrum}/tower",
              f"--config.model.image_tower.weights={image}/tower")
    log = cli_runs.run("train", run, *towers, config="smoke", config_file=ASTROCLIP).stderr
    assert f"specformer tower: converted weights from {spectrum}/tower" in log
    assert f"dinov2_vit tower: converted weights from {image}/tower" in log
    cli_runs.run("eval_knn", run, *towers, config="smoke", config_file=ASTROCLIP)
    with open(os.path.join(run, "eval_knn", "results.json")) as f:
        r2 = json.load(f)["r2"]
    assert r2 and all(math.isfinite(v) for scores in r2.values() for v in scores.values())
