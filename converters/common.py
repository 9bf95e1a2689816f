"""What every converter shares: reading a torch file (or URL), a strict key mapping, the CLI shell.

A converter describes, for one source state_dict, which torch key fills which Flax variable and
how the array is transposed. `convert_strict` then insists that every source tensor is either
mapped or explicitly ignored, that every Flax variable is filled, and that every shape matches the
Flax module's own `jax.eval_shape(init)` shapes. Any violation raises before anything is written.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import urllib.parse
import urllib.request
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from astroclip_jax import files
from astroclip_jax.models import tower_weights


class ConversionError(ValueError):
    """A source checkpoint that cannot be converted; the message names the file and key."""


def is_url(path: str) -> bool:
    return urllib.parse.urlparse(str(path)).scheme in ("http", "https")


def fetch(path_or_url: str, cache_dir: str | None = None) -> str:
    """Returns a local path; downloads a URL first (to `cache_dir`, default ~/.cache/astroclip_jax)."""
    if not is_url(path_or_url):
        if not os.path.isfile(path_or_url):
            raise FileNotFoundError(f"{path_or_url}: no such file")
        return path_or_url
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "astroclip_jax")
    os.makedirs(cache_dir, exist_ok=True)
    name = os.path.basename(urllib.parse.urlparse(path_or_url).path) or "download"
    dest = os.path.join(cache_dir, name)
    if os.path.isfile(dest):
        return dest
    with files.atomic_path(dest) as tmp:
        from tqdm.auto import tqdm

        with urllib.request.urlopen(path_or_url) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    return dest


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (recorded as the converted tower's source)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def torch_load(path: str, safe_globals: Sequence[Any] = (), trust: bool = False) -> Any:
    """torch.load on CPU, by default with weights_only (no code in the file can run).

    Args:
      path: a local file.
      safe_globals: extra classes the weights_only unpickler may build (e.g. `argparse.Namespace`
        in a Lightning checkpoint's hyper-parameters); harmless containers only.
      trust: load with weights_only=False. Runs whatever the pickle names: only for a file the
        user trusts, and the modules it names must be importable.
    """
    import torch

    if trust:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ConversionError(
                f"{path}: not a readable PyTorch checkpoint even with weights_only=False "
                f"({type(e).__name__}: {e})") from e
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, truncated files, not a torch file at all
        unsafe = _unsafe_globals(path, safe_globals)
        if unsafe:
            raise ConversionError(
                f"{path}: the checkpoint pickles objects that a weights-only load refuses: {unsafe}. "
                "If you trust this file, convert it with trust=True (CLI: --trust-checkpoint), "
                "which loads it with torch.load(weights_only=False)") from e
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def _unsafe_globals(path: str, allowed: Sequence[Any]) -> list[str]:
    """Globals in a torch zip checkpoint beyond what weights_only allows ([] if unknown)."""
    import torch

    allowed_names = {f"{g.__module__}.{g.__qualname__}" for g in allowed if hasattr(g, "__qualname__")}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint at all
        return []
    return [n for n in names if n not in allowed_names]


def to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torch tensors -> float32/int NumPy arrays (on CPU)."""
    out = {}
    for key, value in state_dict.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        out[key] = np.asarray(value)
    return out


# Transforms from a torch layout to the Flax layout.
def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) -> Flax Dense (in, out)."""
    return w.T


def conv2d_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d (O, I, kH, kW) -> Flax (kH, kW, I, O)."""
    return w.transpose(2, 3, 1, 0)


def conv1d_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv1d (O, I, K) -> Flax (K, I, O)."""
    return w.transpose(2, 1, 0)


Mapping_ = Mapping[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]


def convert_strict(
    source: Mapping[str, np.ndarray],
    mapping: Mapping_,
    ignore: Sequence[str],
    expected_shapes: Mapping[str, tuple[int, ...]],
    source_name: str,
) -> dict[str, np.ndarray]:
    """Maps `source` keys onto flattened Flax names, strictly.

    Args:
      source: torch key -> array.
      mapping: torch key -> (flat Flax name such as "params/conv1/kernel", transform).
      ignore: regexes (full match) of source keys that are deliberately dropped.
      expected_shapes: flat Flax name -> shape, from `jax.eval_shape` of the module's init.
      source_name: the file name, for error messages.
    Returns:
      flat Flax name -> float32 array, covering exactly `expected_shapes`.
    """
    ignore_re = [re.compile(p) for p in ignore]
    unknown = [k for k in source if k not in mapping and not any(r.fullmatch(k) for r in ignore_re)]
    if unknown:
        raise ConversionError(
            f"{source_name}: unexpected key(s) {unknown[:10]}{' ...' if len(unknown) > 10 else ''} "
            "(neither mapped nor on the ignore list)")
    missing_src = [k for k in mapping if k not in source]
    if missing_src:
        raise ConversionError(f"{source_name}: missing key(s) {missing_src[:10]}"
                              f"{' ...' if len(missing_src) > 10 else ''}")
    out: dict[str, np.ndarray] = {}
    for key, (name, transform) in mapping.items():
        if name not in expected_shapes:
            raise ConversionError(f"{source_name}: key {key!r} maps to {name!r}, which the Flax module lacks")
        value = transform(np.asarray(source[key]))
        want = tuple(expected_shapes[name])
        if value.shape != want:
            raise ConversionError(
                f"{source_name}: key {key!r} has shape {tuple(np.asarray(source[key]).shape)}, "
                f"which gives {value.shape} for {name!r}; expected {want}")
        out[name] = np.asarray(value, dtype=np.float32)
    unfilled = sorted(set(expected_shapes) - set(out))
    if unfilled:
        raise ConversionError(f"{source_name}: Flax variable(s) not filled by any key: {unfilled[:10]}")
    return out


def flat_shapes(abstract_variables: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Flattened names ("params/conv1/kernel") -> shapes of a `jax.eval_shape(module.init, ...)` tree."""
    return {name: tuple(leaf.shape) for name, leaf in tower_weights.flatten(abstract_variables).items()}


def cli(description: str, convert: Callable[..., str], argv: Iterable[str] | None = None,
        flags: Mapping[str, str] | None = None) -> None:
    """`python -m converters.X INPUT OUTPUT_DIR [--overwrite] [--flag ...]`.

    `convert(input, output_dir, overwrite=..., **{flag: bool})`; `flags` maps extra boolean
    keyword arguments of `convert` (e.g. "trust_checkpoint") to their help text; each becomes
    a `--trust-checkpoint` style switch.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("input", help="local checkpoint path or http(s) URL")
    parser.add_argument("output_dir", help="directory to write (tower.json + variables.npz)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    for name, help_text in (flags or {}).items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", help=help_text)
    args = parser.parse_args(None if argv is None else list(argv))
    extra = {name: getattr(args, name) for name in (flags or {})}
    try:
        out = convert(args.input, args.output_dir, overwrite=args.overwrite, **extra)
    except (ConversionError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {out}")
