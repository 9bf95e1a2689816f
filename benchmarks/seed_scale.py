"""The seed-scale run with the feature cache, as a wall time: 80 epochs over 158,377 training
pairs (the paper's split; 39,599 validation pairs) on full-size towers, configs/spender.py:desi.

    python benchmarks/seed_scale.py                          # full size (a GPU: about 2 minutes)
    python benchmarks/seed_scale.py --size=test --galaxies=64 --rows=2048 --val-rows=300 \
        --epochs=2 --batch=64                               # the CPU rehearsal

Generating 158 k galaxies and running the towers over all of them costs more than a lent GPU's
10 minutes, so the run is measured in two parts that together cost what the real one does:
  cache   `--galaxies` synthetic galaxies (data/synthetic.py, on every core) through the real
          host preprocessing and `feature_store.build_or_load_cache` (every cached view through
          the frozen towers, written to disk): its compile, its galaxies/s, and that rate
          extrapolated to the 158,377 training rows; plus the validation features (view 0 of
          39,599 rows, the same programs) computed for real.
  train   the cache's rows repeated to `--rows` (158,377) on the device (a row's values do not
          change what a step costs), then `training/loop.run` itself, as `--mode=train` runs it
          with `feature_cache.on_device`: the jitted cached step fed by `loop.step_batches`,
          validation on the cached features every epoch, the plateau rule, a checkpoint per
          epoch, metrics.jsonl. Its wall time is the seed-scale training time.
Not measured: preparing the dataset (generation + tfds write of 198 k pairs), reading a 5 GB
cache from disk, and compiling the separate validation-features program (the real run compiles
`model.tower_features` once; here view 0 of the cache programs computes the same features).

`--time-limit`: on reaching it (or on SIGINT, what `timeout` sends) the epochs done so far are
kept and the 80-epoch time is extrapolated from them; the JSON says so ("complete": false).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TRAIN_ROWS, VAL_ROWS = 158_377, 39_599  # /work/shared/UPSTREAM.md: the paper's split


class OutOfTime(Exception):
    pass


def _stop(signum, frame):
    raise OutOfTime(signal.Signals(signum).name)


def config(size: str, dtype: str, batch: int, epochs: int):
    """configs/spender.py:desi on random towers and synthetic data (same shapes)."""
    from configs import spender as spender_config

    c = spender_config.get_config("desi")
    c.data.name, c.data.builder_config = "synthetic_desi", "default"
    c.data.manual_dir = c.data.provabgs_path = None
    c.model.image_tower.weights = c.model.spectrum_tower.weights = None
    c.model.image_head.init_from_tower = False  # no pretrained MoCo head on random towers
    c.model.image_tower.dtype = dtype
    c.train.batch_size = c.train.val_batch_size = batch
    c.train.epochs = epochs
    c.train.log_every_steps = 100
    if size == "test":  # the smoke run's shapes
        c.data.image_crop = c.augment.crop = 32
        c.model.image_tower.size = c.model.spectrum_tower.size = "test"
        c.model.image_head.hidden, c.model.image_head.out = (64,), 32
        c.model.spectrum_head.hidden, c.model.spectrum_head.out = (32, 32), 32
    return c


def _generate(args_tuple):
    from astroclip_jax.data import synthetic

    n, start = args_tuple
    g = synthetic.generate(n, seed=0, start=start)
    return g["image"], g["spectrum"]


def generate(n: int, workers: int) -> dict[str, Any]:
    """n synthetic galaxies (152 px cutouts, DESI spectra), in parallel: spawned processes
    (this one may already hold a device)."""
    import multiprocessing as mp

    import numpy as np

    chunk = max(16, -(-n // max(1, workers)))
    jobs = [(min(chunk, n - s), s) for s in range(0, n, chunk)]
    if len(jobs) == 1:
        parts = [_generate(jobs[0])]
    else:
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_generate, jobs)
    return {"image": np.concatenate([p[0] for p in parts]),
            "spectrum": np.concatenate([p[1] for p in parts])}


class ArrayRecords:
    """`feature_store.Records` over preprocessed arrays in memory."""

    def __init__(self, rows: dict[str, Any]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows["image"])

    def batch(self, indices) -> dict[str, Any]:
        return {k: v[indices] for k, v in self.rows.items()}


def run(args) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from astroclip_jax import settings as settings_lib
    from astroclip_jax.data import pipeline, preprocess
    from astroclip_jax.models import astroclip, partition
    from astroclip_jax.training import (cached_views, feature_store, loop, metrics, optimizer,
                                        sharding, steps)
    from astroclip_jax.training.feature_store import FeatureCache

    out: dict[str, Any] = {"benchmark": "seed_scale", "args": vars(args), "complete": False}
    t_start = time.time()
    run_settings = settings_lib.resolve(config(args.size, args.dtype, args.batch, args.epochs))
    train = run_settings.train

    # ------------------------------------------------------------------ data
    t0 = time.time()
    raw = generate(args.galaxies, os.cpu_count() or 1)
    rows = preprocess.preprocess_batch(raw, run_settings.data)
    records = ArrayRecords({k: np.ascontiguousarray(rows[k])
                            for k in ("image", "spectrum", "spectrum_scale")})
    out["generate_s"] = time.time() - t0
    print(f"  {args.galaxies} galaxies generated and preprocessed in {out['generate_s']:.1f} s",
          flush=True)

    # ------------------------------------------------------------------ model
    mesh = sharding.make_mesh()
    dev = jax.devices()[0]
    seed_key = jax.random.PRNGKey(run_settings.seed)
    model, params = astroclip.build(run_settings.model, seed_key)
    trainable, frozen = partition.partition(params, train.trainable)
    del params
    frozen = sharding.replicate(frozen, mesh)
    tower_params = {"image_tower": frozen["image_tower"], "spectrum_tower": frozen["spectrum_tower"]}
    views = cached_views.view_spec(run_settings.augment, run_settings.feature_cache,
                                   run_settings.seed)
    cache_batch = args.cache_batch or run_settings.feature_cache.batch_size

    # ------------------------------------------------------------------ cache
    with tempfile.TemporaryDirectory(prefix="seed-scale-") as tmp:
        first = ArrayRecords(records.batch(np.arange(min(cache_batch, len(records)))))
        shapes = jax.eval_shape(model.tower_features, tower_params,
                                jnp.asarray(first.batch([0])["image"]),
                                jnp.asarray(first.batch([0])["spectrum"]))
        warm = {"image": np.zeros((views.n_image_views, len(first), *shapes[0].shape[1:]),
                                  views.dtype),
                "spectrum": np.zeros((views.n_spectrum_views, len(first), *shapes[1].shape[1:]),
                                     views.dtype)}
        t0 = time.time()
        feature_store.compute_features(model, tower_params, first, views, None, cache_batch,
                                       warm, progress=False)
        out["cache_compile_s"] = time.time() - t0  # both tower programs + one batch
        t0 = time.time()
        cache = feature_store.build_or_load_cache(model, frozen, records, views, tmp,
                                                  cache_batch, None, log=None)
        build_s = time.time() - t0
        image_np, spectrum_np = np.asarray(cache.image), np.asarray(cache.spectrum)
    rate = len(records) / build_s
    out["cache"] = {"galaxies": len(records), "build_s": build_s, "galaxies_per_s": rate,
                    "image_views": views.n_image_views, "spectrum_views": views.n_spectrum_views,
                    "dtype": views.dtype, "image_feature_shape": list(image_np.shape[2:]),
                    "spectrum_feature_shape": list(spectrum_np.shape[2:]),
                    "train_rows": args.rows,
                    "extrapolated_build_s": args.rows / rate,
                    "train_cache_gib": args.rows * (image_np[:, :1].nbytes
                                                    + spectrum_np[:, :1].nbytes) / 2**30}
    print(f"  cache: compile {out['cache_compile_s']:.1f} s, {rate:.0f} galaxies/s "
          f"({views.n_image_views} image + {views.n_spectrum_views} spectrum views), "
          f"{args.rows} rows: {args.rows / rate:.1f} s", flush=True)

    # Validation features: view 0 (the clean crop, what `tower_features` computes), every
    # validation row, in `val_batch_size` batches padded and masked as `EvalLoader` gives them.
    image_fn, spectrum_fn = feature_store._view_fns(model, views)  # compiled above
    t0 = time.time()
    vb = train.val_batch_size
    n_val = -(-args.val_rows // vb) * vb
    feats = ([], [])
    for start in range(0, n_val, cache_batch):  # the cache's batch: no new compile
        src = np.minimum(np.arange(start, start + cache_batch), args.val_rows - 1) % len(records)
        b, jidx = records.batch(src), jnp.asarray(src, jnp.int32)
        feats[0].append(image_fn(tower_params, jnp.asarray(b["image"]), jidx, 0))
        feats[1].append(spectrum_fn(tower_params, jnp.asarray(b["spectrum"]),
                                    jnp.asarray(b["spectrum_scale"]), jidx, 0, None))
    f_img, f_spec = (jnp.concatenate(f)[:n_val].astype(jnp.float32) for f in feats)
    mask = (np.arange(n_val) < args.val_rows).astype(np.float32)
    val = [(f_img[s:s + vb], f_spec[s:s + vb], jnp.asarray(mask[s:s + vb]))
           for s in range(0, n_val, vb)]
    jax.block_until_ready(val)
    out["val_features_s"] = time.time() - t0
    out["val_rows"] = args.val_rows

    # ------------------------------------------------------------------ the cache at scale
    t0 = time.time()
    tile = jnp.asarray(np.arange(args.rows) % len(records), jnp.int32)
    arrays = jax.device_put(FeatureCache(image=image_np, spectrum=spectrum_np),
                            sharding.replicated(mesh))
    arrays = jax.jit(lambda c, t: FeatureCache(image=c.image[:, t], spectrum=c.spectrum[:, t]),
                     out_shardings=sharding.replicated(mesh))(arrays, tile)
    jax.block_until_ready(arrays)
    out["cache_to_device_s"] = time.time() - t0
    del image_np, spectrum_np

    # ------------------------------------------------------------------ train: loop.run
    spe = pipeline.steps_per_epoch(args.rows, train.batch_size)
    tx = optimizer.make_optimizer(train, spe)
    state_rng = jax.random.fold_in(seed_key, 1)
    abstract_state, state_sharding = loop.replicated_state(mesh, jax.eval_shape(
        lambda p, k: optimizer.init_state(tx, p, k), trainable, state_rng))
    init_state = jax.jit(lambda p, k: optimizer.init_state(tx, p, k), out_shardings=state_sharding)
    trainable = sharding.replicate(trainable, mesh)
    cached = jax.jit(steps.make_cached_train_step(model, tx))
    rows_slice = pipeline.process_rows(train.batch_size, jax.process_index(), jax.process_count())

    def train_step(state, index):  # as contrastive._cached_path (feature_cache.on_device)
        return cached(state, frozen, arrays, sharding.shard_batch({"index": index}, mesh)["index"])

    _, heads_step = steps.make_eval_steps(model)
    heads_step = jax.jit(heads_step, out_shardings=sharding.replicated(mesh))

    def validate(state):  # as contrastive._validation with cached features
        per_batch = jax.device_get([heads_step(state.params, frozen, fi, fs, m)
                                    for fi, fs, m in val])
        n = np.array([m["n_valid"] for m in per_batch])
        return {k: float(np.sum(np.array([m[k] for m in per_batch]) * n) / np.sum(n))
                for k in ("loss", "accuracy")}

    def end_of_epoch(state, schedule, val_metrics):  # the plateau rule, as contrastive
        plateau = optimizer.Plateau(**schedule)
        new = optimizer.plateau_update(plateau, val_metrics["loss"], train.plateau_factor,
                                       train.plateau_patience, train.plateau_threshold)
        if new.lr != plateau.lr:
            state = optimizer.set_learning_rate(state, new.lr)
        return state, new._asdict()

    trainer = loop.Trainer(
        abstract_state=abstract_state, init_state=lambda: init_state(trainable, state_rng),
        steps_per_epoch=spe,
        batches=loop.step_batches(args.rows, run_settings.seed, train.batch_size,
                                  lambda indices, step: indices, rows_slice),
        train_step=train_step, validate=validate,
        initial_schedule=optimizer.Plateau(lr=train.learning_rate)._asdict(),
        end_of_epoch=end_of_epoch, chance_loss=float(np.log(train.batch_size)))
    out.update(steps_per_epoch=spe, batch=train.batch_size, epochs=train.epochs)
    print(f"  train: {train.epochs} epochs x {spe} steps of {train.batch_size} on "
          f"{args.rows} cached rows", flush=True)
    workdir = tempfile.mkdtemp(prefix="seed-scale-run-")
    t0 = time.time()
    try:
        with loop.work_directory(workdir, run_settings) as wd:
            loop.run(trainer, train, wd, run_settings.config)
        out["complete"] = True
    except OutOfTime as e:
        out["stopped_by"] = str(e)
    out["train_wall_s"] = time.time() - t0
    records_path = os.path.join(workdir, metrics.METRICS_FILE)
    epochs = metrics.read_metrics(records_path) if os.path.exists(records_path) else []
    shutil.rmtree(workdir, ignore_errors=True)  # checkpoints of random heads: nothing to keep
    out["epochs_done"] = len(epochs)
    out["epoch_s"] = [r["epoch_s"] for r in epochs]
    if epochs:
        out["final_val_loss"] = epochs[-1]["val/loss"]
        steady = sorted(out["epoch_s"][1:] or out["epoch_s"])[len(out["epoch_s"][1:]) // 2]
        out["steady_pairs_per_s"] = spe * train.batch_size / steady
        # The run's wall time (`--epochs`, 80): measured, or the epochs done plus the rest at
        # the pace of the finished ones (epoch + validation + checkpoint).
        per_epoch_wall = out["train_wall_s"] / len(epochs)
        out["train_run_s"] = (out["train_wall_s"] if out["complete"] else
                              out["train_wall_s"] + (train.epochs - len(epochs)) * per_epoch_wall)
        out["first_epoch_extra_s"] = out["epoch_s"][0] - steady  # the step's compile, mostly
        out["seed_scale_total_s"] = (out["cache"]["extrapolated_build_s"] + out["val_features_s"]
                                     + out["train_run_s"])
    mem = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    out["device_peak_mib"] = (mem or {}).get("peak_bytes_in_use", 0) / 2**20 or None
    out["meta"] = {"jax": jax.__version__, "platform": dev.platform, "device_kind": dev.device_kind,
                   "python": platform.python_version(), "cpu_count": os.cpu_count(),
                   "load_avg": os.getloadavg(), "wall_s": time.time() - t_start,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="full", choices=("full", "test"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the image tower's compute dtype (Spender stays float32)")
    p.add_argument("--galaxies", type=int, default=2048, help="generated and run through the towers")
    p.add_argument("--rows", type=int, default=TRAIN_ROWS, help="cached training rows")
    p.add_argument("--val-rows", type=int, default=VAL_ROWS)
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--cache-batch", type=int, default=0,
                   help="galaxies per tower call (0: the config's feature_cache.batch_size)")
    p.add_argument("--time-limit", type=float, default=0, help="seconds; 0: none")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                  "seed_scale.json"))
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, _stop)
    if args.time_limit > 0:
        signal.signal(signal.SIGALRM, _stop)
        signal.setitimer(signal.ITIMER_REAL, args.time_limit)
    try:
        result = run(args)
    except OutOfTime as e:  # before the training loop: nothing to extrapolate from
        raise SystemExit(f"seed scale: stopped by {e} before the training started") from None
    signal.setitimer(signal.ITIMER_REAL, 0)
    print(f"seed scale: {result.get('epochs_done', 0)}/{args.epochs} epochs in "
          f"{result.get('train_wall_s', 0):.1f} s; {args.epochs} epochs: "
          f"{result.get('train_run_s', 0):.1f} s"
          f"{'' if result['complete'] else ' (extrapolated)'}; cache of {args.rows} rows: "
          f"{result['cache']['extrapolated_build_s']:.1f} s (extrapolated)", flush=True)
    if not result.get("epochs_done"):
        raise SystemExit("seed scale: no epoch finished within the time limit")
    from benchmarks import measure

    measure.write_json(args.out, result)


if __name__ == "__main__":
    main()
