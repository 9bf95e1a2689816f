"""Stein et al.'s MoCo v2 ResNet50 (PyTorch) -> a Flax "resnet" tower directory.

    python -m converters.resnet50 INPUT OUTPUT_DIR [--overwrite] [--no-head] [--trust-checkpoint]

INPUT is a local file or http(s) URL holding either
  * a PyTorch Lightning checkpoint from georgestein/ssl-legacysurvey: {"state_dict": {
    "encoder_q.<torchvision name>": ... (converted), "encoder_k.*" (momentum copy), "queue",
    "queue_ptr", "val_queue", "val_queue_ptr" (ignored)}, "hyper_parameters": ..., ...}, or
  * a plain torchvision-layout state_dict (optionally under "state_dict"), with the MoCo v2 head
    `fc.0` / `fc.2` or without any `fc.*`.
A single linear `fc.weight` / `fc.bias` (torchvision's 1000-class classifier) is not the MoCo v2
head: it is refused unless --no-head, which drops every `fc.*` key and converts the backbone only.

Stage sizes, width and head sizes are read from the keys, so smaller test-size models convert too.
Lightning checkpoints are read with torch.load(weights_only=True), allowing only the harmless
containers hyper-parameters hold (argparse.Namespace, NumPy scalars); a file that pickles anything
else is refused with the names of those objects, unless --trust-checkpoint (weights_only=False).
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, Mapping

import numpy as np

from converters import common

KIND = "resnet"
_MOCO_PREFIX = "encoder_q."
# Keys of a Lightning MoCo state_dict that are not the query encoder.
_MOCO_IGNORED = (r"encoder_k\..*", r"queue", r"queue_ptr", r"val_queue", r"val_queue_ptr")


def _safe_globals() -> list[Any]:
    """Plain-data classes allowed in a weights-only load beyond NumPy's (Lightning
    hyper-parameters)."""
    return [argparse.Namespace]


def _extract_state_dict(obj: Any, name: str) -> tuple[dict[str, Any], str]:
    """(torchvision-named tensors, format name) from whatever the file held."""
    if not isinstance(obj, Mapping):
        raise common.ConversionError(f"{name}: expected a dict (state_dict or Lightning checkpoint), "
                                     f"found {type(obj).__name__}")
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping):
        raise common.ConversionError(f"{name}: 'state_dict' is a {type(state).__name__}, expected a dict")
    non_tensors = [k for k, v in state.items() if not hasattr(v, "shape")]
    if non_tensors:
        raise common.ConversionError(f"{name}: state_dict entries that are not tensors: {non_tensors[:10]}")
    if any(k.startswith(_MOCO_PREFIX) for k in state):
        fmt = "lightning-moco" if "state_dict" in obj else "moco-state-dict"
        ignore_re = [re.compile(p) for p in _MOCO_IGNORED]
        stray = [k for k in state if not k.startswith(_MOCO_PREFIX)
                 and not any(r.fullmatch(k) for r in ignore_re)]
        if stray:
            raise common.ConversionError(
                f"{name}: unexpected key(s) {stray[:10]} next to the {_MOCO_PREFIX}* encoder "
                f"(expected only encoder_k.*, queue, queue_ptr, val_queue, val_queue_ptr)")
        picked = {k[len(_MOCO_PREFIX):]: v for k, v in state.items() if k.startswith(_MOCO_PREFIX)}
        return picked, fmt
    fmt = "lightning-torchvision" if "state_dict" in obj else "torchvision-state-dict"
    return dict(state), fmt


def infer_config(state: Mapping[str, np.ndarray], name: str, no_head: bool = False) -> dict[str, Any]:
    """ResNet config (stage_sizes, width, head sizes) read from torchvision-named keys."""
    if "conv1.weight" not in state:
        raise common.ConversionError(f"{name}: missing key 'conv1.weight' (not a torchvision ResNet)")
    stage_sizes = []
    for i in range(1, 5):
        blocks = {int(m.group(1)) for k in state if (m := re.fullmatch(rf"layer{i}\.(\d+)\.conv1\.weight", k))}
        if not blocks:
            raise common.ConversionError(f"{name}: missing key 'layer{i}.0.conv1.weight' (stage {i} absent)")
        if blocks != set(range(len(blocks))):
            raise common.ConversionError(f"{name}: stage layer{i} has blocks {sorted(blocks)}, "
                                         f"expected 0..{len(blocks) - 1}")
        stage_sizes.append(len(blocks))
    # The stem's width is carried by conv1, bn1 and the first block's inputs: a majority decides.
    width = common.agreed_size(state, [("conv1.weight", 0, 4), *[(f"bn1.{p}", 0, 1) for p in (
        "weight", "bias", "running_mean", "running_var")], ("layer1.0.conv1.weight", 1, 4),
        ("layer1.0.downsample.0.weight", 1, 4)], "the stem width", name)
    config: dict[str, Any] = dict(stage_sizes=stage_sizes, width=width,
                                  head_hidden=None, head_out=128)  # head_out unused without a head
    fc_keys = sorted(k for k in state if k.startswith("fc."))
    if no_head or not fc_keys:
        return config
    if "fc.weight" in state:
        raise common.ConversionError(
            f"{name}: key 'fc.weight' {tuple(state['fc.weight'].shape)} is a single linear classifier, "
            "not the MoCo v2 head (fc.0, fc.2); pass --no-head (no_head=True) to convert the backbone only")
    for key in ("fc.0.weight", "fc.2.weight"):
        if key not in state:
            raise common.ConversionError(f"{name}: missing key {key!r} (MoCo v2 head is fc.0 -> ReLU -> fc.2); "
                                         f"found {fc_keys}")
    config["head_hidden"] = common.agreed_size(
        state, [("fc.0.weight", 0, 2), ("fc.0.bias", 0, 1), ("fc.2.weight", 1, 2)],
        "the head's hidden width", name)
    config["head_out"] = common.agreed_size(
        state, [("fc.2.weight", 0, 2), ("fc.2.bias", 0, 1)], "the head's output width", name)
    return config


def _bn(torch_name: str, flax_name: str) -> dict[str, tuple[str, Any]]:
    ident = common.identity
    return {f"{torch_name}.weight": (f"params/{flax_name}/scale", ident),
            f"{torch_name}.bias": (f"params/{flax_name}/bias", ident),
            f"{torch_name}.running_mean": (f"batch_stats/{flax_name}/mean", ident),
            f"{torch_name}.running_var": (f"batch_stats/{flax_name}/var", ident)}


def key_mapping(config: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """torchvision key -> (flat Flax name, transform) for a ResNet config."""
    conv = common.conv2d_kernel
    mapping = {"conv1.weight": ("params/conv1/kernel", conv), **_bn("bn1", "bn1")}
    for i, n_blocks in enumerate(config["stage_sizes"]):
        for j in range(n_blocks):
            t, f = f"layer{i + 1}.{j}", f"layer{i + 1}_{j}"
            for c in (1, 2, 3):
                mapping[f"{t}.conv{c}.weight"] = (f"params/{f}/conv{c}/kernel", conv)
                mapping.update(_bn(f"{t}.bn{c}", f"{f}/bn{c}"))
            if j == 0:
                mapping[f"{t}.downsample.0.weight"] = (f"params/{f}/downsample_0/kernel", conv)
                mapping.update(_bn(f"{t}.downsample.1", f"{f}/downsample_1"))
    if config.get("head_hidden"):
        for layer in ("0", "2"):
            mapping[f"fc.{layer}.weight"] = (f"params/fc_{layer}/kernel", common.linear_kernel)
            mapping[f"fc.{layer}.bias"] = (f"params/fc_{layer}/bias", common.identity)
    return mapping


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    import jax
    import jax.numpy as jnp

    from astroclip_jax.models.towers import build_tower

    module = build_tower(KIND, config)
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
    return common.flat_shapes(abstract)


def convert(input_path_or_url: str, output_dir: str, overwrite: bool = False, no_head: bool = False,
            trust_checkpoint: bool = False) -> str:
    """Converts a MoCo v2 / torchvision ResNet checkpoint to a tower directory; returns its path.

    Nothing is written unless every source tensor is mapped (or deliberately ignored), every Flax
    variable is filled and every shape matches; otherwise `common.ConversionError` names the key.
    """
    from astroclip_jax import files
    from astroclip_jax.models import tower_weights

    # Before the download: only an earlier tower of this kind is ever replaced.
    common.checked_output(output_dir, tower_weights.output_kind(KIND), overwrite)
    path = common.fetch(input_path_or_url)
    name = os.path.basename(path)
    obj = common.torch_load(path, safe_globals=_safe_globals(), trust=trust_checkpoint)
    state, fmt = _extract_state_dict(obj, name)
    state = common.to_numpy(state)
    config = infer_config(state, name, no_head=no_head)
    ignore = [r".*\.num_batches_tracked"] + ([r"fc\..*"] if no_head else [])
    flat = common.convert_strict(state, key_mapping(config), ignore, _expected_shapes(config), name)
    source = {"file": name, "sha256": files.sha256_file(path), "format": fmt,
              "url": input_path_or_url if common.is_url(input_path_or_url) else None}
    return tower_weights.save_tower(output_dir, KIND, config, tower_weights.unflatten(flat),
                                    source=source, overwrite=overwrite, what="OUTPUT_DIR")


def main(argv=None) -> None:
    common.cli(__doc__.splitlines()[0], convert, argv, flags={
        "no_head": "drop any fc.* head and convert the backbone only",
        common.TRUST_OPTION: common.TRUST_HELP,
    })


if __name__ == "__main__":
    main()
