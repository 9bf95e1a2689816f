"""The frozen-feature store: tower features of every cached view, computed once, kept on disk.

The towers are frozen, so an epoch of the online step spends almost all its time recomputing
the same features of slightly different augmentations. Here the towers run ONCE over the fixed
views of `cached_views.py` for every galaxy of the training split; `steps.cached_train_step`
then samples one cached view per galaxy and step, and an epoch costs only the heads.

On disk (a directory, written atomically: filled under a temporary name, then renamed):
    feature_cache-<fingerprint[:16]>/
      image.npy      (n_image_views, N, *image feature shape)     float16 or float32
      spectrum.npy   (n_spectrum_views, N, *spectrum feature shape)
(a feature shape is (D,) for a pooling tower, (T, D) for a token tower: towers.KINDS)
      meta.json      {"fingerprint", "views", "n", ...}
The fingerprint hashes the tower variables, a sample of the data and the view views; a directory
whose fingerprint matches is reused, so a resumed run finds its cache and pays nothing.
`.npy` files open memory-mapped, so the cache can exceed host memory.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Iterator, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import struct

from astroclip_jax import files, flat_tree, locks
from astroclip_jax.models.astroclip import AstroCLIP
from astroclip_jax.training import cached_views
from astroclip_jax.training.cached_views import ViewSpec

FORMAT_VERSION = 1
# A cache directory as an output: only an earlier cache (meta.json, the two feature arrays)
# is ever replaced by a new one.
CACHE_KIND = files.OutputKind("feature cache", "meta.json",
                              entries=frozenset({"meta.json", "image.npy", "spectrum.npy"}))
_FIELDS = ("image", "spectrum")


class Records(Protocol):
    """Random access to preprocessed rows (`data.pipeline.PreprocessedRecords`, or arrays)."""

    def __len__(self) -> int: ...

    def batch(self, indices) -> dict[str, np.ndarray]: ...


# ---------------------------------------------------------------- the cache


@struct.dataclass
class FeatureCache:
    """Cached tower features: `image` (V_i, N, D_i), `spectrum` (V_s, N, D_s), NumPy (possibly
    memory-mapped) or JAX arrays, and where they came from. A pytree (passes through jit)."""

    image: Any
    spectrum: Any
    fingerprint: str = struct.field(pytree_node=False, default="")
    path: str = struct.field(pytree_node=False, default="")

    @property
    def n(self) -> int:
        return int(self.image.shape[1])

    def to_device(self) -> "FeatureCache":
        """A copy with JAX arrays (then sampling can happen inside a jitted step)."""
        return self.replace(image=jnp.asarray(self.image), spectrum=jnp.asarray(self.spectrum))


def sample_cached_features(key: jax.Array, cache: FeatureCache, indices) -> tuple[Any, Any]:
    """One random cached view per galaxy: (image_feats (B, D_i), spectrum_feats (B, D_s)).

    Pure: the views depend only on `key` (use fold_in(rng, step) for resumable runs). Works
    on host (NumPy / memory-mapped cache: only the B needed rows are read) and inside jit
    (JAX arrays)."""
    k_img, k_spec = jax.random.split(key)
    shape = np.shape(indices)
    v_img = jax.random.randint(k_img, shape, 0, cache.image.shape[0])
    v_spec = jax.random.randint(k_spec, shape, 0, cache.spectrum.shape[0])
    if isinstance(cache.image, np.ndarray):
        idx = np.asarray(indices)
        return (np.asarray(cache.image[np.asarray(v_img), idx]),
                np.asarray(cache.spectrum[np.asarray(v_spec), idx]))
    return cache.image[v_img, indices], cache.spectrum[v_spec, indices]


# ---------------------------------------------------------------- fingerprint


def _sample_rows(n: int, k: int = 64) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, k)).astype(np.int64))


def fingerprint(tower_params: Any, records: Records, views: ViewSpec,
                pixel_std: np.ndarray | None, compute_dtypes: dict[str, str] | None = None) -> str:
    """sha256 of the tower weights, the data (size and 64 evenly spaced rows), the views, and
    the towers' compute dtypes where one is not float32 (float32 caches keep their names)."""
    digest = hashlib.sha256(f"feature_cache v{FORMAT_VERSION};;".encode())
    digest.update(json.dumps(dataclasses.asdict(views), sort_keys=True).encode())
    lowered = {k: v for k, v in (compute_dtypes or {}).items() if v not in (None, "float32")}
    if lowered:
        digest.update(json.dumps(lowered, sort_keys=True).encode())
    flat_tree.update_digest(digest, tower_params)
    sample = records.batch(_sample_rows(len(records)))
    digest.update(f"n={len(records)};".encode())
    flat_tree.update_digest(digest, {k: sample[k] for k in _FIELDS})
    if views.spectrum_noise_scale > 0:
        flat_tree.update_digest(digest, {"pixel_std": pixel_std,
                                         "spectrum_scale": sample["spectrum_scale"]})
    return digest.hexdigest()


