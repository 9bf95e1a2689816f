"""DINOv2 / AstroDINO checkpoint -> a Flax "dinov2_vit" tower directory.

    python -m converters.dinov2 INPUT OUTPUT_DIR [--overwrite] [--num-heads N]

INPUT (a path or URL that `common.fetch` reads) is one of:
  * `astrodino.ckpt` (polymathic-ai/astrodino): DINOv2's teacher checkpoint
    `{"teacher": {"backbone.<vit key>": ..., "dino_head.*": ...}}` (the `dino_head.*` /
    `ibot_head.*` projection heads are training-only and deliberately dropped, see `IGNORED`);
  * a plain DINOv2 backbone state_dict, with or without the `backbone.` prefix, bare or as a
    Lightning-style `{"state_dict": ..., "hyper_parameters": ...}`.
Block names may be chunked (`blocks.<chunk>.<i>.*`, AstroDINO's `block_chunks: 4`) or not
(`blocks.<i>.*`); blocks are taken by their index i, never by the order of the keys.

Sizes come from the shapes: width from every tensor carrying it (`common.agreed_size`), patch
size and channels from the patch embedding, the training grid (hence img_size) from `pos_embed`,
MLP width from every block's fc1/fc2, biases and LayerScale from which keys exist, depth from the
block indices. The number of attention heads is not in any tensor: it is `--num-heads` when
given, else `num_heads` from the checkpoint's hyper-parameters when the file has them, else
dinov2's rule head_dim = 64 (`embed_dim // 64`: 16 for ViT-L / AstroDINO, 6 for ViT-S).
Every source tensor is mapped or on `IGNORED`, every shape is checked against the Flax module,
NaN/inf is refused; nothing is written on failure.

The file is opened with `converters.safe_pickle.load_checkpoint`: tensors come back as NumPy
arrays, no torch and no upstream package is needed, and nothing the pickle names is run.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np

from astroclip_jax import errors
from converters import common
from converters.common import ConversionError

KIND = "dinov2_vit"
# Teacher-checkpoint keys deliberately not converted: DINO / iBOT projection heads (training only).
IGNORED = (r"dino_head\..*", r"ibot_head\..*")
# AstroDINO's config: `student.layerscale: 1.0e-05` (only the init value; the trained gammas
# are converted).
_LAYERSCALE_INIT = 1e-5
_HEAD_DIM = 64  # dinov2's vit_small/base/large/giant2 all have 64-wide heads
# blocks.<i>.<rest> or, chunked (block_chunks > 0), blocks.<chunk>.<i>.<rest>.
_BLOCK = re.compile(r"blocks\.(?:(\d+)\.)?(\d+)\.(.+)")


def _block_prefixes(keys: Iterable[str], prefix: str, name: str) -> dict[int, str]:
    """Block index -> its torch name prefix ("blocks.1.7." or "blocks.7."), from the keys.

    Chunked files repeat nothing: each index must sit in one chunk, and chunks must follow the
    index order (upstream runs chunk 0's blocks, then chunk 1's, ...), else the file is refused.
    """
    found: dict[int, str] = {}
    chunk_of: dict[int, int | None] = {}
    for key in keys:
        if not key.startswith(prefix + "blocks."):
            continue
        m = _BLOCK.fullmatch(key[len(prefix):])
        if not m:
            raise ConversionError(f"{name}: key {key!r} is not a block parameter "
                                  "(expected blocks.<i>.* or blocks.<chunk>.<i>.*)")
        chunk = None if m.group(1) is None else int(m.group(1))
        index = int(m.group(2))
        block = f"{prefix}blocks.{'' if chunk is None else f'{chunk}.'}{index}."
        if index in found and found[index] != block:
            raise ConversionError(f"{name}: key {key!r}: block {index} is also named "
                                  f"{found[index]!r}* (one block, two names)")
        found[index], chunk_of[index] = block, chunk
    if not found:
        raise ConversionError(f"{name}: no {prefix}blocks.* keys (not a DINOv2 vision transformer)")
    if len({c is None for c in chunk_of.values()}) > 1:
        raise ConversionError(f"{name}: block names mix chunked (blocks.<chunk>.<i>) and plain "
                              "(blocks.<i>) forms")
    depth = max(found) + 1
    missing = sorted(set(range(depth)) - set(found))
    if missing:
        raise ConversionError(f"{name}: missing key(s) for block(s) {missing} of 0..{depth - 1} "
                              f"(expected e.g. {prefix}blocks.{missing[0]}.norm1.weight)")
    order = [chunk_of[i] for i in range(depth)]
    if order[0] is not None and order != sorted(order):
        i = next(i for i in range(1, depth) if order[i] < order[i - 1])
        raise ConversionError(f"{name}: block {i} is in chunk {order[i]} after block {i - 1} in "
                              f"chunk {order[i - 1]}; chunks must follow the block order")
    return found


def _hyper_num_heads(obj: Any) -> int | None:
    """`num_heads` from a checkpoint's hyper-parameters (a plain dict), if it states one."""
    if isinstance(obj, Mapping):
        hyper = obj.get("hyper_parameters")
        if isinstance(hyper, Mapping) and isinstance(hyper.get("num_heads"), (int, np.integer)):
            return int(hyper["num_heads"])
    return None


