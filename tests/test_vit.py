"""The Flax DINOv2 / AstroDINO vision transformer against timm, through the dinov2 converter.

Reference: timm's `VisionTransformer` built with DINOv2's options (patch 12, CLS token with its
own position, LayerScale, qkv bias, exact GELU, LayerNorm eps 1e-6), whose state_dict names are
dinov2's own (checked below), with random non-trivial weights. The JAX side only sees what the
converter makes of a DINOv2-named state_dict (chunked block names, a `mask_token`, the
`dino_head.*` of a teacher checkpoint). Positional-embedding interpolation is checked against
dinov2's `interpolate_pos_encoding` (commit 2302b6bf, the one AstroCLIP pins) run in torch.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT

from astroclip_jax import flat_tree
from astroclip_jax.models import towers, vit
from converters import common, dinov2 as conv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Relative to the largest reference value; float32 rounding of two different summation orders.
TOL = 1e-4


# ---------------------------------------------------------------- torch reference


def _timm_vit(cfg: dict, seed: int) -> TimmViT:
    """timm ViT with DINOv2's options and random non-trivial weights: Linear/Conv weights of unit
    gain (N(0, 1/fan_in)), nonzero biases, LayerNorm scales N(1, 0.1), LayerScale gammas
    N(1, 0.1) (trained AstroDINO's are far from their 1e-5 init), O(1) CLS and positions."""
    torch.manual_seed(seed)
    model = TimmViT(img_size=cfg["img_size"], patch_size=cfg["patch_size"], in_chans=3,
                    num_classes=0, global_pool="token", embed_dim=cfg["embed_dim"],
                    depth=cfg["depth"], num_heads=cfg["num_heads"],
                    mlp_ratio=cfg["mlp_hidden"] / cfg["embed_dim"], qkv_bias=True,
                    init_values=1e-5, class_token=True, no_embed_class=False,
                    act_layer=torch.nn.GELU,
                    norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name.endswith(("gamma",)) or (name.endswith("weight") and p.ndim == 1):
                p.copy_(1 + 0.1 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif name.endswith("weight"):
                p.copy_(r / math.sqrt(p[0].numel()))
            else:  # cls_token, pos_embed
                p.copy_(0.5 * r)
    return model.eval()


def _dinov2_state(model: TimmViT, chunks: int, seed: int) -> dict[str, np.ndarray]:
    """The model's weights as a DINOv2 backbone state_dict: timm's names with blocks chunked as
    `blocks.<chunk>.<i>` (block_chunks=`chunks`, 0: plain) and a `mask_token`."""
    depth = len(model.blocks)
    size = depth // chunks if chunks else None
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks.") and size:
            i = int(key.split(".")[1])
            key = f"blocks.{i // size}.{key[len('blocks.'):]}"
        state[key] = value.numpy()
    gen = np.random.default_rng(seed)
    state["mask_token"] = gen.normal(size=(1, model.embed_dim)).astype(np.float32)
    return state


def _teacher(state: Mapping, seed: int) -> dict[str, np.ndarray]:
    """DINOv2's teacher checkpoint content: backbone.* and the (dropped) dino_head.*."""
    gen = np.random.default_rng(seed)
    d = state["norm.weight"].shape[0]
    head = {"dino_head.mlp.0.weight": (32, d), "dino_head.mlp.0.bias": (32,),
            "dino_head.last_layer.weight_g": (16, 1), "dino_head.last_layer.weight_v": (16, 8)}
    return {**{f"backbone.{k}": v for k, v in state.items()},
            **{k: gen.normal(size=s).astype(np.float32) for k, s in head.items()}}


def _dinov2_interpolate(pos_embed: torch.Tensor, h: int, w: int, patch: int,
                        offset: float = 0.1) -> torch.Tensor:
    """dinov2 `DinoVisionTransformer.interpolate_pos_encoding` at commit 2302b6bf (AstroCLIP's
    pin; `interpolate_antialias: false`), verbatim but for `self`: (1, 1 + h0*w0, D)."""
    npatch = (h // patch) * (w // patch)
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = h // patch + offset, w // patch + offset  # dinov2 calls the H axis "w"
    sqrt_N = math.sqrt(N)
    sx, sy = float(w0) / sqrt_N, float(h0) / sqrt_N
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(sqrt_N), int(sqrt_N), dim).permute(0, 3, 1, 2),
        scale_factor=(sx, sy), mode="bicubic", antialias=False)
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def _torch_outputs(model: TimmViT, images: np.ndarray) -> dict[str, np.ndarray]:
    """cls: DINOv2's forward (timm forward_features' CLS row; at another input size, timm's
    modules with dinov2's interpolated positions). tokens: AstroCLIP's ImageHead use of the
    backbone, norm(blocks(patch_embed(x))): no CLS, no positions."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        proj = model.patch_embed.proj
        patches = F.conv2d(x, proj.weight, proj.bias, stride=proj.stride).flatten(2).transpose(1, 2)
        tokens = model.norm(model.blocks(patches))
        if tuple(x.shape[2:]) == tuple(model.patch_embed.img_size):
            cls = model.forward_features(x)[:, 0]
        else:
            pos = _dinov2_interpolate(model.pos_embed, x.shape[2], x.shape[3], proj.stride[0])
            seq = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), patches], 1) + pos
            cls = model.norm(model.blocks(seq))[:, 0]
    return {"cls": cls.numpy(), "tokens": tokens.numpy()}


# ---------------------------------------------------------------- JAX side


def _jax_outputs(module: vit.VisionTransformer, variables, images: np.ndarray) -> dict[str, np.ndarray]:
    x = jnp.asarray(images)
    cls = jax.jit(functools.partial(module.apply, method="cls_embedding"))(variables, x)
    tokens = jax.jit(module.apply)(variables, x)
    return {"cls": np.asarray(cls), "tokens": np.asarray(tokens)}


def _from_state(sd, prefix="", num_heads=None):
    config, flat = conv.convert_state(sd, prefix, "test.ckpt", num_heads)
    module = towers.build_tower(conv.KIND, config)
    return module, jax.tree.map(jnp.asarray, flat_tree.unflatten(flat)), config


def _assert_close(ours, ref, keys=("cls", "tokens")):
    for key in keys:
        assert ours[key].shape == ref[key].shape, key
        err = float(np.max(np.abs(ours[key] - ref[key])))
        scale = float(np.max(np.abs(ref[key])))
        assert scale > 0.1, f"{key}: reference output is trivially small ({scale})"
        assert err <= TOL * scale, f"{key}: max abs diff {err:.2e} > {TOL} x max |ref| {scale:.2f}"
        print(f"{key}: max abs diff {err:.2e}, max |ref| {scale:.2f}")


def _images(n: int, h: int, w: int | None = None, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, h, w or h, 3)).astype(np.float32)


TEST = vit.SIZES["test"]


@pytest.fixture(scope="module")
def small():
    """The "test" size: timm reference, and the JAX module/variables converted from it
    (AstroDINO's chunked names, one block per chunk)."""
    model = _timm_vit(TEST, seed=1)
    module, variables, config = _from_state(_dinov2_state(model, chunks=2, seed=1),
                                            num_heads=TEST["num_heads"])
    return model, module, variables, config


# ---------------------------------------------------------------- parity


def test_timm_names_are_dinov2s(small):
    """timm's state_dict names are dinov2's (DinoVisionTransformer with block_chunks=0) but for
    the mask_token timm lacks, so the reference loads exactly what a dinov2 file holds."""
    model, *_ = small
    d = model.embed_dim
    want = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"}
    for i in range(len(model.blocks)):
        want |= {f"blocks.{i}.{n}" for n in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
            "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
            "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma")}
    assert set(model.state_dict()) == want
    assert model.state_dict()["blocks.0.attn.qkv.weight"].shape == (3 * d, d)


def test_small_matches_timm(small):
    model, module, variables, config = small
    assert config == {**TEST, "in_chans": 3, "layerscale": 1e-5, "qkv_bias": True,
                      "proj_bias": True, "ffn_bias": True, "interpolate_offset": 0.1}
    images = _images(3, TEST["img_size"])
    _assert_close(_jax_outputs(module, variables, images), _torch_outputs(model, images))


@pytest.mark.parametrize("hw", [(36, 36), (96, 96), (36, 60)])
def test_interpolated_positions_match_dinov2(small, hw):
    """CLS forward at other sizes than the 48 px training grid: down, up, non-square."""
    model, module, variables, _ = small
    images = _images(2, *hw, seed=2)
    ours = _jax_outputs(module, variables, images)
    _assert_close(ours, _torch_outputs(model, images))
    assert ours["tokens"].shape == (2, (hw[0] // 12) * (hw[1] // 12), TEST["embed_dim"])


@pytest.mark.parametrize("grid,offset", [((8, 8), 0.1), ((16, 20), 0.1), ((3, 14), 0.1),
                                         ((12, 12), 0.1), ((7, 9), 0.0)])
def test_pos_embed_table_matches_torch(grid, offset):
    """The resampled table itself against torch's bicubic with dinov2's arguments (offset 0:
    dinov2's newer `size=` call)."""
    pos = np.random.default_rng(3).normal(size=(1, 145, 16)).astype(np.float32)
    t = torch.from_numpy(pos)
    if offset:
        ref = _dinov2_interpolate(t, grid[0] * 12, grid[1] * 12, 12, offset).numpy()
    else:
        patch = F.interpolate(t[:, 1:].reshape(1, 12, 12, 16).permute(0, 3, 1, 2), size=grid,
                              mode="bicubic", antialias=False)
        ref = torch.cat([t[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, 16)], 1).numpy()
    ours = np.asarray(vit.interpolate_pos_embed(jnp.asarray(pos), grid, offset))
    assert ours.shape == ref.shape == (1, 1 + grid[0] * grid[1], 16)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_batch_of_one_equals_row_of_eight(small):
    _, module, variables, _ = small
    images = _images(8, TEST["img_size"], seed=4)
    eight = _jax_outputs(module, variables, images)
    for row in (0, 5):
        one = _jax_outputs(module, variables, images[row:row + 1])
        for key in ("cls", "tokens"):
            assert one[key].shape == (1,) + eight[key].shape[1:]
            np.testing.assert_allclose(one[key][0], eight[key][row], rtol=0,
                                       atol=1e-6 * np.abs(eight[key]).max())


def test_masked_tokens_use_mask_token(small):
    """iBOT masks in the standalone forward: a masked patch is replaced by mask_token before the
    positions (dinov2 prepare_tokens_with_masks), computed here with timm's modules."""
    model, module, variables, _ = small
    images = _images(2, TEST["img_size"], seed=5)
    masks = np.zeros((2, 16), bool)
    masks[0, [1, 6, 7]] = masks[1, [0, 15]] = True
    mask_token = torch.from_numpy(np.array(variables["params"]["mask_token"]))  # a writable copy
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        patches = model.patch_embed(x)
        patches = torch.where(torch.from_numpy(masks)[..., None], mask_token[None], patches)
        seq = torch.cat([model.cls_token.expand(2, -1, -1), patches], 1) + model.pos_embed
        ref = model.norm(model.blocks(seq))[:, 0].numpy()
    ours = np.asarray(module.apply(variables, jnp.asarray(images), masks=jnp.asarray(masks),
                                   method="cls_embedding"))
    _assert_close({"cls": ours}, {"cls": ref}, keys=("cls",))


def test_deep_chunked_file_in_any_key_order():
    """12 blocks in 4 chunks (blocks.<chunk>.<i>), keys in reverse order: blocks are taken by
    index (a lexical order would run block 10 before block 2)."""
    cfg = dict(img_size=24, patch_size=12, embed_dim=32, depth=12, num_heads=2, mlp_hidden=64)
    model = _timm_vit(cfg, seed=6)
    state = _dinov2_state(model, chunks=4, seed=6)
    assert "blocks.3.11.mlp.fc2.bias" in state and "blocks.0.2.ls1.gamma" in state
    module, variables, config = _from_state(dict(reversed(list(state.items()))), num_heads=2)
    assert config["depth"] == 12
    images = _images(2, 24, seed=6)
    _assert_close(_jax_outputs(module, variables, images), _torch_outputs(model, images))


def test_full_size_matches_timm():
    """The one full-size check: AstroDINO's ViT-L/12 at 144 px (304M parameters), batch 2, from a
    teacher checkpoint's content (backbone.* in 4 chunks + dino_head.*); heads by dinov2's rule."""
    cfg = vit.SIZES["vit_large_p12"]
    model = _timm_vit(cfg, seed=7)
    teacher = _teacher(_dinov2_state(model, chunks=4, seed=7), seed=7)
    module, variables, config = _from_state(teacher, prefix="backbone.")
    del teacher
    assert {k: config[k] for k in cfg} == cfg
    assert config["num_heads"] == 16  # 1024 // 64, not read from any tensor
    images = _images(2, 144, seed=7)
    ours = _jax_outputs(module, variables, images)
    del variables
    _assert_close(ours, _torch_outputs(model, images))


# ---------------------------------------------------------------- converter


def test_cli_converts_teacher_checkpoint(small, tmp_path):
    """python -m converters.dinov2 on a torch.save'd teacher checkpoint (read without torch by
    the safe loader) -> a tower directory that loads and gives timm's numbers."""
    model, *_ = small
    teacher = {k: torch.from_numpy(v) for k, v in _teacher(_dinov2_state(model, 2, 1), 1).items()}
    torch.save({"teacher": teacher}, tmp_path / "astrodino.ckpt")
    out = tmp_path / "tower"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "converters.dinov2", str(tmp_path / "astrodino.ckpt"), str(out),
           "--num-heads", str(TEST["num_heads"])]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    module, variables, weights = towers.load_tower_module(out, kind="dinov2_vit")
    assert weights.source["format"] == "dinov2-teacher"
    images = _images(2, TEST["img_size"], seed=8)
    _assert_close(_jax_outputs(module, variables, images), _torch_outputs(model, images))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        f"error: {out} already exists; pass --overwrite (overwrite=True) to replace it"]


@pytest.fixture()
def state(small):
    return _teacher(_dinov2_state(small[0], chunks=2, seed=1), seed=1)


def _refused(sd, match):
    with pytest.raises(common.ConversionError, match=match) as info:
        conv.convert_state(sd, "backbone.", "bad.ckpt", num_heads=4)
    assert "\n" not in str(info.value)


def test_rejects_missing_key(state):
    del state["backbone.blocks.1.1.ls2.gamma"]
    _refused(state, r"^bad\.ckpt: missing key\(s\) \['backbone\.blocks\.1\.1\.ls2\.gamma'\]$")


def test_rejects_extra_key(state):
    state["backbone.register_tokens"] = np.zeros((1, 4, 64), np.float32)
    _refused(state, r"^bad\.ckpt: unexpected key\(s\) \['backbone\.register_tokens'\]")


def test_rejects_wrong_shape(state):
    state["backbone.blocks.0.0.attn.proj.weight"] = np.zeros((64, 32), np.float32)
    _refused(state, r"^bad\.ckpt: key 'backbone\.blocks\.0\.0\.attn\.proj\.weight' has shape "
                    r"\(64, 32\), which gives \(32, 64\) for 'params/blocks_0/attn/proj/kernel'; "
                    r"expected \(64, 64\)$")


def test_rejects_missing_block_and_misplaced_chunks(state):
    gone = {k: v for k, v in state.items() if not k.startswith("backbone.blocks.0.0.")}
    _refused(gone, r"missing key\(s\) for block\(s\) \[0\] of 0\.\.1")
    swapped = {k.replace("blocks.0.0.", "blocks.1.0.").replace("blocks.1.1.", "blocks.0.1."): v
               for k, v in state.items()}
    _refused(swapped, r"block 1 is in chunk 0 after block 0 in chunk 1")


def test_num_heads_rule_and_hyper_parameters(state, small, tmp_path):
    """Heads are in no tensor: dinov2's head width 64 unless told (hyper-parameters or flag)."""
    assert conv.infer_config(state, "backbone.", "x")["num_heads"] == 1  # width 64
    with pytest.raises(common.ConversionError, match=r"num_heads 3 does not divide the width 64"):
        conv.infer_config(state, "backbone.", "x", num_heads=3)
    backbone = {k: torch.from_numpy(v) for k, v in _dinov2_state(small[0], 0, 1).items()}
    torch.save({"state_dict": backbone, "hyper_parameters": {"num_heads": 4}, "epoch": 3},
               tmp_path / "lightning.ckpt")
    _, _, weights = towers.load_tower_module(conv.convert(str(tmp_path / "lightning.ckpt"),
                                                          str(tmp_path / "tower")))
    assert weights.config["num_heads"] == 4 and weights.source["format"] == "lightning-state-dict"


def test_tower_sizes_build():
    """Every named size builds (shape-only) with the parameter count of its dinov2 arch."""
    counts = {}
    for size in vit.SIZES:
        cfg = towers.tower_config("dinov2_vit", size)
        s = cfg["img_size"]
        abstract = jax.eval_shape(towers.build_tower("dinov2_vit", cfg).init, jax.random.key(0),
                                  jnp.zeros((1, s, s, 3)))
        counts[size] = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    # ViT-L: 24 x 12.6M block + patch embed 12*12*3*1024 + positions 145*1024 + cls, mask, norm.
    d, h = 1024, 4096
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
    assert counts["vit_large_p12"] == 24 * block + (432 * d + d) + 145 * d + 2 * d + 2 * d
