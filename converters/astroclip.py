"""PolymathicAI's released AstroCLIP checkpoints -> tower directories (no upstream package needed).

    python -m converters.astroclip SOURCE OUT_DIR [--overwrite]

SOURCE is a local file, an http(s) URL or `hf://OWNER/REPO/FILE[@REVISION]` (downloaded through
huggingface_hub into its cache; HF_HUB_OFFLINE=1 reads only the cache), holding one of
  * `astroclip.ckpt` (polymathic-ai/astroclip): a Lightning checkpoint whose state_dict holds
    `image_encoder.backbone.*` (AstroDINO, a DINOv2 ViT), `image_encoder.{cross_attention,mlp}.*`
    (the image head), `spectrum_encoder.backbone.*` (SpecFormer) and
    `spectrum_encoder.{cross_attention,mlp}.*` (the spectrum head). Written: OUT_DIR/image_tower/
    (kind "dinov2_vit"), OUT_DIR/spectrum_tower/ (kind "specformer") and OUT_DIR/heads/ (kind
    "astroclip_heads", params {"image_head": ..., "spectrum_head": ...});
  * `astrodino.ckpt` (polymathic-ai/astrodino): DINOv2's teacher checkpoint {"teacher":
    {backbone.*, dino_head.*}} -> OUT_DIR/image_tower/ (the DINO head is not converted);
  * `specformer.ckpt` (polymathic-ai/specformer): a Lightning checkpoint with an unprefixed
    SpecFormer state_dict -> OUT_DIR/spectrum_tower/.
The kind is read from the file's structure, not its name.

The file is opened by `safe_pickle.load_checkpoint`: no torch, and nothing named in the pickle
runs (astroclip.ckpt pickles upstream's modules in its hyper-parameters; they become inert
records, from which the head counts are read, since no weight shape carries them). Every
state_dict key is mapped or on an explicit ignore list, every shape is checked against the Flax
modules, and nothing is written unless all of it converts: OUT_DIR appears whole or not at all.
tower.json records the source file, its sha256 and, for hub files, the repository and revision.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from astroclip_jax import files
from astroclip_jax.models import tower_weights
from converters import common, safe_pickle
from converters.common import ConversionError

IMAGE_KIND, SPECTRUM_KIND, HEADS_KIND = "dinov2_vit", "specformer", "astroclip_heads"
MARKER = "astroclip.json"  # what marks OUT_DIR as this converter's (so --overwrite may replace it)
OUTPUT_KIND = files.OutputKind("converted AstroCLIP folder", MARKER, (("kind", "astroclip"),),
                               frozenset({MARKER, "image_tower", "spectrum_tower", "heads"}))
IMAGE_DIR, SPECTRUM_DIR, HEADS_DIR = "image_tower", "spectrum_tower", "heads"

# Top-level entries of a Lightning checkpoint besides the state_dict: training state, not weights.
LIGHTNING_IGNORED = ("epoch", "global_step", "pytorch-lightning_version", "loops", "callbacks",
                     "optimizer_states", "lr_schedulers", "hparams_name", "hyper_parameters",
                     "hparams_type", "datamodule_hparams_name", "datamodule_hyper_parameters",
                     "native_amp_scaling_state", "amp_scaling_state")
# Where each part sits in astroclip.ckpt's state_dict.
IMAGE_BACKBONE, SPECTRUM_BACKBONE = "image_encoder.backbone.", "spectrum_encoder.backbone."
IMAGE_HEAD, SPECTRUM_HEAD = "image_encoder.", "spectrum_encoder."
# Upstream's heads: the residual around the MLP is on the spectrum side only (SpectrumHead:
# x + mlp(x); ImageHead: mlp(x)).
RESIDUAL = {"image": False, "spectrum": True}


def detect_kind(obj: Any, name: str) -> str:
    """"astroclip", "astrodino" or "specformer", from the checkpoint's structure."""
    if isinstance(obj, Mapping) and isinstance(obj.get("teacher"), Mapping):
        if any(str(k).startswith("backbone.") for k in obj["teacher"]):
            return "astrodino"
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        keys = [str(k) for k in obj["state_dict"]]
        if any(k.startswith(IMAGE_BACKBONE) for k in keys) and any(
                k.startswith(SPECTRUM_BACKBONE) for k in keys):
            return "astroclip"
        if "data_embed.weight" in keys and "position_embed.weight" in keys:
            return "specformer"
    shown = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise ConversionError(
        f"{name}: not an AstroCLIP checkpoint: expected a Lightning checkpoint with "
        f"'{IMAGE_BACKBONE}*' and '{SPECTRUM_BACKBONE}*' (astroclip.ckpt) or 'data_embed.*' "
        f"(specformer.ckpt) state_dict keys, or DINOv2's {{'teacher': {{'backbone.*'}}}} "
        f"(astrodino.ckpt); found {shown}")