def infer_config(sd: Mapping[str, np.ndarray], prefix: str, name: str,
                 num_heads: int | None = None) -> dict[str, Any]:
    """The `VisionTransformer` config of the backbone under `prefix` ("backbone.", "" ...).

    Args:
      sd: key -> array (other prefixes may be present; only `prefix` keys are read).
      num_heads: the number of attention heads (not in the weights); None: embed_dim // 64.
    """
    p = prefix
    blocks = _block_prefixes(sd, p, name)
    b0 = blocks[0]
    for key, ndim in ((f"{p}patch_embed.proj.weight", 4), (f"{p}pos_embed", 3),
                      (f"{b0}mlp.fc1.weight", 2)):
        if key not in sd:
            raise ConversionError(f"{name}: missing key {key!r}")
        if np.ndim(sd[key]) != ndim:
            raise ConversionError(f"{name}: key {key!r} has shape {tuple(np.shape(sd[key]))}, "
                                  f"expected {ndim} dimensions")
    embed_dim = common.agreed_size(sd, [
        (f"{p}cls_token", 2, 3), (f"{p}pos_embed", 2, 3), (f"{p}mask_token", 1, 2),
        (f"{p}patch_embed.proj.weight", 0, 4), (f"{p}patch_embed.proj.bias", 0, 1),
        (f"{p}norm.weight", 0, 1), (f"{p}norm.bias", 0, 1)], "the width (embed_dim)", name)
    proj = sd[f"{p}patch_embed.proj.weight"]
    if proj.shape[2] != proj.shape[3]:
        raise ConversionError(f"{name}: key {p + 'patch_embed.proj.weight'!r} has shape "
                              f"{tuple(proj.shape)}: expected a square patch")
    patch = int(proj.shape[2])
    n_pos = int(sd[f"{p}pos_embed"].shape[1]) - 1  # one entry for the CLS token
    grid = math.isqrt(max(n_pos, 0))
    if n_pos < 1 or grid * grid != n_pos:
        raise ConversionError(f"{name}: key {p + 'pos_embed'!r} has shape "
                              f"{tuple(sd[p + 'pos_embed'].shape)}: expected 1 + a square number "
                              "of positions (CLS + an M x M patch grid)")
    mlp_hidden = common.agreed_size(
        sd, [c for i, b in blocks.items() for c in ((f"{b}mlp.fc1.weight", 0, 2),
             (f"{b}mlp.fc1.bias", 0, 1), (f"{b}mlp.fc2.weight", 1, 2))],
        "the MLP width", name)
    if num_heads is None:
        if embed_dim % _HEAD_DIM:
            raise ConversionError(f"{name}: width {embed_dim} is not a multiple of dinov2's head "
                                  f"width {_HEAD_DIM}; give the number of heads (--num-heads)")
        num_heads = embed_dim // _HEAD_DIM
    if num_heads < 1 or embed_dim % num_heads:
        raise ConversionError(f"{name}: num_heads {num_heads} does not divide the width {embed_dim}")
    return dict(img_size=grid * patch, patch_size=patch, in_chans=int(proj.shape[1]),
                embed_dim=embed_dim, depth=len(blocks), num_heads=int(num_heads),
                mlp_hidden=mlp_hidden,
                layerscale=_LAYERSCALE_INIT if f"{b0}ls1.gamma" in sd else None,
                qkv_bias=f"{b0}attn.qkv.bias" in sd, proj_bias=f"{b0}attn.proj.bias" in sd,
                ffn_bias=f"{b0}mlp.fc1.bias" in sd, interpolate_offset=0.1)


def key_mapping(config: Mapping[str, Any], prefix: str, keys: Iterable[str]
                ) -> dict[str, tuple[str, Any]]:
    """torch key -> (flat Flax name, transform) for a ViT config; `keys` (the file's) say how
    blocks are named (chunked or not). Everything the module has is listed, so a missing
    source key is named by `common.convert_strict`."""
    ident, linear = common.identity, common.linear_kernel
    keys = list(keys)
    named = _block_prefixes(keys, prefix, "") if any(
        k.startswith(prefix + "blocks.") for k in keys) else {}
    m = {f"{prefix}{n}": (f"params/{n}", ident) for n in ("cls_token", "pos_embed", "mask_token")}
    m[f"{prefix}patch_embed.proj.weight"] = ("params/patch_embed/proj/kernel", common.conv2d_kernel)
    m[f"{prefix}patch_embed.proj.bias"] = ("params/patch_embed/proj/bias", ident)
    m[f"{prefix}norm.weight"] = ("params/norm/scale", ident)
    m[f"{prefix}norm.bias"] = ("params/norm/bias", ident)
    linears = [("attn.qkv", config["qkv_bias"]), ("attn.proj", config["proj_bias"]),
               ("mlp.fc1", config["ffn_bias"]), ("mlp.fc2", config["ffn_bias"])]
    for i in range(config["depth"]):
        t, f = named.get(i, f"{prefix}blocks.{i}."), f"params/blocks_{i}/"
        for norm in ("norm1", "norm2"):
            m[f"{t}{norm}.weight"] = (f"{f}{norm}/scale", ident)
            m[f"{t}{norm}.bias"] = (f"{f}{norm}/bias", ident)
        for layer, bias in linears:
            flax = f + layer.replace(".", "/")
            m[f"{t}{layer}.weight"] = (f"{flax}/kernel", linear)
            if bias:
                m[f"{t}{layer}.bias"] = (f"{flax}/bias", ident)
        if config["layerscale"]:
            for ls in ("ls1", "ls2"):
                m[f"{t}{ls}.gamma"] = (f"{f}{ls}/gamma", ident)
    return m


def expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Flat Flax name -> shape of the module's variables (no compilation, no memory)."""
    import jax
    import jax.numpy as jnp

    from astroclip_jax.models.towers import build_tower

    size = config["img_size"]
    abstract = jax.eval_shape(build_tower(KIND, config).init, jax.random.key(0),
                              jnp.zeros((1, size, size, config["in_chans"]), jnp.float32))
    return common.flat_shapes(abstract)


def convert_state(sd: Mapping[str, np.ndarray], prefix: str, name: str,
                  num_heads: int | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config, flat Flax variables) of the ViT under `prefix` in `sd`, strictly: every key
    outside `prefix` must match `IGNORED` (a caller converting more than the ViT from one file
    maps those itself with `infer_config` + `key_mapping`)."""
    config = infer_config(sd, prefix, name, num_heads)
    flat = common.convert_strict(sd, key_mapping(config, prefix, sd), IGNORED,
                                 expected_shapes(config), name)
    return config, flat


def extract_state_dict(obj: Any, name: str) -> tuple[dict[str, np.ndarray], str, str]:
    """(key -> array, prefix of the ViT keys, format name) from what the file holds."""
    if isinstance(obj, Mapping) and "teacher" in obj:
        state, fmt = obj["teacher"], "dinov2-teacher"
        others = sorted(str(k) for k in obj if k != "teacher")
        if others:  # training checkpoints carry optimiser state etc.: not this file
            raise ConversionError(f"{name}: unexpected top-level key(s) {others[:10]} next to "
                                  "'teacher' (expected DINOv2's teacher checkpoint {'teacher': ...})")
    elif isinstance(obj, Mapping) and "state_dict" in obj:  # Lightning: may state num_heads
        state, fmt = obj["state_dict"], "lightning-state-dict"
    else:
        state, fmt = obj, "dinov2-state-dict"
    if not isinstance(state, Mapping):
        raise ConversionError(f"{name}: expected a dict of tensors, found {type(state).__name__}")
    not_tensors = [str(k) for k, v in state.items() if not hasattr(v, "shape")]
    if not_tensors:
        raise ConversionError(f"{name}: entries that are not tensors: {not_tensors[:10]}")
    state = common.to_numpy(state)
    prefix = "backbone." if any(k.startswith("backbone.") for k in state) else ""
    return state, prefix, fmt


def convert(input_path_or_url: str, output_dir: str, overwrite: bool = False,
            num_heads: int | None = None) -> str:
    """Converts a DINOv2 / AstroDINO checkpoint to a tower directory; returns its path."""
    from astroclip_jax import files
    from astroclip_jax.models import tower_weights
    from converters import safe_pickle

    common.checked_output(output_dir, tower_weights.output_kind(KIND), overwrite)
    path = common.fetch(input_path_or_url)
    name = os.path.basename(path)
    obj, _ = safe_pickle.load_checkpoint(path)
    state, prefix, fmt = extract_state_dict(obj, name)
    config, flat = convert_state(state, prefix, name,
                                 num_heads if num_heads is not None else _hyper_num_heads(obj))
    source = {"file": name, "sha256": files.sha256_file(path), "format": fmt,
              "url": input_path_or_url if path != input_path_or_url else None}
    return tower_weights.save_tower(output_dir, KIND, config, tower_weights.unflatten(flat),
                                    source=source, overwrite=overwrite)


def main(argv=None) -> None:
    # common.cli only knows boolean switches; --num-heads takes a number.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="local checkpoint path or URL")
    parser.add_argument("output_dir", help="directory to write (tower.json + variables.npz)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads (not stored in the weights); default: the file's "
                             f"hyper-parameters, else width // {_HEAD_DIM}")
    args = parser.parse_args(argv)
    try:
        out = convert(args.input, args.output_dir, overwrite=args.overwrite, num_heads=args.num_heads)
    except errors.UserError as e:  # anything else is a bug: its traceback stays
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
