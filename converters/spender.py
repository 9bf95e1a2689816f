"""Spender checkpoint -> spectrum tower directory (`kind="spender"`).

    python -m converters.spender INPUT OUTPUT_DIR [--overwrite] [--trust-checkpoint]

INPUT (a path or http(s) URL) is one of:
  * a Spender hub file `{"model": state_dict or [state_dict, ...], "losses": ...}` of the full
    autoencoder (as `spender.load_model` reads it; a list means the first entry, as there);
  * a plain encoder state_dict, with or without the `encoder.` prefix.
Legacy files naming the MLP `encoder.mlp.mlp.*`, and those whose first MLP layer still takes the
redshift as a 257th input (dropped, as `spender.load_model` does), are accepted.

Kept: the encoder weights, and `encoder.instrument.wave_obs` as extra `wave_obs`. A file with
the decoder (`decoder.wave_rest` and `decoder.mlp.*`) also gets OUTPUT_DIR/decoder/, a tower
directory of kind "spender_decoder" (`models.spender_autoencoder.load_autoencoder` restores the
whole autoencoder from both, to fine-tune it or to reconstruct spectra): its activation is
SpeculatorActivation when `decoder.mlp.1.beta` exists, else LeakyReLU (as `spender.load_model`
decides), extras `wave_rest`, `lsf` (the LSF Conv1d weight, when the file has one) and
`skyline_mask` (when present). AstroCLIP itself uses only the encoder.
Sizes (filters, kernels, MLP widths, n_latent) are read from the shapes, each from every tensor
that carries it (the conv weight, bias and PReLU of a block and the next block's inputs; a Linear's
weight, bias, PReLU and the next Linear's inputs; n_latent also from the decoder's first Linear),
so one tensor of a wrong shape is the one named. Anything else in the file, any shape the Flax
module does not expect, or a NaN/inf value raises ConversionError; nothing is written then.

The file is read with torch.load(weights_only=True), which allows tensors, plain containers and
NumPy scalars and arrays (`losses` often holds them); a file that pickles anything else is
refused with those names, unless --trust-checkpoint (`trust_checkpoint=True`:
weights_only=False, which runs what the file names).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from astroclip_jax import files
from astroclip_jax.models import tower_weights
from astroclip_jax.models import spender as spender_model
from astroclip_jax.models import spender_autoencoder as autoencoder_model
from converters import common
from converters.common import ConversionError

KIND = "spender"
_N_CONV_BLOCKS = 3  # spender's SpectrumEncoder has exactly three conv blocks
_EXTRA_BUFFERS = ("instrument.skyline_mask", "instrument.lsf.weight")
_WAVE_REST = "decoder.wave_rest"


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and hasattr(v, "shape") for k, v in obj.items()))


def extract_state_dict(obj: Any, name: str) -> tuple[dict[str, np.ndarray], str]:
    """The (possibly prefixed) state_dict inside a loaded file, and a word for its format."""
    if isinstance(obj, Mapping) and "model" in obj:
        model = obj["model"]
        if isinstance(model, (list, tuple)):
            if not model:
                raise ConversionError(f"{name}: 'model' is an empty list, expected [state_dict, ...]")
            model = model[0]  # spender.load_model takes the first entry too
        if not _is_state_dict(model):
            raise ConversionError(f"{name}: 'model' holds {type(model).__name__}, expected a state_dict "
                                  "(a mapping of parameter names to tensors)")
        return common.to_numpy(model), "spender hub file"
    if _is_state_dict(obj):
        return common.to_numpy(obj), "state_dict"
    found = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ConversionError(f"{name}: not a Spender checkpoint: expected {{'model': state_dict, ...}} or an "
                          f"encoder state_dict, found {found}")


def _require(sd: Mapping[str, np.ndarray], key: str, ndim: int, name: str) -> np.ndarray:
    if key not in sd:
        raise ConversionError(f"{name}: missing key {key!r}")
    value = sd[key]
    if value.ndim != ndim:
        raise ConversionError(f"{name}: key {key!r} has shape {tuple(value.shape)}, expected {ndim} dimensions")
    return value


def infer_config(sd: Mapping[str, np.ndarray], enc: str, mlp: str, name: str,
                 decoder_input: str | None = None) -> dict[str, Any]:
    """Module kwargs from the tensor shapes; `enc`/`mlp` are the key prefixes in use.

    Each size is the one most of the tensors carrying it agree on (`common.agreed_size`), so a
    tensor of a wrong shape or a missing one is named by `convert_strict`, not a neighbour.
    `decoder_input`: the key of the decoder's first Linear weight, whose inputs are n_latent.
    """
    filters, kernels = [], []
    for i in range(1, _N_CONV_BLOCKS + 1):
        w = _require(sd, f"{enc}conv{i}.0.weight", 3, name)  # (O, I, K); K only here
        kernels.append(int(w.shape[2]))
        carriers = [(f"{enc}conv{i}.0.weight", 0, 3), (f"{enc}conv{i}.0.bias", 0, 1),
                    (f"{enc}conv{i}.2.weight", 0, 1)]
        if i < _N_CONV_BLOCKS:
            carriers.append((f"{enc}conv{i + 1}.0.weight", 1, 3))
        filters.append(common.agreed_size(sd, carriers, f"the filters of conv{i}", name))
    # spender's MLP: Linear at 0, 3, 6, ...; after each hidden one a PReLU (1, 4, ...), Dropout.
    indices = [int(m.group(1)) for key in sd
               if (m := re.fullmatch(re.escape(mlp) + r"(\d+)\.(weight|bias)", key))]
    if not indices:
        raise ConversionError(f"{name}: missing key {mlp + '0.weight'!r} (the encoder MLP's first Linear)")
    n_layers = max(i // 3 + 1 + (i % 3 != 0) for i in indices)  # a PReLU has a Linear after it
    widths = []
    for k in range(n_layers):
        j = 3 * k
        carriers = [(f"{mlp}{j}.weight", 0, 2), (f"{mlp}{j}.bias", 0, 1)]
        if k < n_layers - 1:
            carriers += [(f"{mlp}{j + 1}.weight", 0, 1), (f"{mlp}{j + 3}.weight", 1, 2)]
        elif decoder_input is not None:
            carriers.append((decoder_input, 1, 2))
        width = common.agreed_size(sd, carriers, f"the width of {mlp}{j}", name)
        widths.append(1 if width is None else width)  # none there: convert_strict names them
    return dict(filters=filters, kernels=kernels, pools=kernels[:2],  # spender pools with sizes[:2]
                mlp_hidden=widths[:-1], n_latent=widths[-1], dropout=0.0)


def build_mapping(config: Mapping[str, Any], enc: str, mlp: str,
                  first_linear: Any = common.linear_kernel) -> dict[str, tuple[str, Any]]:
    """torch key -> (flat Flax name, transform) for a SpectrumEncoder of `config`."""
    mapping = {}
    for i in range(1, len(config["filters"]) + 1):
        mapping[f"{enc}conv{i}.0.weight"] = (f"params/conv{i}_0/kernel", common.conv1d_kernel)
        mapping[f"{enc}conv{i}.0.bias"] = (f"params/conv{i}_0/bias", common.identity)
        mapping[f"{enc}conv{i}.2.weight"] = (f"params/conv{i}_2/negative_slope", common.identity)
    n_layers = len(config["mlp_hidden"]) + 1
    for j in range(n_layers):
        kernel_fn = first_linear if j == 0 else common.linear_kernel
        mapping[f"{mlp}{3 * j}.weight"] = (f"params/mlp_{3 * j}/kernel", kernel_fn)
        mapping[f"{mlp}{3 * j}.bias"] = (f"params/mlp_{3 * j}/bias", common.identity)
        if j < n_layers - 1:
            mapping[f"{mlp}{3 * j + 1}.weight"] = (f"params/mlp_{3 * j + 1}/negative_slope", common.identity)
    return mapping


def expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Flat Flax name -> shape, from the module itself (no arrays allocated)."""
    module = spender_model.SpectrumEncoder(**config)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 64), jnp.float32))
    return common.flat_shapes(abstract)


