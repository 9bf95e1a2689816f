"""SpecFormer checkpoint -> spectrum tower directory (`kind="specformer"`); the mappings of
AstroCLIP's SpecFormer backbone and cross-attention heads, for `converters.astroclip` too.

    python -m converters.specformer INPUT OUTPUT_DIR [--overwrite] [--num-heads N]

INPUT (a path, http(s) URL or hf://OWNER/REPO/FILE[@REVISION]) is upstream's `specformer.ckpt`
(polymathic-ai/specformer): a Lightning checkpoint whose `state_dict` holds the SpecFormer keys
with no prefix and whose `hyper_parameters` is a plain dict of SpecFormer's arguments. It is
opened with `converters.safe_pickle.load_checkpoint`: no torch, and nothing in the file runs.

Sizes come from the shapes: embed_dim from every tensor that carries it (`common.agreed_size`),
input_dim from data_embed and head, max_len from position_embed, num_layers from the block
indices. Head counts are not in any shape: they come from `num_heads` when given (command line
`--num-heads`), else the checkpoint's hyper_parameters["num_heads"], else 6 (configs/
specformer.yaml, the released model). Hyper-parameters that disagree with the shapes, a key that
is neither mapped nor ignored, a missing key, a wrong shape or a NaN/inf raise ConversionError
naming it; nothing is written then.

Heads (`head_config`, `head_mapping`, `split_in_proj`, `convert_head`): upstream's ImageHead and
SpectrumHead below `image_encoder.` / `spectrum_encoder.` hold `cross_attention.query`,
`cross_attention.multihead_attn.*` (torch nn.MultiheadAttention: a packed `in_proj_weight` when
kdim == embed_dim, else `q/k/v_proj_weight`; the bias is always the packed `in_proj_bias`),
`cross_attention.layernorm.*` and `mlp.{encoder,decoder}.*`. The packed tensors are split into
three source entries named `...in_proj_weight[q]`, `[k]`, `[v]` before mapping, so each maps to
one Flax variable and a wrong one is named.
"""

from __future__ import annotations

import argparse
import functools
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from astroclip_jax import files
from astroclip_jax.models import heads as heads_model
from astroclip_jax.models import specformer as specformer_model
from astroclip_jax.models import tower_weights
from converters import common
from converters.common import ConversionError

KIND = "specformer"
DEFAULT_NUM_HEADS = 6  # configs/specformer.yaml (the released specformer.ckpt)
DEFAULT_HEAD_HEADS = 4  # upstream ImageHead / SpectrumHead default `n_head` (configs/astroclip.yaml keeps it)
# Every tensor of a SpecFormer state_dict is converted (the masked-modelling head too). Old torch
# (< 2.0, no flash attention) registered a causal `mask` buffer, never for SpecFormer (causal=False).
IGNORED: tuple[str, ...] = ()
_HEAD_RESIDUAL = {"spectrum_encoder.": True, "image_encoder.": False}  # upstream SpectrumHead / ImageHead
_QKV = ("q", "k", "v")


def _carrier_size(sd, prefix, carriers, what, name) -> int:
    size = common.agreed_size(sd, [(prefix + k, axis, ndim) for k, axis, ndim in carriers], what, name)
    if size is None:
        raise ConversionError(f"{name}: missing key {prefix + carriers[0][0]!r} ({what})")
    return size


