"""Frozen-tower feature cache: run the towers once per view, then train only the heads.

The towers are frozen, so an epoch of the online step spends almost all its time recomputing
the same features of slightly different augmentations. Here the towers run ONCE over a fixed set
of augmented views per galaxy; training then samples one cached view per galaxy and step, and an
epoch costs only the heads (two small MLPs) and the loss.

Views (all deterministic given `ViewSpec.seed` and the galaxy's index in the data source):
  image view v:    dihedral element d = v % 8 of the square crop (rot90^(d % 4), then a left-right
                   flip if d >= 4: exact pixel permutations, no interpolation), and draw r = v // 8:
                   r = 0 is clean, r > 0 adds a Gaussian blur (sigma ~ U[0, blur_sigma_max]) and
                   noise (std ~ U[0, noise_std_max]), as `augment.augment_images` does online.
                   View 0 is the un-augmented image.
  spectrum view v: v = 0 is the clean spectrum, v > 0 adds `spectrum_noise_scale * pixel_std * N(0, 1)`.
Only 8 rotations are cached instead of a continuous angle: the price of exact, cheap views.

On disk (a directory, written atomically: filled under a temporary name, then renamed):
    feature_cache-<fingerprint[:16]>/
      image.npy      (n_image_views, N, D_image)     float16 or float32
      spectrum.npy   (n_spectrum_views, N, D_spectrum)
      meta.json      {"fingerprint", "spec", "n", ...}
The fingerprint hashes the tower variables, a sample of the data and the view spec; a directory
whose fingerprint matches is reused, so a resumed run finds its cache and pays nothing.
`.npy` files open memory-mapped, so the cache can exceed host memory.

Training with it: `cached_training(...)` builds or reuses the cache of the train split and returns
`run_step(state, frozen, step)`, a drop-in for the online step in `train.py` (same TrainState,
optimiser and metrics; step t trains on the galaxies the pipeline would give it, with views picked
by fold_in(rng, t), so runs resume exactly). With several processes each builds the whole cache
(deterministic, so all agree) and feeds its share of the batch.

Pure JAX/NumPy (no torch).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import struct

from astroclip_jax import augment

FORMAT_VERSION = 1
N_DIHEDRAL = 8
_FIELDS = ("image", "spectrum")


# ---------------------------------------------------------------- view specification


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """Which augmented views are cached.

    Attributes:
      crop: centre-crop size applied before the views (0 = images are already square crops).
      dihedral: cache the 8 rotations/flips (True) or only the identity (False).
      image_draws: blur + noise draws per dihedral element; draw 0 is clean.
      spectrum_draws: spectrum views; view 0 is clean, the others add pixel-std noise.
      blur_sigma_max, noise_std_max, spectrum_noise_scale: as in `augment` (0 = off).
      dtype: storage dtype of the features ("float16" halves the size; "float32" exact).
      seed: seed of the random draws.
    """

    crop: int = 0
    dihedral: bool = True
    image_draws: int = 2
    spectrum_draws: int = 4
    blur_sigma_max: float = 0.0
    noise_std_max: float = 0.0
    spectrum_noise_scale: float = 0.0
    dtype: str = "float16"
    seed: int = 0

    @property
    def n_image_views(self) -> int:
        return (N_DIHEDRAL if self.dihedral else 1) * self.image_draws

    @property
    def n_spectrum_views(self) -> int:
        return self.spectrum_draws


def spec_from_config(config) -> ViewSpec:
    """ViewSpec from a run config: draws/dtype from `config.feature_cache`, augmentation
    strengths from `config.augment` (so cached views follow the online augmentation)."""
    fc = config.get("feature_cache", None) or {}
    aug = config.get("augment", None) or {}
    blur = float(aug.get("blur_sigma_max", 0.0) or 0.0)
    noise = float(aug.get("noise_std_max", 0.0) or 0.0)
    spectrum_noise = float(aug.get("spectrum_noise_scale", 0.0) or 0.0)
    return ViewSpec(
        crop=int(aug.get("crop", 0) or 0),
        dihedral=bool(aug.get("rotation", False) or aug.get("flip", False)),
        # Without a random blur/noise every draw would be the same view: keep one.
        image_draws=int(fc.get("image_draws", 2)) if (blur or noise) else 1,
        spectrum_draws=int(fc.get("spectrum_draws", 4)) if spectrum_noise else 1,
        blur_sigma_max=blur,
        noise_std_max=noise,
        spectrum_noise_scale=spectrum_noise,
        dtype=str(fc.get("dtype", "float16")),
        seed=int(fc.get("seed", config.get("seed", 0))),
    )


# ---------------------------------------------------------------- the views (pure, jittable)


def dihedral(images: jax.Array, d) -> jax.Array:
    """Element d (0..7, may be traced) of the dihedral group on square (B, H, W, C) images:
    rot90 counter-clockwise (d % 4) times, then a left-right flip when d >= 4."""
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"dihedral views need square images, got {images.shape[1:3]}")
    branches = [(lambda x, k=k, f=f: _rot_flip(x, k, f)) for f in (False, True) for k in range(4)]
    return jax.lax.switch(d, branches, images)


def _rot_flip(images, k, flip):
    out = jnp.rot90(images, k, axes=(1, 2))
    return out[:, :, ::-1, :] if flip else out


def _galaxy_keys(base: jax.Array, view, index: jax.Array) -> jax.Array:
    """One key per galaxy: fold in the view, then the galaxy's global index (batch-size free)."""
    k = jax.random.fold_in(base, view)
    return jax.vmap(lambda i: jax.random.fold_in(k, i))(index)