def _state_dict(obj: Mapping[str, Any], kind: str, name: str) -> dict[str, np.ndarray]:
    if kind == "astrodino":
        stray = sorted(str(k) for k in obj if k != "teacher")
        state = obj["teacher"]
    else:
        stray = sorted(str(k) for k in obj if k != "state_dict" and k not in LIGHTNING_IGNORED)
        state = obj["state_dict"]
    if stray:
        raise ConversionError(f"{name}: unexpected top-level entries {stray[:10]} in a {kind} "
                              "checkpoint (neither weights nor known Lightning training state)")
    not_arrays = [str(k) for k, v in state.items() if not isinstance(v, np.ndarray)]
    if not_arrays:
        raise ConversionError(f"{name}: state_dict entries that are not tensors: {not_arrays[:10]}")
    return {str(k): v for k, v in state.items()}


# ------------------------------------------------------------- hyper-parameters (inert)

def _field(record: Any, *path: str) -> Any:
    """Follows attribute / key names through inert records and dicts; None where absent."""
    for step in path:
        if isinstance(record, safe_pickle.Inert):
            state = record.state if isinstance(record.state, Mapping) else {}
            modules = state.get("_modules") or {}
            record = (record.items.get(step) if step in record.items
                      else modules.get(step) if step in modules else state.get(step))
        elif isinstance(record, Mapping):
            record = record.get(step)
        else:
            return None
    return record


def _plain(value: Any) -> Any:
    return value.items if isinstance(value, safe_pickle.Inert) else value