def decoder_config(sd: Mapping[str, np.ndarray], dec: str, n_rest: int, name: str) -> dict[str, Any]:
    """SpectrumDecoder kwargs from the decoder's Linear shapes (`dec`: its key prefix)."""
    indices = sorted(int(m.group(1)) for key in sd
                     if (m := re.fullmatch(re.escape(dec) + r"(\d+)\.weight", key))
                     and np.ndim(sd[key]) == 2)
    if not indices:
        raise ConversionError(f"{name}: missing key {dec + '0.weight'!r} (the decoder's first Linear)")
    widths = [int(sd[f"{dec}{i}.weight"].shape[0]) for i in range(0, indices[-1] + 1, 3)
              if f"{dec}{i}.weight" in sd]
    activation = "speculator" if f"{dec}1.beta" in sd else "leaky_relu"
    return dict(n_rest=n_rest, hidden=widths[:-1], activation=activation)


def decoder_mapping(config: Mapping[str, Any], dec: str) -> dict[str, tuple[str, Any]]:
    """torch key -> (flat Flax name, transform) for a SpectrumDecoder of `config`."""
    mapping = {}
    n_layers = len(config["hidden"]) + 1
    for j in range(n_layers):
        mapping[f"{dec}{3 * j}.weight"] = (f"params/mlp_{3 * j}/kernel", common.linear_kernel)
        mapping[f"{dec}{3 * j}.bias"] = (f"params/mlp_{3 * j}/bias", common.identity)
        if config["activation"] == "speculator":
            for p in ("beta", "gamma"):
                mapping[f"{dec}{3 * j + 1}.{p}"] = (f"params/mlp_{3 * j + 1}/{p}", common.identity)
    return mapping