# ---------------------------------------------------------------- computing


@functools.lru_cache(maxsize=8)
def _view_fns(model: AstroCLIP, views: ViewSpec):
    """Jitted (tower params, batch, index, view) -> (B, D) features, `view` traced. Memoised
    on the (hashable) model and views, so rebuilding a cache reuses the compiled programs."""
    base_key = jax.random.key(views.seed)

    @jax.jit
    def image_fn(params, images, index, view):
        x = cached_views.image_view(images, view, index, views, base_key)
        return model.image_features(params, x).astype(views.dtype)

    @jax.jit
    def spectrum_fn(params, spectra, spectrum_scale, index, view, pixel_std):
        x = cached_views.spectrum_view(spectra, spectrum_scale, view, index, views, base_key,
                                       pixel_std)
        return model.spectrum_features(params, x).astype(views.dtype)

    return image_fn, spectrum_fn


def _padded_batches(n: int, batch_size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, count, index padded to batch_size by repeating the last row): one shape, one compile."""
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        index = np.arange(start, start + batch_size)
        yield start, count, np.minimum(index, n - 1)


def compute_features(model: AstroCLIP, tower_params: Any, records: Records, views: ViewSpec,
                     pixel_std: np.ndarray | None, batch_size: int,
                     out: Mapping[str, np.ndarray], progress: bool = True) -> None:
    """Fill `out` = {"image": (V_i, N, D_i), "spectrum": (V_s, N, D_s)} (preallocated, e.g.
    memory-mapped) with the features of every view of every row. `tower_params` holds the
    frozen towers ({"image_tower", "spectrum_tower"}); each tower runs once per view of its
    own modality."""
    n = len(records)
    image_fn, spectrum_fn = _view_fns(model, views)
    std = None if pixel_std is None else jnp.asarray(pixel_std, jnp.float32)
    bar = tqdm.tqdm(total=n, unit="galaxy", desc="feature cache", disable=not progress)
    for start, count, index in _padded_batches(n, batch_size):
        batch = records.batch(index)
        images, spectra = jnp.asarray(batch["image"]), jnp.asarray(batch["spectrum"])
        scale, idx = jnp.asarray(batch["spectrum_scale"]), jnp.asarray(index, jnp.int32)
        # Dispatch every view first (asynchronous), then copy back: the device stays busy.
        fi = [image_fn(tower_params, images, idx, v) for v in range(views.n_image_views)]
        fs = [spectrum_fn(tower_params, spectra, scale, idx, v, std)
              for v in range(views.n_spectrum_views)]
        for name, feats in (("image", fi), ("spectrum", fs)):
            for v, f in enumerate(feats):
                out[name][v, start:start + count] = np.asarray(f)[:count]
        bar.update(count)
    bar.close()


def _feature_shapes(model: AstroCLIP, tower_params: Any, records: Records
                    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The per-galaxy feature shape of each tower: (D,), or (T, D) for token towers."""
    one = records.batch(np.zeros((1,), np.int64))
    fi, fs = jax.eval_shape(model.tower_features, tower_params, jnp.asarray(one["image"]),
                            jnp.asarray(one["spectrum"]))
    return tuple(fi.shape[1:]), tuple(fs.shape[1:])