def hparam_overrides(obj: Mapping[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    """What the pickled hyper-parameters say that the weights cannot (head counts, SpecFormer's
    windowing), per part: {"image": {...}, "spectrum": {SpecFormer's numeric kwargs},
    "image_head": ..., "spectrum_head": ...}."""
    hp = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
    out: dict[str, dict[str, Any]] = {"image": {}, "spectrum": {}, "image_head": {},
                                      "spectrum_head": {}}
    spec_hp: Any = None
    if kind == "specformer":
        spec_hp = hp
    elif kind == "astroclip":
        spec_hp = _plain(_field(hp, "spectrum_encoder", "backbone", "_hparams"))
        heads = _field(hp, "image_encoder", "backbone", "num_heads")
        if isinstance(heads, int):
            out["image"]["num_heads"] = heads
        for side in ("image", "spectrum"):
            n = _field(hp, f"{side}_encoder", "cross_attention", "multihead_attn", "num_heads")
            if isinstance(n, int):
                out[f"{side}_head"]["num_heads"] = n
    if isinstance(spec_hp, Mapping):  # SpecFormer's own kwargs: its converter checks them all
        out["spectrum"] = {k: v for k, v in spec_hp.items() if isinstance(k, str) and isinstance(
            v, (int, float)) and not isinstance(v, bool)}
    return out


def _check_width(head_config: Mapping[str, Any], tower_config: Mapping[str, Any], side: str,
                 name: str) -> None:
    if int(head_config["kv_dim"]) != int(tower_config["embed_dim"]):
        raise ConversionError(f"{name}: the {side} head attends over width {head_config['kv_dim']} "
                              f"but the {side} tower's tokens have width {tower_config['embed_dim']}")


def _convert_astroclip(state: Mapping[str, np.ndarray], over: Mapping[str, Mapping[str, Any]],
                       name: str) -> dict[str, tuple[str, dict, dict]]:
    """folder -> (kind, config, nested variables) of both towers and both heads."""
    stray = [k for k in state if not k.startswith((IMAGE_HEAD, SPECTRUM_HEAD))]
    if stray:
        raise ConversionError(f"{name}: unexpected key(s) {stray[:10]} outside "
                              f"{IMAGE_HEAD}* and {SPECTRUM_HEAD}*")
    from converters import dinov2, specformer  # (after the cheap checks: they import JAX models)

    image = {k: v for k, v in state.items() if k.startswith(IMAGE_BACKBONE)}
    image_config, image_flat = dinov2.convert_state(image, IMAGE_BACKBONE, name,
                                                    num_heads=over["image"].get("num_heads"))
    spectrum_config, spectrum_flat = specformer.convert_state_dict(
        state, SPECTRUM_BACKBONE, name, hyper_parameters=over["spectrum"] or None)
    head_configs, head_params = {}, {}
    for side, prefix, tower_config in (("image", IMAGE_HEAD, image_config),
                                       ("spectrum", SPECTRUM_HEAD, spectrum_config)):
        heads = over[f"{side}_head"].get("num_heads", specformer.DEFAULT_HEAD_HEADS)
        config, flat = specformer.convert_head(state, prefix, name, num_heads=heads,
                                               residual=RESIDUAL[side])
        _check_width(config, tower_config, side, name)
        head_configs[f"{side}_head"] = config
        head_params[f"{side}_head"] = tower_weights.unflatten(flat)["params"]
    return {IMAGE_DIR: (IMAGE_KIND, image_config, tower_weights.unflatten(image_flat)),
            SPECTRUM_DIR: (SPECTRUM_KIND, spectrum_config, tower_weights.unflatten(spectrum_flat)),
            HEADS_DIR: (HEADS_KIND, head_configs, {"params": head_params})}


def source_record(source: str, path: str, fmt: str, prefix: str | None) -> dict[str, Any]:
    """Where a tower came from, for tower.json."""
    record: dict[str, Any] = {"file": os.path.basename(path), "sha256": files.sha256_file(path),
                              "format": fmt, "prefix": prefix}
    if str(source).startswith(common.HUB_SCHEME):
        repo_id, filename, revision = common.parse_hub(str(source))
        record.update(url=str(source), hub_repo=repo_id, hub_file=filename,
                      hub_revision=common.hub_revision(path) or revision)
    elif common.is_url(source):
        record["url"] = str(source)
    return record


def convert(source: str, out_dir: str, overwrite: bool = False) -> str:
    """Converts astroclip.ckpt, astrodino.ckpt or specformer.ckpt into OUT_DIR; returns it."""
    out_dir = common.checked_output(out_dir, OUTPUT_KIND, overwrite)
    path = common.fetch(source)
    name = os.path.basename(path)
    obj, _report = safe_pickle.load_checkpoint(path)
    kind = detect_kind(obj, name)
    state = _state_dict(obj, kind, name)
    over = hparam_overrides(obj, kind)
    if kind == "astroclip":
        parts = _convert_astroclip(state, over, name)
        prefixes = {IMAGE_DIR: IMAGE_BACKBONE, SPECTRUM_DIR: SPECTRUM_BACKBONE, HEADS_DIR: None}
        fmt = "astroclip-lightning"
    elif kind == "astrodino":
        from converters import dinov2

        # dinov2.IGNORED drops dino_head.* / ibot_head.*; convert_strict still refuses NaN there.
        config, flat = dinov2.convert_state(state, "backbone.", name)
        parts = {IMAGE_DIR: (IMAGE_KIND, config, tower_weights.unflatten(flat))}
        prefixes, fmt = {IMAGE_DIR: "backbone."}, "dinov2-teacher"
    else:
        from converters import specformer

        config, flat = specformer.convert_state_dict(state, "", name,
                                                     hyper_parameters=over["spectrum"] or None)
        parts = {SPECTRUM_DIR: (SPECTRUM_KIND, config, tower_weights.unflatten(flat))}
        prefixes, fmt = {SPECTRUM_DIR: ""}, "specformer-lightning"
    # Everything converted: now write, all of OUT_DIR at once.
    with files.atomic_directory(out_dir, OUTPUT_KIND, "OUTPUT_DIR") as tmp:
        for folder, (part_kind, config, variables) in parts.items():
            record = source_record(source, path, fmt, prefixes[folder])
            tower_weights.save_tower(os.path.join(tmp, folder), part_kind, config, variables,
                                     source={**record, "checkpoint_kind": kind})
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            json.dump({"kind": "astroclip", "checkpoint_kind": kind, "parts": sorted(parts),
                       "source": source_record(source, path, fmt, None)}, f, indent=2)
    return out_dir


def main(argv=None) -> None:
    common.cli(__doc__.splitlines()[0], convert, argv)


if __name__ == "__main__":
    main()
