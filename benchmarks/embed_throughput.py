"""Throughput of the frozen towers: the embedding path, and building the feature cache.

    python benchmarks/embed_throughput.py                          # full size, float32, batch 1024
    python benchmarks/embed_throughput.py --dtype=bfloat16         # ResNet in bfloat16
    python benchmarks/embed_throughput.py --size=test --batch=64 --batches=5 --cache-n=256
    python benchmarks/embed_throughput.py --data=pipeline          # from the grain eval loader

Embedding: `model.embed` (towers + heads, jitted) over a stream of host batches, with input and
compute overlapped: host batches come from a producer thread (or grain's own prefetch with
--data=pipeline) and are put on the devices two batches ahead (`prefetch_to_device`), so the
device never waits for a copy it could have started earlier. With more than one device the batch
is sharded over a "data" mesh (parameters replicated). Reported: images/s (= pairs/s: each step
embeds B images and B spectra), the same on one device-resident batch (compute only), and the
two towers alone.

Cache: `training.feature_store.build_or_load_cache` over --cache-n random galaxies with the
configured views (16 image x 4 spectrum by default), timed, and extrapolated to the 158,377
training pairs. A build of one batch first compiles the view functions (JAX's persistent
compilation cache, in a temporary directory, then serves them to the timed build).

--dtype=bfloat16 runs the ResNet (convolutions, BatchNorm, head) in bfloat16; Spender has no
dtype option and stays float32. Random weights (the numbers do not depend on them).
Results: benchmarks/results/embed_throughput-<size>-<platform>-<dtype>.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import queue
import resource
import sys
import tempfile
import threading
import time
from typing import Any, Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from astroclip_jax.models import astroclip, heads, towers  # noqa: E402
from astroclip_jax.training import cached_views, feature_store, sharding  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")
TRAIN_PAIRS = 158_377  # AstroCLIP's training split
LOGIT_SCALE = 15.5  # the model needs one; embedding does not use it
SIZES = {  # tower sizes, image crop, spectrum length, head widths
    "full": dict(resnet="resnet50", spender="spender", crop=96, length=7781,
                 image_head=(2048,), spectrum_head=(256, 256, 256), out=128),
    "test": dict(resnet="test", spender="test", crop=32, length=3921,
                 image_head=(64,), spectrum_head=(32, 32), out=32),
}


def build_model(size: str, dtype: str, seed: int = 0):
    """models.astroclip.AstroCLIP with random variables drawn in NumPy (no compile of a Flax
    init): `random_tower_variables`, the towers' own initialisers, for heads and towers alike."""
    s = SIZES[size]
    img_cfg = {**towers.tower_config("resnet", s["resnet"]), "head_hidden": None, "dtype": dtype}
    model = astroclip.AstroCLIP(
        image_tower=towers.build_tower("resnet", img_cfg),
        spectrum_tower=towers.build_tower("spender", towers.tower_config("spender", s["spender"])),
        image_head=heads.MLPHead(hidden=s["image_head"], out=s["out"]),
        spectrum_head=heads.MLPHead(hidden=s["spectrum_head"], out=s["out"]),
        image_size=s["crop"], logit_scale=LOGIT_SCALE)
    x = jnp.zeros((1, s["crop"], s["crop"], 3))
    y = jnp.zeros((1, s["length"]))

    def init(key):
        k = jax.random.split(key, 4)
        v = {"image_tower": model.image_tower.init(k[0], x),
             "spectrum_tower": model.spectrum_tower.init(k[1], y, features_only=True)}
        fi, fs = model.tower_features(v, x, y)
        v["image_head"] = model.image_head.init(k[2], fi)
        v["spectrum_head"] = model.spectrum_head.init(k[3], fs)
        return v

    key = jax.random.key(seed)
    return model, astroclip.random_tower_variables(jax.eval_shape(init, key), key)