def infer_config(sd: Mapping[str, np.ndarray], prefix: str, name: str,
                 hyper_parameters: Mapping[str, Any] | None = None,
                 num_heads: int | None = None) -> dict[str, Any]:
    """SpecFormer kwargs from the shapes below `prefix` ("" for specformer.ckpt,
    "spectrum_encoder.backbone." in astroclip.ckpt); head count as the module docstring says."""
    hp = dict(hyper_parameters or {})
    embed_dim = _carrier_size(sd, prefix, [
        ("data_embed.weight", 0, 2), ("data_embed.bias", 0, 1), ("position_embed.weight", 1, 2),
        ("final_layernorm.weight", 0, 1), ("final_layernorm.bias", 0, 1), ("head.weight", 1, 2),
        ("blocks.0.layernorm1.weight", 0, 1)], "the embedding width", name)
    input_dim = _carrier_size(sd, prefix, [("data_embed.weight", 1, 2), ("head.weight", 0, 2),
                                           ("head.bias", 0, 1)], "the token width", name)
    max_len = _carrier_size(sd, prefix, [("position_embed.weight", 0, 2)], "max_len", name)
    blocks = {int(m.group(1)) for k in sd
              if (m := re.fullmatch(re.escape(prefix) + r"blocks\.(\d+)\..+", k))}
    if not blocks:
        raise ConversionError(f"{name}: no {prefix + 'blocks.<i>.*'!r} keys: not a SpecFormer state_dict")
    num_layers = max(blocks) + 1  # a gap is a missing key for convert_strict
    found = dict(input_dim=input_dim, embed_dim=embed_dim, num_layers=num_layers, max_len=max_len)
    for field, value in found.items():
        if field in hp and int(hp[field]) != value:
            raise ConversionError(f"{name}: hyper_parameters[{field!r}] = {hp[field]!r}, but the "
                                  f"weights have {field} = {value}")
    heads = int(num_heads if num_heads is not None else hp.get("num_heads", DEFAULT_NUM_HEADS))
    if heads < 1 or embed_dim % heads:
        raise ConversionError(f"{name}: num_heads = {heads} does not divide the embedding width "
                              f"{embed_dim}; pass the model's head count (--num-heads)")
    section = int(hp.get("slice_section_length", input_dim - 2))
    if section != input_dim - 2:
        raise ConversionError(f"{name}: hyper_parameters['slice_section_length'] = {section}, but "
                              f"tokens of {input_dim} values need {input_dim - 2} (2 are padding)")
    return dict(found, num_heads=heads, slice_section_length=section,
                slice_overlap=int(hp.get("slice_overlap", 10)), dropout=0.0)


def key_mapping(config: Mapping[str, Any], prefix: str,
                keys: Iterable[str] | None = None) -> dict[str, tuple[str, Any]]:
    """torch key -> (flat Flax name, transform) for a SpecFormer of `config`. `keys` is accepted
    for the same signature as `converters.dinov2.key_mapping`: SpecFormer's names are fixed."""
    del keys
    lin, same = common.linear_kernel, common.identity
    names = {"data_embed.weight": ("data_embed/kernel", lin), "data_embed.bias": ("data_embed/bias", same),
             "position_embed.weight": ("position_embed/embedding", same),
             "final_layernorm.weight": ("final_layernorm/scale", same),
             "final_layernorm.bias": ("final_layernorm/bias", same),
             "head.weight": ("head/kernel", lin), "head.bias": ("head/bias", same)}
    for i in range(config["num_layers"]):
        for ln in ("layernorm1", "layernorm2"):
            names[f"blocks.{i}.{ln}.weight"] = (f"blocks_{i}/{ln}/scale", same)
            names[f"blocks.{i}.{ln}.bias"] = (f"blocks_{i}/{ln}/bias", same)
        for layer in ("attention.attention", "attention.projection", "mlp.encoder", "mlp.decoder"):
            flax = f"blocks_{i}/{layer.replace('.', '/')}"
            names[f"blocks.{i}.{layer}.weight"] = (f"{flax}/kernel", lin)
            names[f"blocks.{i}.{layer}.bias"] = (f"{flax}/bias", same)
    return {prefix + k: (f"params/{flax}", fn) for k, (flax, fn) in names.items()}


def expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Flat Flax name -> shape, from the module itself (no arrays allocated)."""
    module = specformer_model.SpecFormer(**config)
    length = 10 * config["slice_section_length"]  # any length the tokeniser accepts
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.float32))
    return common.flat_shapes(abstract)


def convert_state_dict(sd: Mapping[str, np.ndarray], prefix: str, name: str,
                       hyper_parameters: Mapping[str, Any] | None = None,
                       num_heads: int | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config, flat Flax variables) of the SpecFormer below `prefix`; keys elsewhere are not
    looked at (astroclip.ckpt's other parts), every key below it must be mapped."""
    source = {k: v for k, v in sd.items() if k.startswith(prefix)}
    config = infer_config(source, prefix, name, hyper_parameters, num_heads)
    ignore = [re.escape(prefix) + p for p in IGNORED]
    flat = common.convert_strict(source, key_mapping(config, prefix, source), ignore,
                                 expected_shapes(config), name)
    return config, flat