def image_view(images: jax.Array, view, index: jax.Array, spec: ViewSpec,
               base_key: jax.Array) -> jax.Array:
    """Image view `view` (may be traced) of a batch whose global indices are `index` (B,)."""
    if spec.crop and images.shape[1] > spec.crop:
        images = augment.center_crop(images, spec.crop)
    n_dihedral = N_DIHEDRAL if spec.dihedral else 1
    d, draw = view % n_dihedral, view // n_dihedral
    images = dihedral(images, d) if spec.dihedral else images
    if spec.blur_sigma_max <= 0 and spec.noise_std_max <= 0:
        return images
    keys = _galaxy_keys(base_key, view, index)
    split = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
    kb, kn, ks = split[:, 0], split[:, 1], split[:, 2]
    noisy = images
    if spec.blur_sigma_max > 0:
        sigmas = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, 0.0, spec.blur_sigma_max))(kb)
        noisy = augment.blur(noisy, sigmas, augment.blur_radius(spec.blur_sigma_max))
    if spec.noise_std_max > 0:
        std = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, 0.0, spec.noise_std_max))(ks)
        noise = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:], images.dtype))(kn)
        noisy = noisy + std[:, None, None, None].astype(images.dtype) * noise
    return jnp.where(draw == 0, images, noisy)  # draw 0 stays clean


def spectrum_view(spectra: jax.Array, view, index: jax.Array, spec: ViewSpec,
                  base_key: jax.Array, pixel_std: jax.Array | None) -> jax.Array:
    """Spectrum view `view` (may be traced): 0 clean, else pixel-std noise."""
    if spec.spectrum_noise_scale <= 0 or pixel_std is None:
        return spectra
    keys = _galaxy_keys(jax.random.fold_in(base_key, 1), view, index)
    noise = jax.vmap(lambda k: jax.random.normal(k, spectra.shape[1:], spectra.dtype))(keys)
    noisy = spectra + spec.spectrum_noise_scale * jnp.asarray(pixel_std, spectra.dtype) * noise
    return jnp.where(view == 0, spectra, noisy)


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


def _hash_tree(digest, tree: Any) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
        arr = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{arr.dtype}:{arr.shape};".encode())
        digest.update(arr.tobytes())


def _sample_rows(n: int, k: int = 64) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, k)).astype(np.int64))