def _convert_decoder(sd: Mapping[str, np.ndarray], enc: str, n_latent: int, name: str
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(config, flat variables, extras) of the decoder in `sd` (which has `decoder.wave_rest`)."""
    wave_rest = np.asarray(sd[_WAVE_REST])
    if wave_rest.ndim != 1 or wave_rest.size < 2:
        raise ConversionError(f"{name}: key {_WAVE_REST!r} has shape {wave_rest.shape}, "
                              "expected (L_rest,)")
    dec = "decoder.mlp.mlp." if any(k.startswith("decoder.mlp.mlp.") for k in sd) else "decoder.mlp."
    config = decoder_config(sd, dec, int(wave_rest.size), name)
    module = autoencoder_model.SpectrumDecoder(**config)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, n_latent), jnp.float32))
    source = {k: v for k, v in sd.items() if k.startswith("decoder.") and k != _WAVE_REST}
    flat = common.convert_strict(source, decoder_mapping(config, dec), [],
                                 common.flat_shapes(abstract), name)
    extras = {"wave_rest": wave_rest}
    for key, extra in ((f"{enc}instrument.lsf.weight", "lsf"),
                       (f"{enc}instrument.skyline_mask", "skyline_mask")):
        if key in sd:
            extras[extra] = np.asarray(sd[key]).reshape(-1)
    return config, flat, extras


def convert(input_path_or_url: str, output_dir: str, overwrite: bool = False,
            trust_checkpoint: bool = False) -> str:
    """Converts a Spender checkpoint into a tower directory; returns its path.

    trust_checkpoint: load with torch.load(weights_only=False) (runs what the file names).
    """
    # Before the download: only an earlier tower of this kind is ever replaced.
    common.checked_output(output_dir, tower_weights.output_kind(KIND), overwrite)
    path = common.fetch(input_path_or_url)
    name = str(input_path_or_url)
    sd, fmt = extract_state_dict(common.torch_load(path, trust=trust_checkpoint), name)

    enc = "encoder." if any(k.startswith("encoder.") for k in sd) else ""
    legacy_mlp = any(k.startswith(f"{enc}mlp.mlp.") for k in sd)
    mlp = f"{enc}mlp.mlp." if legacy_mlp else f"{enc}mlp."
    decoder_input = next((k for k in ("decoder.mlp.0.weight", "decoder.mlp.mlp.0.weight")
                          if k in sd), None)
    config = infer_config(sd, enc, mlp, name, decoder_input)

    # Old files fed the redshift to the MLP as a 257th input; spender.load_model drops that column.
    n_feature = config["filters"][-1] // 2
    first = sd.get(f"{mlp}0.weight")
    dropped_z = first is not None and first.ndim == 2 and first.shape[1] == n_feature + 1
    first_linear = (lambda w: w[:, :-1].T) if dropped_z else common.linear_kernel

    mapping = build_mapping(config, enc, mlp, first_linear)
    ignore = [re.escape(enc + b) for b in (*_EXTRA_BUFFERS, "instrument.wave_obs")]
    if enc:
        ignore.append(r"decoder\..*")  # converted on their own below
    flat = common.convert_strict(sd, mapping, ignore, expected_shapes(config), name)
    has_decoder = bool(enc) and _WAVE_REST in sd
    if bool(enc) and not has_decoder and any(k.startswith("decoder.") for k in sd):
        raise ConversionError(f"{name}: decoder keys without {_WAVE_REST!r}: the decoder's "
                              "restframe grid is missing")
    decoder = _convert_decoder(sd, enc, config["n_latent"], name) if has_decoder else None

    extras = {}
    wave_key = f"{enc}instrument.wave_obs"
    if wave_key in sd:
        wave = np.asarray(sd[wave_key])
        if wave.ndim != 1:
            raise ConversionError(f"{name}: key {wave_key!r} has shape {wave.shape}, expected (L,)")
        extras["wave_obs"] = wave
    source = {
        "input": name,
        "sha256": files.sha256_file(path),
        "format": fmt,
        "legacy_mlp_naming": legacy_mlp,
        "dropped_redshift_input": bool(dropped_z),
        "ignored": sorted(k for k in sd if k not in mapping and k != wave_key
                          and not (decoder and k.startswith("decoder."))),
        "has_wave_obs": wave_key in sd,
        "has_decoder": decoder is not None,
    }
    variables = tower_weights.unflatten(flat)
    if decoder is None:
        return tower_weights.save_tower(output_dir, KIND, config, variables, extras=extras,
                                        source=source, overwrite=overwrite, what="OUTPUT_DIR")
    dec_config, dec_flat, dec_extras = decoder
    return autoencoder_model.save_autoencoder(
        output_dir, (config, variables, extras),
        (dec_config, tower_weights.unflatten(dec_flat), dec_extras), source, "OUTPUT_DIR")


def main(argv=None) -> None:
    common.cli(__doc__.splitlines()[0], convert, argv,
               flags={common.TRUST_OPTION: common.TRUST_HELP})


if __name__ == "__main__":
    main()