# ---------------------------------------------------------------- on disk


def load_cache(path: str, mmap: bool = True) -> FeatureCache:
    """Opens a cache directory written by `build_or_load_cache`."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    mode = "r" if mmap else None
    return FeatureCache(image=np.load(os.path.join(path, "image.npy"), mmap_mode=mode),
                        spectrum=np.load(os.path.join(path, "spectrum.npy"), mmap_mode=mode),
                        fingerprint=meta["fingerprint"], path=path)


def build_or_load_cache(model: AstroCLIP, frozen: Any, records: Records, views: ViewSpec,
                        cache_dir: str, batch_size: int, pixel_std: np.ndarray | None,
                        mmap: bool = True, log: Callable[[str], None] | None = print
                        ) -> FeatureCache:
    """The cache for these towers, records and views: reused when its fingerprint matches,
    otherwise computed (towers once per view) and written atomically under `cache_dir`.

    Args:
      model, frozen: the AstroCLIP model and its frozen params (the towers must be in there).
      records: preprocessed rows (`data.pipeline.PreprocessedRecords` of the training split,
        in the record order that `data.pipeline.step_indices` indexes).
      views: the views (`cached_views.view_spec`).
      cache_dir: where cache directories live (the work dir, or `feature_cache.dir`).
      batch_size: galaxies per tower call.
      pixel_std: per-pixel flux std on the spectra's grid (needed when spectrum noise is on).
    """
    tower_params = {"image_tower": frozen["image_tower"],
                    "spectrum_tower": frozen["spectrum_tower"]}
    fp = fingerprint(tower_params, records, views, pixel_std, {
        name: getattr(getattr(model, name), "dtype", None) for name in tower_params})
    name = f"feature_cache-{fp[:16]}"
    path = os.path.join(os.path.abspath(cache_dir), name)
    # One builder per cache (runs may share a cache dir): another waits, then reuses it.
    with locks.DirectoryLock(cache_dir, "building a feature cache", name=name, wait=True):
        files.remove_leftovers(cache_dir, (name,))  # of a build that was killed
        cache = _load_if_current(path, fp, mmap)
        if cache is not None:
            if log:
                log(f"feature cache: reusing {path}")
            return cache
        _build(model, tower_params, records, views, batch_size, pixel_std, path, fp, log)
    if log:
        log(f"feature cache: wrote {path}")
    return load_cache(path, mmap)


def _load_if_current(path: str, fp: str, mmap: bool) -> FeatureCache | None:
    if not os.path.isfile(os.path.join(path, "meta.json")):
        return None
    cache = load_cache(path, mmap)
    return cache if cache.fingerprint == fp else None


def _build(model, tower_params, records, views, batch_size, pixel_std, path, fp, log) -> None:
    d_img, d_spec = _feature_shapes(model, tower_params, records)
    n = len(records)
    with files.atomic_directory(path, CACHE_KIND, "the feature cache") as tmp:
        out = {"image": np.lib.format.open_memmap(os.path.join(tmp, "image.npy"), "w+",
                                                  views.dtype, (views.n_image_views, n, *d_img)),
               "spectrum": np.lib.format.open_memmap(os.path.join(tmp, "spectrum.npy"), "w+",
                                                     views.dtype,
                                                     (views.n_spectrum_views, n, *d_spec))}
        compute_features(model, tower_params, records, views, pixel_std, batch_size, out,
                         progress=log is not None)
        for arr in out.values():
            arr.flush()
        del out
        meta = {"format_version": FORMAT_VERSION, "fingerprint": fp, "n": n,
                "views": dataclasses.asdict(views), "dims": {"image": list(d_img), "spectrum": list(d_spec)}}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