# --- the cross-attention heads -------------------------------------------------------------

def _mha(prefix: str) -> str:
    return f"{prefix}cross_attention.multihead_attn."


def is_packed(sd: Mapping[str, np.ndarray], prefix: str) -> bool:
    """Whether the head below `prefix` stores torch's packed `in_proj_weight`."""
    return _mha(prefix) + "in_proj_weight" in sd


def head_config(sd: Mapping[str, np.ndarray], prefix: str, name: str, *,
                num_heads: int = DEFAULT_HEAD_HEADS, residual: bool | None = None) -> dict[str, Any]:
    """CrossAttentionHead kwargs of the head below `prefix` ("image_encoder." or
    "spectrum_encoder."). Head count: not in the weights, `num_heads` (upstream's default 4).
    `residual` defaults by prefix: upstream's SpectrumHead adds it, ImageHead does not."""
    if residual is None:
        if prefix not in _HEAD_RESIDUAL:
            raise ValueError(f"prefix {prefix!r}: pass residual= (known: {sorted(_HEAD_RESIDUAL)})")
        residual = _HEAD_RESIDUAL[prefix]
    mha = "cross_attention.multihead_attn."
    width = [("cross_attention.query", 2, 3), (mha + "out_proj.weight", 0, 2),
             (mha + "out_proj.bias", 0, 1), ("cross_attention.layernorm.weight", 0, 1),
             ("cross_attention.layernorm.bias", 0, 1), ("mlp.encoder.weight", 1, 2),
             ("mlp.decoder.weight", 0, 2), ("mlp.decoder.bias", 0, 1)]
    embed_dim = _carrier_size(sd, prefix, width, "the head's embedding width", name)
    if is_packed(sd, prefix):
        kv_dim = embed_dim  # torch packs only when kdim == vdim == embed_dim
    else:
        kv_dim = _carrier_size(sd, prefix, [(mha + "k_proj_weight", 1, 2), (mha + "v_proj_weight", 1, 2)],
                               "the head's key/value width", name)
    hidden = _carrier_size(sd, prefix, [("mlp.encoder.weight", 0, 2), ("mlp.encoder.bias", 0, 1),
                                        ("mlp.decoder.weight", 1, 2)], "the head's MLP width", name)
    if hidden % embed_dim:
        raise ConversionError(f"{name}: key {prefix + 'mlp.encoder.weight'!r}: MLP width {hidden} is "
                              f"not a multiple of the embedding width {embed_dim}")
    if embed_dim % num_heads:
        raise ConversionError(f"{name}: num_heads = {num_heads} does not divide the head's "
                              f"embedding width {embed_dim}")
    return dict(embed_dim=embed_dim, num_heads=int(num_heads), kv_dim=kv_dim,
                mlp_ratio=hidden // embed_dim, residual=bool(residual), dropout=0.0)


def split_in_proj(sd: Mapping[str, np.ndarray], prefix: str, embed_dim: int,
                  name: str) -> dict[str, np.ndarray]:
    """`sd` with the head's packed `in_proj_weight` / `in_proj_bias` replaced by their q, k, v
    thirds (keys `...in_proj_weight[q]` ...), the names `head_mapping` uses."""
    out = dict(sd)
    for param, ndim in (("in_proj_weight", 2), ("in_proj_bias", 1)):
        key = _mha(prefix) + param
        if key not in out:
            continue  # the weight exists only when packed; convert_strict names a missing bias
        value = np.asarray(out.pop(key))
        want = (3 * embed_dim, embed_dim)[:ndim]
        if value.shape != want:
            raise ConversionError(f"{name}: key {key!r} has shape {value.shape}, expected {want} "
                                  "(q, k and v stacked)")
        for i, part in enumerate(_QKV):
            out[f"{key}[{part}]"] = value[i * embed_dim:(i + 1) * embed_dim]
    return out


def head_mapping(config: Mapping[str, Any], prefix: str, packed: bool) -> dict[str, tuple[str, Any]]:
    """Source key (after `split_in_proj`) -> (flat Flax name of a CrossAttentionHead, transform).
    The names start at the head ("params/cross_attention/query"): nest them where the head sits."""
    del config  # every head has the same names; kept for the same signature as key_mapping
    lin, same = common.linear_kernel, common.identity
    mha = _mha(prefix)
    flax_mha = "params/cross_attention/multihead_attn"
    mapping = {f"{prefix}cross_attention.query": ("params/cross_attention/query", same),
               mha + "out_proj.weight": (f"{flax_mha}/out_proj/kernel", lin),
               mha + "out_proj.bias": (f"{flax_mha}/out_proj/bias", same)}
    for part in _QKV:
        weight = f"{mha}in_proj_weight[{part}]" if packed else f"{mha}{part}_proj_weight"
        mapping[weight] = (f"{flax_mha}/{part}_proj/kernel", lin)
        mapping[f"{mha}in_proj_bias[{part}]"] = (f"{flax_mha}/{part}_proj/bias", same)
    for torch_name, flax in (("cross_attention.layernorm.weight", "cross_attention/layernorm/scale"),
                             ("cross_attention.layernorm.bias", "cross_attention/layernorm/bias")):
        mapping[prefix + torch_name] = (f"params/{flax}", same)
    for layer in ("encoder", "decoder"):
        mapping[f"{prefix}mlp.{layer}.weight"] = (f"params/mlp/{layer}/kernel", lin)
        mapping[f"{prefix}mlp.{layer}.bias"] = (f"params/mlp/{layer}/bias", same)
    return mapping


def head_expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    module = heads_model.CrossAttentionHead(**config)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                              jnp.zeros((1, 2, config["kv_dim"]), jnp.float32))
    return common.flat_shapes(abstract)