class ArrayRecords:
    """`feature_store.Records` over preprocessed rows held in memory."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays["image"])

    def batch(self, indices) -> dict[str, np.ndarray]:
        return {k: v[np.asarray(indices)] for k, v in self.arrays.items()}


# ---------------------------------------------------------------- input with overlap


def host_batches(size: str, batch: int, n_batches: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Random preprocessed batches from a producer thread (a queue of 2), like a loader."""
    s = SIZES[size]
    q: queue.Queue = queue.Queue(maxsize=2)
    pool = np.random.default_rng(seed)
    # A small pool of distinct batches, so producing one costs a copy, not a random draw.
    images = pool.uniform(0, 1, (2 * batch, s["crop"], s["crop"], 3)).astype(np.float32)
    spectra = pool.normal(0, 1, (2 * batch, s["length"])).astype(np.float32)

    def produce():
        for i in range(n_batches):
            lo = (i % 2) * batch
            q.put({"image": images[lo:lo + batch].copy(), "spectrum": spectra[lo:lo + batch].copy()})
        q.put(None)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    while (item := q.get()) is not None:
        yield item
    thread.join()


def pipeline_batches(batch: int, n_batches: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the configured dataset's test split through the grain eval loader."""
    from astroclip_jax import settings as settings_lib
    from astroclip_jax.data import pipeline, prepare
    from configs import spender as spender_config

    data = settings_lib.resolve(spender_config.get_config("")).data
    prepare.prepare(data)
    loader = pipeline.EvalLoader(data, "test", batch)
    it = iter(loader)
    for _ in range(n_batches):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        yield {"image": b["image"], "spectrum": b["spectrum"]}


def prefetch_to_device(batches: Iterator[dict[str, np.ndarray]], mesh, size: int = 2):
    """Yields device batches, keeping `size` host->device copies in flight ahead of compute
    (jax.device_put is asynchronous, so the copy of batch i+1 overlaps the compute of batch i)."""
    target = sharding.data_sharded(mesh)
    ahead: collections.deque = collections.deque()
    for b in batches:
        ahead.append(jax.device_put(b, target))
        if len(ahead) > size:
            yield ahead.popleft()
    while ahead:
        yield ahead.popleft()


# ---------------------------------------------------------------- measurements


def measure_embedding(args, model, params, mesh) -> dict[str, Any]:
    repl = sharding.replicated(mesh)
    params = jax.device_put(params, repl)
    embed = jax.jit(model.embed, out_shardings=repl)
    towers_fn = jax.jit(model.tower_features)
    image_only = jax.jit(model.image_features)
    spectrum_only = jax.jit(model.spectrum_features)
    b = args.batch

    def stream():
        src = (pipeline_batches(b, args.batches + 1) if args.data == "pipeline"
               else host_batches(args.size, b, args.batches + 1))
        return prefetch_to_device(src, mesh)

    # Compile + first batch, then time the rest of the stream end to end.
    t0 = time.perf_counter()
    it = stream()
    first = next(it)
    jax.block_until_ready(embed(params, first["image"], first["spectrum"]))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    out = None
    for batch in it:
        out = embed(params, batch["image"], batch["spectrum"])
        n += b
    jax.block_until_ready(out)
    streamed = n / (time.perf_counter() - t0)

    def rate(fn, *xs, reps=args.batches) -> float:
        jax.block_until_ready(fn(params, *xs))
        t = time.perf_counter()
        for _ in range(reps):
            r = fn(params, *xs)
        jax.block_until_ready(r)
        return b * reps / (time.perf_counter() - t)

    x, y = first["image"], first["spectrum"]
    return {"streamed_pairs_s": streamed,
            "device_resident_pairs_s": rate(embed, x, y),
            "towers_only_pairs_s": rate(towers_fn, x, y),
            "image_tower_images_s": rate(image_only, x),
            "spectrum_tower_spectra_s": rate(spectrum_only, y),
            "compile_and_first_batch_s": compile_s}


def measure_cache(args, model, params) -> dict[str, Any]:
    s = SIZES[args.size]
    rng = np.random.default_rng(1)
    data = {"image": rng.uniform(0, 1, (args.cache_n, s["crop"], s["crop"], 3)).astype(np.float32),
            "spectrum": rng.normal(0, 1, (args.cache_n, s["length"])).astype(np.float32),
            "spectrum_scale": rng.uniform(0.5, 2.0, args.cache_n).astype(np.float32)}
    spec = cached_views.ViewSpec(
        crop=0, dihedral=True, image_draws=args.image_draws, spectrum_draws=args.spectrum_draws,
        blur_sigma_max=1.0, noise_std_max=0.05, spectrum_noise_scale=1.0, dtype="float16", seed=0)
    frozen = jax.device_put({k: params[k] for k in ("image_tower", "spectrum_tower")})
    pixel_std = np.full((s["length"],), 0.1, np.float32)

    def build(records, cache_dir):
        return feature_store.build_or_load_cache(model, frozen, records, spec, cache_dir,
                                                 args.cache_batch, pixel_std, log=None)

    records = ArrayRecords(data)
    with tempfile.TemporaryDirectory() as tmp, \
            _persistent_compilation_cache(os.path.join(tmp, "xla")):
        # Every build jits its own view functions: the one-batch warm-up compiles them and
        # JAX's persistent cache hands the programs to the timed build (which still traces).
        t0 = time.perf_counter()
        build(ArrayRecords({k: v[: args.cache_batch] for k, v in data.items()}),
              os.path.join(tmp, "warm"))
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache = build(records, tmp)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        build(records, tmp)  # found by its fingerprint
        reuse_s = time.perf_counter() - t0
        nbytes = cache.image.nbytes + cache.spectrum.nbytes
    per_galaxy_s = build_s / args.cache_n
    return {"n": args.cache_n, "image_views": spec.n_image_views, "spectrum_views": spec.n_spectrum_views,
            "build_s": build_s, "compile_s": warm_s, "reuse_s": reuse_s,
            "image_views_s": args.cache_n * spec.n_image_views / build_s,
            "spectrum_views_s": args.cache_n * spec.n_spectrum_views / build_s,
            "bytes": nbytes, "bytes_per_galaxy": nbytes / args.cache_n,
            "extrapolated_train_build_s": per_galaxy_s * TRAIN_PAIRS,
            "extrapolated_train_gib": nbytes / args.cache_n * TRAIN_PAIRS / 2**30}


@contextlib.contextmanager
def _persistent_compilation_cache(path: str):
    """JAX's on-disk compilation cache in `path` (every program), then back as it was."""
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (path, 0.0, 0)):
        jax.config.update(name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="full", choices=tuple(SIZES))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, default=1024, help="global batch (split over devices)")
    p.add_argument("--batches", type=int, default=20, help="timed batches")
    p.add_argument("--data", default="host", choices=("host", "pipeline"))
    p.add_argument("--cache-n", type=int, default=4096, help="galaxies for the cache timing (0: skip)")
    p.add_argument("--cache-batch", type=int, default=256)
    p.add_argument("--image-draws", type=int, default=2)
    p.add_argument("--spectrum-draws", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    t_start = time.time()
    mesh = sharding.make_mesh()
    sharding.check_batch_size(args.batch, mesh)
    model, params = build_model(args.size, args.dtype)
    result: dict[str, Any] = {"benchmark": "embed_throughput", "args": vars(args)}
    result["embedding"] = measure_embedding(args, model, params, mesh)
    print(json.dumps(result["embedding"], indent=1), flush=True)
    if args.cache_n:
        result["cache"] = measure_cache(args, model, params)
        print(json.dumps(result["cache"], indent=1), flush=True)
    dev = jax.devices()[0]
    mem = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    result["meta"] = {"platform": dev.platform, "device_kind": dev.device_kind,
                      "devices": jax.device_count(), "jax": jax.__version__, "cpu_count": os.cpu_count(),
                      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "device_peak_mib": (mem or {}).get("peak_bytes_in_use", 0) / 2**20 or None,
                      "load_avg": os.getloadavg(), "wall_s": time.time() - t_start,
                      "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = args.out or os.path.join(RESULTS, f"embed_throughput-{args.size}-{dev.platform}-{args.dtype}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
