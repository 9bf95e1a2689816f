"""What every converter shares: reading a torch file (or URL), a strict key mapping, the CLI shell.

`fetch` takes a path, an http(s) URL or `hf://OWNER/REPO/FILE[@REVISION]` (huggingface_hub's
cache). Checkpoints that pickle upstream modules are read by `converters.safe_pickle` instead of
`torch_load` below: no torch, and nothing named in the file runs.

A converter describes, for one source state_dict, which torch key fills which Flax variable and
how the array is transposed. `convert_strict` then insists that every source tensor is either
mapped or explicitly ignored, that every Flax variable is filled, that every shape matches the
Flax module's own `jax.eval_shape(init)` shapes and that every value is finite. Any violation
raises before anything is written, naming the key at fault.

Sizes a converter reads from the file (widths, filters) are taken from every tensor that carries
them (`agreed_size`): one tensor of a wrong shape is outvoted by the others and then named by
`convert_strict`, instead of setting the size and getting a consistent neighbour blamed.

Files are read with torch.load(weights_only=True) allowing NumPy scalars and arrays (plain data
that hub files and hyper-parameters hold); anything else a pickle names is refused unless the
converter is given `trust_checkpoint=True` (command line: `--trust-checkpoint`).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import urllib.parse
import urllib.request
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from astroclip_jax import errors, files
from astroclip_jax.models import tower_weights

# The keyword of every converter's `convert` that allows a full (code-running) unpickling, and
# its command-line switch: the refusal message recommends exactly these.
TRUST_OPTION = "trust_checkpoint"
TRUST_HELP = "load with torch.load(weights_only=False): runs code named in the file"


class ConversionError(errors.UserError, ValueError):
    """A source checkpoint that cannot be converted; the message names the file and key."""


def flag(option: str) -> str:
    """The command-line switch of a boolean `convert` keyword ("no_head" -> "--no-head")."""
    return "--" + option.replace("_", "-")


HUB_SCHEME = "hf://"


def checked_output(out_dir: str, kind: "files.OutputKind", overwrite: bool) -> str:
    """Before any download or work: OUT_DIR may only be a new folder or an earlier output of
    `kind` (`files.check_output_location`: never a user's folder, whatever --overwrite says),
    and an existing one only with `overwrite`. Its absolute path."""
    out_dir = files.check_output_location(out_dir, kind, "OUTPUT_DIR")
    if os.path.exists(out_dir) and not overwrite:
        raise errors.WouldOverwrite(f"{out_dir} already exists; pass --overwrite "
                                    "(overwrite=True) to replace it")
    return out_dir


def is_url(path: str) -> bool:
    return urllib.parse.urlparse(str(path)).scheme in ("http", "https")


def parse_hub(source: str) -> tuple[str, str, str | None]:
    """`hf://OWNER/REPO/FILE[@REVISION]` -> (repo_id, filename, revision or None)."""
    rest, _, revision = source[len(HUB_SCHEME):].partition("@")  # repo ids hold no "@"
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise errors.ConfigError(f"{source}: expected hf://OWNER/REPO/FILE[@REVISION]")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def hub_revision(path: str) -> str | None:
    """The commit a file of the huggingface_hub cache belongs to (its `snapshots/<commit>/`)."""
    parts = os.path.abspath(path).split(os.sep)
    return next((parts[i + 1] for i in range(len(parts) - 2, -1, -1)
                 if parts[i] == "snapshots"), None)


def _hub_download(source: str) -> str:
    """A hub file's path in huggingface_hub's cache (downloaded unless there); offline
    (HF_HUB_OFFLINE=1) only the cache is consulted."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    repo_id, filename, revision = parse_hub(source)
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision,
                                               local_files_only=offline)
    except (hub_errors.EntryNotFoundError, hub_errors.HfHubHTTPError,
            hub_errors.OfflineModeIsEnabled, OSError, ValueError) as e:
        where = "in the local huggingface_hub cache (offline)" if offline else "on the hub"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise errors.MissingInput(f"{source}: {filename} of {repo_id}"
                                  f"{'@' + revision if revision else ''} not found {where} "
                                  f"({type(e).__name__}: {first})") from None


def fetch(path_or_url: str, cache_dir: str | None = None) -> str:
    """Returns a local path; downloads a URL first (to `cache_dir`, default ~/.cache/astroclip_jax).

    `hf://OWNER/REPO/FILE[@REVISION]` downloads through huggingface_hub into its own cache
    (HF_HUB_CACHE; HF_HUB_OFFLINE=1 reads only the cache); `cache_dir` does not apply to it.
    """
    if str(path_or_url).startswith(HUB_SCHEME):
        return _hub_download(str(path_or_url))
    if not is_url(path_or_url):
        if not os.path.isfile(path_or_url):
            raise errors.MissingInput(f"{path_or_url}: no such file")
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