def convert_head(sd: Mapping[str, np.ndarray], prefix: str, name: str, *,
                 num_heads: int = DEFAULT_HEAD_HEADS, residual: bool | None = None,
                 backbone: str = "backbone.") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config, flat variables) of the head below `prefix`: every key below it but the
    `backbone` ones must be the head's."""
    source = {k: v for k, v in sd.items()
              if k.startswith(prefix) and not k.startswith(prefix + backbone)}
    config = head_config(source, prefix, name, num_heads=num_heads, residual=residual)
    packed = is_packed(source, prefix)
    source = split_in_proj(source, prefix, config["embed_dim"], name)
    flat = common.convert_strict(source, head_mapping(config, prefix, packed), [],
                                 head_expected_shapes(config), name)
    return config, flat


# --- specformer.ckpt ------------------------------------------------------------------------

def convert(source: str, out_dir: str, overwrite: bool = False, num_heads: int | None = None) -> str:
    """Converts upstream's specformer.ckpt into a tower directory; returns its path."""
    from converters import safe_pickle  # the safe loader (no torch, nothing executed)

    common.checked_output(out_dir, tower_weights.output_kind(KIND), overwrite)
    path = common.fetch(source)
    name = str(source)
    ckpt, _ = safe_pickle.load_checkpoint(path)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise ConversionError(f"{name}: expected a Lightning checkpoint with a 'state_dict' "
                              "(upstream's specformer.ckpt)")
    hp = ckpt.get("hyper_parameters")
    if hp is not None and not isinstance(hp, Mapping):
        raise ConversionError(f"{name}: 'hyper_parameters' is a {type(hp).__name__}, expected a "
                              "plain dict (use converters.astroclip for astroclip.ckpt)")
    sd = {k: np.asarray(v) for k, v in ckpt["state_dict"].items()}
    config, flat = convert_state_dict(sd, "", name, hp, num_heads)
    info = {"input": name, "sha256": files.sha256_file(path), "format": "lightning specformer.ckpt",
            "num_heads_from": ("argument" if num_heads is not None else
                               "hyper_parameters" if hp and "num_heads" in hp else "default")}
    return tower_weights.save_tower(out_dir, KIND, config, tower_weights.unflatten(flat),
                                    source=info, overwrite=overwrite)


def main(argv=None) -> None:
    # common.cli has boolean switches only; the head count is read here and bound to convert.
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--num-heads", type=int, default=None)
    known, rest = parser.parse_known_args(argv)
    common.cli(__doc__.splitlines()[0], functools.partial(convert, num_heads=known.num_heads), rest)


if __name__ == "__main__":
    main()