def fingerprint(tower_variables: Any, data: "ArraySource", spec: ViewSpec,
                pixel_std: np.ndarray | None = None, extra: str = "") -> str:
    """sha256 of the tower weights, the data (size and 64 evenly spaced rows), the spec."""
    digest = hashlib.sha256(f"feature_cache v{FORMAT_VERSION};{extra};".encode())
    digest.update(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    _hash_tree(digest, tower_variables)
    rows = _sample_rows(len(data))
    sample = data.batch(rows)
    digest.update(f"n={len(data)};".encode())
    _hash_tree(digest, {k: sample[k] for k in _FIELDS})
    if pixel_std is not None and spec.spectrum_noise_scale > 0:
        _hash_tree(digest, {"pixel_std": pixel_std})
    return digest.hexdigest()


# ---------------------------------------------------------------- data access


class ArraySource:
    """Random access to preprocessed `image` (N, H, W, 3) and `spectrum` (N, L) rows.

    Wraps either a mapping of arrays or a record source (`len`, `__getitem__` -> dict, e.g. a
    grain/tfds data source); `preprocess` (batch dict -> batch dict) turns raw records into what
    the step sees (the pipeline's host preprocessing)."""

    def __init__(self, data: Any, preprocess: Callable[[dict], dict] | None = None):
        self._data = data
        self._preprocess = preprocess
        self._is_arrays = isinstance(data, Mapping)

    def __len__(self) -> int:
        return len(self._data["image"]) if self._is_arrays else len(self._data)

    def batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
        if self._is_arrays:
            out = {k: np.asarray(self._data[k])[index] for k in _FIELDS}
        else:
            records = [self._data[int(i)] for i in index]
            out = {k: np.stack([np.asarray(r[k]) for r in records]) for k in _FIELDS}
        if self._preprocess is not None:
            out = self._preprocess(out)
        return {k: np.asarray(out[k], np.float32) for k in _FIELDS}


def pipeline_source(data_config, split: str) -> ArraySource:
    """The prepared tfds split as an ArraySource in record order, with the pipeline's host
    preprocessing (centre crop, image transform, spectrum normalisation)."""
    from astroclip_jax.data import pipeline, preprocess

    source = pipeline.data_source(data_config, split)
    pipeline.check_dataset_grid(data_config, source)
    crop = pipeline.field(data_config, "image_crop", 96)

    def prep(batch: dict) -> dict:
        image = preprocess.center_crop(batch["image"], crop) if crop else batch["image"]
        return {"image": preprocess.transform_images(
                    image, pipeline.field(data_config, "image_transform", "stein_rgb")),
                "spectrum": preprocess.normalise_spectra(
                    batch["spectrum"], pipeline.field(data_config, "spectrum_norm", "zscore"))}

    return ArraySource(source, prep)


@functools.lru_cache(maxsize=2)
def _permutation(num_records: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def step_indices(num_records: int, seed: int, step: int, global_batch_size: int) -> np.ndarray:
    """Record indices of global step `step`, in the order `pipeline.train_loader` visits them
    (epoch e is the permutation rng([seed, e]), remainder dropped): a cached run sees the same
    galaxies at the same step as an online one, and resumes from `state.step` alone."""
    per_epoch = num_records // global_batch_size
    epoch, within = divmod(int(step), per_epoch)
    perm = _permutation(num_records, seed, epoch)
    return perm[within * global_batch_size:(within + 1) * global_batch_size]


def _padded_batches(n: int, batch_size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, count, index padded to batch_size by repeating the last row): one shape, one compile."""
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        index = np.arange(start, start + batch_size)
        yield start, count, np.minimum(index, n - 1)


# ---------------------------------------------------------------- building


def model_towers(model, params) -> tuple[dict[str, Callable], dict[str, Any]]:
    """(tower_apply_fns, tower_variables) of an `model.AstroCLIP` and its params."""
    fns = {"image": lambda v, x: model.image_features({"image_tower": v}, x),
           "spectrum": lambda v, x: model.spectrum_features({"spectrum_tower": v}, x)}
    return fns, {"image": params["image_tower"], "spectrum": params["spectrum_tower"]}


def make_views_fns(tower_apply_fns: Mapping[str, Callable], spec: ViewSpec):
    """Jitted view -> tower functions, one per modality:
        image_fn(variables, images, index, view) -> (B, D_i)
        spectrum_fn(variables, spectra, index, view, pixel_std) -> (B, D_s)
    with `view` traced (one compile for all views). Memoised on the tower functions and the
    spec, so rebuilding a cache reuses the compiled programs."""
    return (_image_views_fn(tower_apply_fns["image"], spec),
            _spectrum_views_fn(tower_apply_fns["spectrum"], spec))


@functools.lru_cache(maxsize=8)
def _image_views_fn(tower_fn: Callable, spec: ViewSpec):
    base_key = jax.random.key(spec.seed)

    @jax.jit
    def fn(variables, images, index, view):
        return tower_fn(variables, image_view(images, view, index, spec, base_key)).astype(spec.dtype)

    return fn


@functools.lru_cache(maxsize=8)
def _spectrum_views_fn(tower_fn: Callable, spec: ViewSpec):
    base_key = jax.random.key(spec.seed)

    @jax.jit
    def fn(variables, spectra, index, view, pixel_std):
        x = spectrum_view(spectra, view, index, spec, base_key, pixel_std)
        return tower_fn(variables, x).astype(spec.dtype)

    return fn


def compute_features(tower_apply_fns: Mapping[str, Callable], tower_variables: Mapping[str, Any],
                     data: ArraySource, spec: ViewSpec, pixel_std: np.ndarray | None = None,
                     batch_size: int = 256, out: Mapping[str, np.ndarray] | None = None,
                     log: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """All views of all rows: {"image": (V_i, N, D_i), "spectrum": (V_s, N, D_s)}.

    `tower_apply_fns[m](variables, x) -> (B, D)` are the frozen towers (e.g. `model_towers`);
    each tower runs once per view of its own modality. `out` may supply preallocated
    (memory-mapped) arrays."""
    n = len(data)
    image_fn, spectrum_fn = make_views_fns(tower_apply_fns, spec)
    std = None if pixel_std is None else jnp.asarray(pixel_std, jnp.float32)
    arrays = dict(out) if out is not None else {}
    bar = tqdm.tqdm(total=n, unit="galaxy", desc="feature cache", disable=log is None)
    for start, count, index in _padded_batches(n, batch_size):
        batch = data.batch(index)
        images, spectra = jnp.asarray(batch["image"]), jnp.asarray(batch["spectrum"])
        idx = jnp.asarray(index, jnp.int32)
        # Dispatch every view first (asynchronous), then copy back: the device stays busy.
        fi = [image_fn(tower_variables["image"], images, idx, v) for v in range(spec.n_image_views)]
        fs = [spectrum_fn(tower_variables["spectrum"], spectra, idx, v, std)
              for v in range(spec.n_spectrum_views)]
        if not arrays:
            arrays = {"image": np.zeros((spec.n_image_views, n, fi[0].shape[-1]), spec.dtype),
                      "spectrum": np.zeros((spec.n_spectrum_views, n, fs[0].shape[-1]), spec.dtype)}
        for name, feats in (("image", fi), ("spectrum", fs)):
            for v, f in enumerate(feats):
                arrays[name][v, start:start + count] = np.asarray(f)[:count]
        bar.update(count)
    bar.close()
    return arrays


def _feature_dims(tower_apply_fns, tower_variables, data: ArraySource, spec: ViewSpec):
    one = data.batch(np.zeros((1,), np.int64))
    img, spc = jnp.asarray(one["image"]), jnp.asarray(one["spectrum"])
    if spec.crop and img.shape[1] > spec.crop:
        img = augment.center_crop(img, spec.crop)
    fi = jax.eval_shape(tower_apply_fns["image"], tower_variables["image"], img)
    fs = jax.eval_shape(tower_apply_fns["spectrum"], tower_variables["spectrum"], spc)
    return fi.shape[-1], fs.shape[-1]


def load_cache(path: str, mmap: bool = True) -> FeatureCache:
    """Opens a cache directory written by `build_or_load_cache`."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    mode = "r" if mmap else None
    return FeatureCache(image=np.load(os.path.join(path, "image.npy"), mmap_mode=mode),
                        spectrum=np.load(os.path.join(path, "spectrum.npy"), mmap_mode=mode),
                        fingerprint=meta["fingerprint"], path=path)


def build_or_load_cache(config, cache_dir: str, tower_apply_fns: Mapping[str, Callable],
                        tower_variables: Mapping[str, Any], data_source: Any,
                        preprocess: Callable[[dict], dict] | None = None,
                        pixel_std: np.ndarray | None = None, mmap: bool = True,
                        batch_size: int | None = None,
                        log: Callable[[str], None] | None = print) -> FeatureCache:
    """The cache for this config, towers and data: reused when its fingerprint matches,
    otherwise computed (towers once per view) and written atomically under `cache_dir`.

    Args:
      config: run config (`config.feature_cache`, `config.augment`; see `spec_from_config`),
        or a `ViewSpec`.
      cache_dir: where cache directories live (the work dir, or the dataset's cache dir).
      tower_apply_fns: {"image": f(variables, images), "spectrum": f(variables, spectra)} -> (B, D).
      tower_variables: {"image": ..., "spectrum": ...} frozen variables (hashed for the fingerprint).
      data_source: arrays {"image", "spectrum"} or a record source (see `ArraySource`), in the
        index order the training sampler uses.
      preprocess: host preprocessing of raw records (batch dict -> batch dict), if any.
      pixel_std: per-pixel spectrum std in the units of the (preprocessed) spectra.
      batch_size: galaxies per tower call (default `config.feature_cache.batch_size` or 256).
    """
    spec = config if isinstance(config, ViewSpec) else spec_from_config(config)
    if batch_size is None:
        batch_size = 256 if isinstance(config, ViewSpec) else int(
            (config.get("feature_cache", None) or {}).get("batch_size", 256))
    data = data_source if isinstance(data_source, ArraySource) else ArraySource(data_source, preprocess)
    fp = fingerprint(tower_variables, data, spec, pixel_std)
    path = os.path.join(os.path.abspath(cache_dir), f"feature_cache-{fp[:16]}")
    if os.path.isfile(os.path.join(path, "meta.json")):
        cache = load_cache(path, mmap)
        if cache.fingerprint == fp:
            if log:
                log(f"feature cache: reusing {path}")
            return cache
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=os.path.dirname(path))
    try:
        d_img, d_spec = _feature_dims(tower_apply_fns, tower_variables, data, spec)
        n = len(data)
        out = {"image": np.lib.format.open_memmap(os.path.join(tmp, "image.npy"), "w+", spec.dtype,
                                                  (spec.n_image_views, n, d_img)),
               "spectrum": np.lib.format.open_memmap(os.path.join(tmp, "spectrum.npy"), "w+", spec.dtype,
                                                     (spec.n_spectrum_views, n, d_spec))}
        compute_features(tower_apply_fns, tower_variables, data, spec, pixel_std, batch_size, out, log)
        for arr in out.values():
            arr.flush()
        del out
        meta = {"format_version": FORMAT_VERSION, "fingerprint": fp, "n": n,
                "spec": dataclasses.asdict(spec), "dims": {"image": d_img, "spectrum": d_spec}}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        if os.path.exists(path):  # a stale or half-replaced cache under the same name
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        log(f"feature cache: wrote {path}")
    return load_cache(path, mmap)


# ---------------------------------------------------------------- the cached train step


def sampling_key(rng: jax.Array, step) -> jax.Array:
    """The key that picks the cached views of step `step`: fold_in(fold_in(rng, step), 2)
    (0 and 1 are the online step's image and spectrum augmentation streams)."""
    return jax.random.fold_in(jax.random.fold_in(rng, step), 2)


def make_cached_train_step(model, config) -> Callable:
    """`cached_train_step(state, frozen, feats) -> (state, metrics)`: the online step without
    augmentation and towers. `feats` = {"image_features" (B, D_i), "spectrum_features" (B, D_s)}
    (from `sample_cached_features`); same TrainState, optimiser and metrics as
    `train_step.make_train_step`, so a run can switch between them and resume either way."""
    from astroclip_jax import train_step as train_step_lib

    tx = train_step_lib.make_optimizer(config)

    def cached_train_step(state, frozen, feats):
        img_f = jnp.asarray(feats["image_features"], jnp.float32)
        spec_f = jnp.asarray(feats["spectrum_features"], jnp.float32)
        return train_step_lib.contrastive_update(
            state, tx, model, frozen, lambda params: model.heads_from_features(params, img_f, spec_f))

    return cached_train_step


def make_device_cached_train_step(model, config) -> Callable:
    """`step(state, frozen, cache_arrays, index) -> (state, metrics)` with the cache on the
    device (`FeatureCache.to_device()`; cache_arrays = {"image", "spectrum"}): view sampling
    happens inside the jitted step, so a step moves only `index` (B,) to the device."""
    inner = make_cached_train_step(model, config)

    def step(state, frozen, cache_arrays, index):
        cache = FeatureCache(image=cache_arrays["image"], spectrum=cache_arrays["spectrum"])
        img_f, spec_f = sample_cached_features(sampling_key(state.rng, state.step), cache, index)
        return inner(state, frozen, {"image_features": img_f, "spectrum_features": spec_f})

    return step


def cached_training(config, workdir: str, model, trainable, frozen, mesh, rng: jax.Array,
                    pixel_std: np.ndarray | None = None, log: Callable[[str], None] | None = print
                    ) -> Callable:
    """Everything `train.py` needs to train from the cache: builds (or reuses) the cache of the
    train split, and returns `run_step(state, frozen, step) -> (state, metrics)`.
    `trainable` is the trainable partition (`state.params`): no tower may be in it.

    Step `step` trains on the galaxies `pipeline.train_loader` would give it (`step_indices`)
    with views picked by `sampling_key(rng, step)`, so a resumed run continues exactly. With
    `config.feature_cache.on_device` (default) the cache is replicated on the devices and the
    views are gathered inside the jitted step; otherwise they are gathered on the host
    (memory-mapped cache) and only the batch of features is copied.
    """
    from astroclip_jax import sharding

    if any(k.endswith("_tower") for k in trainable):
        raise ValueError("train.feature_cache needs frozen towers (features would go stale)")
    fcfg = config.get("feature_cache", None) or {}
    cache_dir = fcfg.get("dir", None) or workdir
    fns, variables = model_towers(model, frozen)
    cache = build_or_load_cache(config, cache_dir, fns, variables,
                                pipeline_source(config.data, config.train.train_split),
                                pixel_std=pixel_std, log=log)
    batch, seed = int(config.train.batch_size), int(config.seed)
    local = batch // jax.process_count()
    lo = jax.process_index() * local

    def indices(step: int) -> np.ndarray:
        return step_indices(cache.n, seed, step, batch)

    if fcfg.get("on_device", True):
        arrays = jax.device_put({"image": np.asarray(cache.image), "spectrum": np.asarray(cache.spectrum)},
                                sharding.replicated(mesh))
        step_fn = jax.jit(make_device_cached_train_step(model, config))

        def run_step(state, frozen, step: int):
            index = sharding.shard_batch({"index": indices(step)[lo:lo + local]}, mesh)["index"]
            return step_fn(state, frozen, arrays, index)
    else:
        step_fn = jax.jit(make_cached_train_step(model, config))
        host_rng = np.asarray(jax.device_get(rng))

        def run_step(state, frozen, step: int):
            img_f, spec_f = sample_cached_features(sampling_key(host_rng, step), cache, indices(step))
            feats = sharding.shard_batch({"image_features": img_f[lo:lo + local],
                                          "spectrum_features": spec_f[lo:lo + local]}, mesh)
            return step_fn(state, frozen, feats)

    return run_step

