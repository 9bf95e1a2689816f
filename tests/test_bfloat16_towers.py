"""Frozen towers in bfloat16 (`load_tower_module(..., dtype="bfloat16")`): parameters stay
float32, activations and matmuls run in bfloat16, LayerNorm statistics and softmax in float32,
the output comes back float32. Measured on the towers shipped here (trained weights, so the
activations are the ones a user gets): every token's and every pooled feature's cosine
similarity to the float32 forward (itself tested against timm / torch) is >= 0.9995; the
bfloat16 path really runs in bfloat16 (the outputs differ from float32 by more than float32
rounding). A tower kind without the option says so in one line."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astroclip_jax.models import towers

RESOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "astroclip_jax", "models", "resources")
BOUND = 0.9995  # cosine similarity to float32, per galaxy (README: "bfloat16 towers")


def _cos(a, b):
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _inputs(kind, n=6):
    rng = np.random.default_rng(0)
    if towers.kind_of(kind).modality == "image":
        return rng.normal(0.3, 0.5, (n, 96, 96, 3)).astype(np.float32)
    return (5 + 3 * rng.normal(size=(n, 7781))).astype(np.float32)


@pytest.mark.parametrize("tower,kind,method", [
    ("vit_mini_synthetic", "dinov2_vit", "__call__"),
    ("vit_mini_synthetic", "dinov2_vit", "cls_embedding"),
    ("specformer_mini_synthetic", "specformer", "__call__"),
    ("resnet_small_synthetic", "resnet", "__call__"),
])
def test_bfloat16_forward_stays_close_to_float32(tower, kind, method):
    path = os.path.join(RESOURCES, tower)
    f32, variables, _ = towers.load_tower_module(path, kind)
    bf16, _, _ = towers.load_tower_module(path, kind, dtype="bfloat16")
    x = _inputs(kind)

    def run(module):
        out = jax.jit(lambda v, x: module.apply(v, x, method=method))(variables, x)
        return out["features"] if isinstance(out, dict) else out

    a, b = run(f32), run(bf16)
    assert b.dtype == jnp.float32 and b.shape == a.shape
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    cos = _cos(a, b)
    assert cos.min() >= BOUND, f"{kind}: cosine similarity to float32 down to {cos.min():.6f}"
    if a.ndim == 3:  # every token, and the mean the tables keep
        tokens = _cos(np.asarray(a).reshape(-1, a.shape[-1]), np.asarray(b).reshape(-1, b.shape[-1]))
        assert tokens.min() >= BOUND
    # bfloat16 was used: far more than float32 rounding apart
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3 * np.abs(np.asarray(a)).max()


def test_a_tower_without_the_option_says_so():
    with pytest.raises(ValueError, match="spender.*no compute dtype option"):
        towers.load_tower_module(os.path.join(RESOURCES, "spender_small_synthetic"), "spender",
                                 dtype="bfloat16")


# ------------------------------------------------------------------ the config field


def test_a_spender_tower_in_bfloat16_is_one_line_before_anything_runs():
    from astroclip_jax import settings as settings_lib
    from astroclip_jax.errors import ConfigError
    from configs import spender

    config = spender.get_config("smoke")
    config.model.spectrum_tower.dtype = "bfloat16"
    with pytest.raises(ConfigError, match=r"model\.spectrum_tower\.dtype.*float32 for this tower"):
        settings_lib.resolve(config, "train")
    config.model.spectrum_tower.dtype = "float16"
    with pytest.raises(ConfigError, match=r"model\.spectrum_tower\.dtype.*'float32', 'bfloat16'"):
        settings_lib.resolve(config, "train")


R2_BOUND = 0.05  # |R^2(bfloat16 towers) - R^2(float32 towers)|, each cell of the smoke table


def test_bfloat16_feature_cache_trains_heads_as_well_as_float32(tmp_path):
    """configs/astroclip.py:smoke (ViT + SpecFormer, cross-attention heads) trained on a feature
    cache computed by float32 and by bfloat16 towers: the caches are told apart (the fingerprint
    holds the dtype) and the zero-shot R^2 tables agree within R2_BOUND."""
    import json

    import cli_runs

    tables, caches = {}, {}
    for dtype in ("float32", "bfloat16"):
        run = str(tmp_path / dtype)
        flags = [f"--config.model.image_tower.dtype={dtype}",
                 f"--config.model.spectrum_tower.dtype={dtype}"]
        cli_runs.run("train", run, *flags, config_file="configs/astroclip.py")
        cli_runs.run("eval_knn", run, *flags, config_file="configs/astroclip.py")
        with open(os.path.join(run, "eval_knn", "results.json")) as f:
            tables[dtype] = json.load(f)["r2"]
        caches[dtype] = [n for n in os.listdir(run) if n.startswith("feature_cache-")]
    assert len(caches["float32"]) == len(caches["bfloat16"]) == 1
    assert caches["float32"] != caches["bfloat16"]
    for what in ("image", "spectrum", "cross_modal"):
        for prop, value in tables["float32"][what].items():
            other = tables["bfloat16"][what][prop]
            assert abs(other - value) <= R2_BOUND, (what, prop, value, other)