def numpy_safe_globals() -> list[Any]:
    """What NumPy scalars and arrays pickle to (plain data), under NumPy 2's module names and
    NumPy 1's (`numpy.core.*`), which older files hold."""
    reconstruct = np.zeros(1).__reduce__()[0]  # multiarray._reconstruct
    scalar = np.float64(0).__reduce__()[0]  # multiarray.scalar
    dtype_classes = {type(np.dtype(t)) for t in np.sctypeDict.values()}
    return [np.ndarray, np.dtype, reconstruct, scalar, *sorted(dtype_classes, key=str),
            (reconstruct, "numpy.core.multiarray._reconstruct"),
            (scalar, "numpy.core.multiarray.scalar")]


def _global_name(entry: Any) -> str:
    if isinstance(entry, tuple):  # (callable, the name a pickle uses for it)
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


def torch_load(path: str, safe_globals: Sequence[Any] = (), trust: bool = False) -> Any:
    """torch.load on CPU, by default with weights_only (no code in the file can run).

    Args:
      path: a local file.
      safe_globals: classes the weights_only unpickler may build beyond NumPy scalars and
        arrays (e.g. `argparse.Namespace` in a Lightning checkpoint's hyper-parameters);
        harmless containers only.
      trust: load with weights_only=False. Runs whatever the pickle names: only for a file the
        user trusts, and the modules it names must be importable.
    """
    import torch

    safe_globals = [*numpy_safe_globals(), *safe_globals]

    if trust:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ConversionError(
                f"{path}: not a readable PyTorch checkpoint even with weights_only=False "
                f"({type(e).__name__}: {e})") from e
    try:
        with torch.serialization.safe_globals(safe_globals):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, truncated files, not a torch file at all
        unsafe = _unsafe_globals(path, safe_globals)
        if unsafe:
            raise ConversionError(
                f"{path}: the checkpoint pickles objects that a weights-only load refuses: {unsafe}. "
                f"If you trust this file, convert it with {TRUST_OPTION}=True (command line: "
                f"{flag(TRUST_OPTION)}), which loads it with torch.load(weights_only=False)") from e
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def _unsafe_globals(path: str, allowed: Sequence[Any]) -> list[str]:
    """Globals in a torch zip checkpoint beyond what weights_only allows ([] if unknown)."""
    import torch

    allowed_names = {_global_name(g) for g in allowed}
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
    Raises:
      ConversionError naming the first key that is unexpected, missing, of the wrong shape or
      holds a NaN/inf (the ignored keys too: a diverged file is not converted).
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
        raw = np.asarray(source[key])
        value = transform(raw)
        want = tuple(expected_shapes[name])
        if value.shape != want:
            raise ConversionError(
                f"{source_name}: key {key!r} has shape {tuple(raw.shape)}, "
                f"which gives {value.shape} for {name!r}; expected {want}")
        out[name] = np.asarray(value, dtype=np.float32)
    unfilled = sorted(set(expected_shapes) - set(out))
    if unfilled:
        raise ConversionError(f"{source_name}: Flax variable(s) not filled by any key: {unfilled[:10]}")
    for key, value in source.items():  # the ignored ones too: NaN anywhere means a bad file
        check_finite(value, key, source_name)
    return out


def check_finite(value: np.ndarray, key: str, source_name: str) -> None:
    """Refuse a tensor holding NaN or inf (it would convert, then poison every output)."""
    value = np.asarray(value)
    if value.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(value)
    if bad.any():
        first = np.argwhere(bad)[0]
        raise ConversionError(
            f"{source_name}: key {key!r} holds {int(bad.sum())} non-finite value(s) (NaN or inf) "
            f"of {value.size}, the first {value[tuple(first)]} at index {first.tolist()}; "
            "expected finite weights (a diverged or damaged checkpoint?)")


def agreed_size(source: Mapping[str, np.ndarray], carriers: Iterable[tuple[str, int, int]],
                what: str, source_name: str) -> int | None:
    """The size that most tensors carrying it agree on; None when none of them is there.

    Args:
      source: key -> array.
      carriers: (key, axis, ndim) of each tensor whose `axis` must have the size; a missing
        key or one of another ndim does not vote (`convert_strict` names it afterwards).
      what: the size in words, for the message of a tie.
    A tie (no size held by more tensors than any other) names every carrier: one is wrong.
    """
    sizes = {key: int(source[key].shape[axis]) for key, axis, ndim in carriers
             if key in source and np.ndim(source[key]) == ndim}
    if not sizes:
        return None
    ranked = collections.Counter(sizes.values()).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        listed = ", ".join(f"{key!r} {tuple(source[key].shape)}" for key in sizes)
        raise ConversionError(f"{source_name}: the tensors that give {what} disagree ({listed}) "
                              "and none has a majority; one of them has the wrong shape")
    return ranked[0][0]


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
    parser.add_argument("input", help="local checkpoint path, http(s) URL or hf://OWNER/REPO/FILE[@REVISION]")
    parser.add_argument("output_dir", help="directory to write (tower.json + variables.npz)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    for name, help_text in (flags or {}).items():
        parser.add_argument(flag(name), dest=name, action="store_true", help=help_text)
    args = parser.parse_args(None if argv is None else list(argv))
    extra = {name: getattr(args, name) for name in (flags or {})}
    try:
        out = convert(args.input, args.output_dir, overwrite=args.overwrite, **extra)
    except errors.UserError as e:  # anything else is a bug: its traceback stays
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")
