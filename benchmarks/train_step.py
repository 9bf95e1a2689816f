"""Our jitted AstroCLIP train step next to the paper's PyTorch step, with shared weights.

    python benchmarks/train_step.py                          # full size, batches 512 and 64
    python benchmarks/train_step.py --size=test --batches=64,16 --steps=3   # quick
    python benchmarks/train_step.py --parts=cached --batches=512 --repeats=3   # heads-only step

Full size = ResNet50 + MoCo head on 96x96 images, Spender on the 7781-pixel DESI grid, heads
2048 -> [2048] -> 128 and 256 -> [256, 256, 256] -> 128, batch 512 (the paper's).

Separate processes, so each peak memory (`ru_maxrss`, plus device peak on accelerators) belongs
to one framework and one batch size:
  setup   torch + JAX: reference torch towers with random weights -> upstream files -> our
          converters (both sides share every weight); JAX's initial heads are copied into torch;
          parity (`parity`, also tests/test_torch_step_parity.py): both steps without
          augmentation for 3 Adam steps on the same 3 batches, losses must agree to 1e-4
          (relative), else the benchmark stops.
  jax     per batch: online step (augment + towers + heads + Adam), towers only, augmentation
          only, and the cached step (heads only) fed from a device-resident cache (views picked
          inside the jitted step) and from a host cache (views gathered in NumPy, then copied).
  torch   per batch: online step, towers only, augmentation only, cached step (heads only).
Timings are steady-state seconds per step (after compile and warm-up) on a fixed device-resident
batch, so input reading is excluded on both sides. Our cached step also computes the metrics the
trainer logs every step (loss parts, top-1 accuracies, gradient norm); torch's bare cached step
computes none, so torch is also timed with the same metrics ("torch_cached_metrics", like for
like). `--parts=cached` times only the cached steps (no towers: minutes less); `--repeats=N` runs
the JAX and torch workers alternately N times per batch (a shared machine's load hits both
alike) and reports the median of the runs. Results: a table, and JSON in
benchmarks/results/train_step-<size>-<platform>.json.

Threads: torch.set_num_threads(os.cpu_count()); XLA's CPU backend sizes its own intra-op pool to
the cores by default (recorded with XLA_FLAGS in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

RESULTS = os.path.join(REPO, "benchmarks", "results")
PARITY_RTOL = 1e-4
PARITY_STEPS = 3
LEARNING_RATE = 5e-4
# The paper's image augmentations; the spectra are not augmented (as in the paper).
AUGMENT = dict(rotation=True, flip=True, blur_sigma_max=1.0, noise_std_max=0.05, spectrum_noise_scale=0.0)
NO_AUGMENT = dict(rotation=False, flip=False, blur_sigma_max=0.0, noise_std_max=0.0, spectrum_noise_scale=0.0)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---------------------------------------------------------------- shared set-up


def jax_config(size: str, towers: dict[str, str], augment: dict[str, Any],
               image_dtype: str = "float32"):
    """configs/spender.py with the benchmark's towers, heads, crop and augmentation; the image
    tower (ResNet) computes in `image_dtype` (Spender has no bfloat16: settings.compute_dtype_of)."""
    from benchmarks import torch_baseline as tb
    from configs import spender as spender_config

    s = tb.SIZES[size]
    c = spender_config.get_config("")
    c.data.grid = "desi" if s["spectrum_length"] == 7781 else "sdss"
    c.data.image_crop = s["crop"]
    c.model.image_tower.weights = towers["image"]
    c.model.spectrum_tower.weights = towers["spectrum"]
    c.model.image_tower.dtype = image_dtype
    c.model.image_head.hidden = (s["head_hidden"],)
    c.model.image_head.out = s["head_out"]
    c.model.image_head.init_from_tower = True
    c.model.spectrum_head.hidden = tuple(s["spectrum_head_hidden"])
    c.model.spectrum_head.out = s["embed_dim"]
    c.augment.crop = s["crop"]
    c.augment.update(augment)
    c.train.learning_rate = LEARNING_RATE
    return c


def make_inputs(size: str, batch: int, seed: int = 0):
    """Random images in [0, 1] (B, crop, crop, 3) and unit-scale spectra (B, L), float32."""
    import numpy as np

    from benchmarks import torch_baseline as tb

    s = tb.SIZES[size]
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 1.0, (batch, s["crop"], s["crop"], 3)).astype(np.float32)
    spectra = rng.normal(0.0, 1.0, (batch, s["spectrum_length"])).astype(np.float32)
    return images, spectra


def jax_batch(images, spectra) -> dict[str, Any]:
    """The online step's batch; the spectra count as already normalised (scale 1)."""
    import numpy as np

    return {"image": images, "spectrum": spectra,
            "spectrum_scale": np.ones((len(spectra),), np.float32)}


def build_jax(size: str, towers: dict[str, str], augment: dict[str, Any],
              image_dtype: str = "float32"):
    """(settings, model, tx, params, state, frozen) of our model on the converted towers."""
    import jax

    from astroclip_jax import settings as settings_lib
    from astroclip_jax.models import astroclip, partition
    from astroclip_jax.training import optimizer

    run = settings_lib.resolve(jax_config(size, towers, augment, image_dtype))
    model, params = astroclip.build(run.model, jax.random.PRNGKey(0))
    trainable, frozen = partition.partition(params, run.train.trainable)
    tx = optimizer.make_optimizer(run.train)
    state = optimizer.init_state(tx, trainable, jax.random.fold_in(jax.random.PRNGKey(0), 1))
    return run, model, tx, params, state, frozen


def build_torch(size: str, workdir: str, device: str):
    import numpy as np
    import torch

    from astroclip_jax import flat_tree
    from benchmarks import torch_baseline as tb

    s = tb.SIZES[size]
    resnet, encoder = tb.load_upstream(_upstream_paths(workdir), size)
    model = tb.TorchAstroCLIP(resnet, encoder, s["spectrum_head_hidden"], s["embed_dim"])
    with np.load(os.path.join(workdir, "heads.npz")) as f:
        heads = flat_tree.unflatten({k: f[k] for k in f.files})
    tb.copy_heads_from_flax(model, heads["image_head"]["params"], heads["spectrum_head"]["params"])
    model = model.to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    return model, optimizer


def _upstream_paths(workdir: str) -> dict[str, str]:
    return {"resnet": os.path.join(workdir, "upstream", "moco_v2.ckpt"),
            "spender": os.path.join(workdir, "upstream", "spender.pt")}


def _tower_dirs(workdir: str) -> dict[str, str]:
    return {"image": os.path.join(workdir, "image_tower"), "spectrum": os.path.join(workdir, "spectrum_tower")}


def _torch_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def shared_weights(size: str, workdir: str) -> dict[str, str]:
    """Reference torch towers with random weights -> upstream files -> our converters, in
    `workdir`; returns the converted tower directories (what `build_jax` loads)."""
    from benchmarks import torch_baseline as tb

    resnet, encoder = tb.make_reference_towers(size, seed=0)
    paths = tb.save_upstream(resnet, encoder, os.path.join(workdir, "upstream"))
    towers = tb.convert_towers(paths, workdir)
    assert towers == _tower_dirs(workdir)
    return towers


def parity(size: str, workdir: str, batches, torch_device: str = "cpu") -> dict[str, Any]:
    """Our jitted online step and the torch step from the same weights (`shared_weights` first),
    augmentation off, one Adam step per (images, spectra) batch on each side.

    Also writes the JAX model's initial heads to `workdir/heads.npz` (the torch side copies
    them). Returns per-step "jax_losses"/"torch_losses", the heads' Adam second moments after
    each step ("jax_nu"/"torch_nu", without bias correction), the heads both started from
    ("initial_heads") and the final heads ("jax_heads"/"torch_heads"), each flat
    {"image_head/fc_0/kernel": array, ...}.
    """
    import jax
    import numpy as np
    import optax
    import torch

    from astroclip_jax import flat_tree
    from astroclip_jax.training import steps
    from benchmarks import torch_baseline as tb

    run, model, tx, params, state, frozen = build_jax(size, _tower_dirs(workdir), NO_AUGMENT)
    heads = {"image_head": params["image_head"], "spectrum_head": params["spectrum_head"]}
    np.savez(os.path.join(workdir, "heads.npz"), **flat_tree.flatten(jax.device_get(heads)))
    del params

    def flat_heads(tree):  # {"image_head": {"params": {...}}, ...} -> flat names without "params"
        return flat_tree.flatten({k: v["params"] for k, v in jax.device_get(tree).items()})

    with jax.default_matmul_precision("highest"):  # no TF32 on GPU: float32 on both sides
        step = jax.jit(steps.make_online_train_step(model, tx, run.augment, pixel_std=None))
        jax_losses, jax_nu = [], []
        for images, spectra in batches:
            state, m = step(state, frozen, jax_batch(images, spectra))
            jax_losses.append(float(m["loss"]))
            jax_nu.append(flat_heads(optax.tree_utils.tree_get(state.opt_state, "nu")))

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tmodel, opt = build_torch(size, workdir, torch_device)
    crop = tb.SIZES[size]["crop"]
    tstep = tb.make_step(tmodel, opt, lambda x, y: (tb.center_crop(x, crop), y))
    torch_losses, torch_nu = [], []
    for images, spectra in batches:
        torch_losses.append(tstep(*tb.to_torch(images, spectra, torch_device)))
        torch_nu.append(flat_tree.flatten(tb.heads_as_flax(
            tmodel, lambda p: opt.state[p]["exp_avg_sq"])))
    return {"jax_losses": jax_losses, "torch_losses": torch_losses,
            "jax_nu": jax_nu, "torch_nu": torch_nu, "initial_heads": flat_heads(heads),
            "jax_heads": flat_heads(state.params),
            "torch_heads": flat_tree.flatten(tb.heads_as_flax(tmodel))}


def worker_setup(args) -> dict[str, Any]:
    """Shared weights (torch -> upstream files -> our converters) and the parity check."""
    import numpy as np
    import torch

    t0 = time.time()
    torch.set_num_threads(os.cpu_count())
    shared_weights(args.size, args.workdir)
    t_weights = time.time() - t0

    # Parity: no augmentation, PARITY_STEPS Adam steps on each side, a new batch each step.
    batches = [make_inputs(args.size, args.parity_batch, seed=1 + i) for i in range(PARITY_STEPS)]
    out = parity(args.size, args.workdir, batches, _torch_device(args.torch_device))
    jax_losses, torch_losses = out["jax_losses"], out["torch_losses"]
    rel = [abs(a - b) / abs(b) for a, b in zip(jax_losses, torch_losses)]
    head_diff = max(float(np.max(np.abs(out["jax_heads"][k] - out["torch_heads"][k])))
                    for k in out["torch_heads"])
    result = {"batch": args.parity_batch, "jax_losses": jax_losses, "torch_losses": torch_losses,
              "max_rel_diff": max(rel), "rtol": PARITY_RTOL, "ok": max(rel) <= PARITY_RTOL,
              "max_head_abs_diff": head_diff, "weights_and_conversion_s": t_weights}
    if not result["ok"]:
        raise AssertionError(f"torch and JAX steps disagree: {result}")
    return result


# ---------------------------------------------------------------- timing


def _timed(run_once: Callable[[], Any], sync: Callable[[Any], Any], steps: int, warmup: int) -> dict:
    t0 = time.perf_counter()
    out = None
    for _ in range(max(1, warmup)):
        out = run_once()
    sync(out)
    first_s = time.perf_counter() - t0  # compile (JAX) + warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        out = run_once()
    sync(out)
    sec = (time.perf_counter() - t0) / steps
    return {"s_per_step": sec, "warmup_s": first_s}


def worker_jax(args) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from astroclip_jax.data import pipeline
    from astroclip_jax.training import augment, feature_store, steps

    b = args.batch
    run, model, tx, params, state, frozen = build_jax(args.size, _tower_dirs(args.workdir), AUGMENT,
                                                       args.image_dtype)
    del params
    dev = jax.devices()[0]
    images, spectra = make_inputs(args.size, b)
    batch = jax.device_put(jax_batch(images, spectra), dev)
    host_rng = np.asarray(jax.device_get(state.rng))  # before the donating steps take `state`
    state, frozen = jax.device_put((state, frozen), dev)
    out: dict[str, Any] = {}
    sync = jax.block_until_ready

    holder = {"state": state}
    if args.parts == "all":
        step = jax.jit(steps.make_online_train_step(model, tx, run.augment, pixel_std=None),
                       donate_argnums=(0,))

        def online():
            holder["state"], m = step(holder["state"], frozen, batch)
            return m["loss"]

        out["online"] = _timed(online, sync, args.steps, args.warmup)

        towers = jax.jit(lambda f, x: model.tower_features(f, x["image"], x["spectrum"]))
        out["towers_only"] = _timed(lambda: towers(frozen, batch), sync, args.steps, args.warmup)
        augment_only = jax.jit(lambda k, x: augment.augment_images(k, x["image"], run.augment))
        key = jax.random.PRNGKey(0)
        out["augment_only"] = _timed(lambda: augment_only(key, batch), sync, args.steps,
                                     args.warmup)

    # Cached step: random features in the cache's layout (values do not change the cost).
    d_img, d_spec = (np.shape(a)[-1] for a in jax.eval_shape(
        model.tower_features, frozen, jnp.zeros((1,) + images.shape[1:]), jnp.zeros((1, spectra.shape[1]))))
    n_cache = max(args.cache_n, 2 * b)
    rng = np.random.default_rng(0)
    host_cache = feature_store.FeatureCache(
        image=rng.normal(0, 1, (args.cache_views, n_cache, d_img)).astype(np.float16),
        spectrum=rng.normal(0, 1, (4, n_cache, d_spec)).astype(np.float16))
    dev_cache = jax.device_put(host_cache, dev)
    dev_step = jax.jit(steps.make_cached_train_step(model, tx), donate_argnums=(0,))
    host_step = jax.jit(steps.make_features_train_step(model, tx), donate_argnums=(0,))
    counter = {"i": 0}

    def indices():
        counter["i"] += 1
        return pipeline.step_indices(n_cache, 0, counter["i"], b)

    def cached_device():
        holder["state"], m = dev_step(holder["state"], frozen, dev_cache, indices())
        return m["loss"]

    def cached_host():  # the views gathered in NumPy with the device path's key, then copied
        key = steps.step_key(host_rng, counter["i"] + 1, steps.CACHED_VIEW_STREAM)
        img_f, spec_f = feature_store.sample_cached_features(key, host_cache, indices())
        holder["state"], m = host_step(holder["state"], frozen,
                                       {"image_features": img_f, "spectrum_features": spec_f})
        return m["loss"]

    cached_steps = max(args.steps, 20)
    out["cached_device"] = _timed(cached_device, sync, cached_steps, args.warmup)
    out["cached_host"] = _timed(cached_host, sync, cached_steps, args.warmup)
    out["cache_shape"] = {"views": args.cache_views, "n": n_cache, "d_image": d_img, "d_spectrum": d_spec}
    mem = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    out["device_peak_mib"] = (mem or {}).get("peak_bytes_in_use", 0) / 2**20 or None
    out["maxrss_mib"] = _maxrss_mib()
    out["platform"] = dev.platform
    out["device_kind"] = dev.device_kind
    return out


def torch_cached_step_with_metrics(model, optimizer, logit_scale: float = 15.5):
    """torch's cached step plus what our step returns every step: both directions' losses and
    top-1 accuracies, and the global gradient norm (the like-for-like comparison)."""
    import torch
    import torch.nn.functional as F

    def step(image_feats, spectrum_feats) -> dict[str, float]:
        img = F.normalize(model.image_head(image_feats), dim=-1, eps=1e-3)
        spec = F.normalize(model.spectrum_head(spectrum_feats), dim=-1, eps=1e-3)
        logits = logit_scale * img @ spec.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss_i2s, loss_s2i = F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)
        loss = 0.5 * (loss_i2s + loss_s2i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        optimizer.step()
        with torch.no_grad():
            acc_i2s = (logits.argmax(1) == labels).float().mean()
            acc_s2i = (logits.T.argmax(1) == labels).float().mean()
        return {k: float(v.detach()) for k, v in dict(loss=loss, loss_i2s=loss_i2s, loss_s2i=loss_s2i,
                                            acc_i2s=acc_i2s, acc_s2i=acc_s2i,
                                            grad_norm=grad_norm).items()}

    return step


def worker_torch(args) -> dict[str, Any]:
    import torch

    from benchmarks import torch_baseline as tb

    torch.set_num_threads(os.cpu_count())
    device = _torch_device(args.torch_device)
    b = args.batch
    s = tb.SIZES[args.size]
    model, opt = build_torch(args.size, args.workdir, device)
    images, spectra = make_inputs(args.size, b)
    x, y = tb.to_torch(images, spectra, device)
    aug = tb.make_augment(s["crop"], AUGMENT["blur_sigma_max"], AUGMENT["noise_std_max"],
                          AUGMENT["spectrum_noise_scale"], None)
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    out: dict[str, Any] = {}
    if args.parts == "all":
        step = tb.make_step(model, opt, aug)
        out["online"] = _timed(lambda: step(x, y), sync, args.steps, args.warmup)
        out["towers_only"] = _timed(lambda: model.tower_features(x, y), sync, args.steps,
                                    args.warmup)

        def augment_only():
            with torch.no_grad():
                return aug(x, y)

        out["augment_only"] = _timed(augment_only, sync, args.steps, args.warmup)
    fi, fs = model.tower_features(x, y)
    cached = tb.make_cached_step(model, opt)
    out["cached"] = _timed(lambda: cached(fi, fs), sync, max(args.steps, 20), args.warmup)
    with_metrics = torch_cached_step_with_metrics(model, opt)
    out["cached_metrics"] = _timed(lambda: with_metrics(fi, fs), sync, max(args.steps, 20),
                                   args.warmup)
    out["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    out["maxrss_mib"] = _maxrss_mib()
    out["device"] = device
    out["threads"] = torch.get_num_threads()
    return out


# ---------------------------------------------------------------- driver


def _run_worker(args, worker: str, batch: int | None = None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={worker}", f"--size={args.size}",
           f"--workdir={args.workdir}", f"--out={out}", f"--steps={args.steps}",
           f"--warmup={args.warmup}", f"--torch-device={args.torch_device}",
           f"--parity-batch={args.parity_batch}", f"--cache-n={args.cache_n}",
           f"--cache-views={args.cache_views}", f"--parts={args.parts}",
           f"--image-dtype={args.image_dtype}"]
    if batch is not None:
        cmd.append(f"--batch={batch}")
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch may share the accelerator
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    result["process_s"] = time.time() - t0
    print(f"  {worker}{'' if batch is None else f' batch {batch}'}: {result['process_s']:.0f} s", flush=True)
    return result


def _median_runs(runs: list[dict]) -> dict[str, Any]:
    """One worker result from --repeats runs: each part's median s_per_step (all runs kept
    under "runs_s_per_step"), the largest peak memory."""
    import statistics

    out = dict(runs[0])
    for part, v in runs[0].items():
        if isinstance(v, dict) and "s_per_step" in v:
            per = [r[part]["s_per_step"] for r in runs]
            out[part] = {**v, "s_per_step": statistics.median(per), "runs_s_per_step": per}
    for k in ("maxrss_mib", "device_peak_mib"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = max(vals) if vals else None
    return out


def summarise(batch: int, j: dict, t: dict) -> dict[str, Any]:
    pairs = lambda sec: batch / sec  # noqa: E731
    cached = {
        "jax_cached_device_pairs_s": pairs(j["cached_device"]["s_per_step"]),
        "jax_cached_host_pairs_s": pairs(j["cached_host"]["s_per_step"]),
        "torch_cached_pairs_s": pairs(t["cached"]["s_per_step"]),
        "torch_cached_metrics_pairs_s": pairs(t["cached_metrics"]["s_per_step"]),
        "jax_maxrss_mib": j["maxrss_mib"], "torch_maxrss_mib": t["maxrss_mib"],
        "jax_device_peak_mib": j["device_peak_mib"], "torch_device_peak_mib": t["device_peak_mib"],
    }
    cached["cached_vs_torch_cached"] = (cached["jax_cached_device_pairs_s"]
                                        / cached["torch_cached_pairs_s"])
    cached["cached_vs_torch_cached_metrics"] = (cached["jax_cached_device_pairs_s"]
                                                / cached["torch_cached_metrics_pairs_s"])
    if "online" not in j:  # --parts=cached
        return cached
    row = {
        "jax_online_pairs_s": pairs(j["online"]["s_per_step"]),
        "torch_online_pairs_s": pairs(t["online"]["s_per_step"]),
        "jax_cached_device_pairs_s": pairs(j["cached_device"]["s_per_step"]),
        "jax_cached_host_pairs_s": pairs(j["cached_host"]["s_per_step"]),
        "torch_cached_pairs_s": pairs(t["cached"]["s_per_step"]),
        "jax_tower_share": j["towers_only"]["s_per_step"] / j["online"]["s_per_step"],
        "jax_augment_share": j["augment_only"]["s_per_step"] / j["online"]["s_per_step"],
        "torch_tower_share": t["towers_only"]["s_per_step"] / t["online"]["s_per_step"],
        "jax_maxrss_mib": j["maxrss_mib"], "torch_maxrss_mib": t["maxrss_mib"],
        "jax_device_peak_mib": j["device_peak_mib"], "torch_device_peak_mib": t["device_peak_mib"],
    }
    row["online_speedup"] = row["jax_online_pairs_s"] / row["torch_online_pairs_s"]
    row["cached_vs_torch_online"] = row["jax_cached_device_pairs_s"] / row["torch_online_pairs_s"]
    return {**cached, **row}


def print_table(rows: dict[int, dict[str, Any]]) -> None:
    fmt = {"pairs_s": "{:12.1f}", "share": "{:12.1%}", "mib": "{:12.0f}", "speedup": "{:11.2f}x",
           "torch_online": "{:11.1f}x", "torch_cached": "{:11.2f}x",
           "torch_cached_metrics": "{:11.2f}x"}
    keys = list(next(iter(rows.values())))
    print(f"{'':32s}" + "".join(f"{'batch ' + str(b):>12s}" for b in rows))
    for k in keys:
        f = next((v for s, v in fmt.items() if k.endswith(s)), "{:12}")
        cells = "".join((f.format(r[k]) if r[k] is not None else f"{'-':>12s}") for r in rows.values())
        print(f"{k:32s}{cells}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="full", choices=("full", "test"))
    p.add_argument("--batches", default="512,64", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=5, help="timed steps (cached steps: at least 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (includes compile)")
    p.add_argument("--torch-device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--parity-batch", type=int, default=16)
    p.add_argument("--cache-n", type=int, default=8192, help="galaxies in the benchmark's cache")
    p.add_argument("--cache-views", type=int, default=16, help="image views in the benchmark's cache")
    p.add_argument("--parts", default="all", choices=("all", "cached"),
                   help="cached: only the heads-only steps (no towers, online step, augmentation)")
    p.add_argument("--repeats", type=int, default=1,
                   help="JAX and torch workers run alternately this many times per batch (medians)")
    p.add_argument("--image-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="our image tower's compute dtype (parity always float32; torch stays float32)")
    p.add_argument("--workdir", default=None, help="weights live here (default: a temporary dir)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/...)")
    p.add_argument("--worker", default=None, choices=("setup", "jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        result = {"setup": worker_setup, "jax": worker_jax, "torch": worker_torch}[args.worker](args)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return

    t_start = time.time()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="astroclip-bench-")
        args.workdir = tmp.name
    batches = [int(b) for b in args.batches.split(",")]
    print(f"train-step benchmark, size {args.size}, batches {batches}, workdir {args.workdir}", flush=True)
    parity = _run_worker(args, "setup")
    print(f"  parity: losses jax {parity['jax_losses']} torch {parity['torch_losses']} "
          f"(max rel diff {parity['max_rel_diff']:.1e})", flush=True)
    raw, rows = {}, {}
    for b in batches:
        runs: dict[str, list] = {"jax": [], "torch": []}
        for _ in range(args.repeats):
            for fw in ("jax", "torch"):
                runs[fw].append(_run_worker(args, fw, b))
        raw[b] = {fw: _median_runs(r) for fw, r in runs.items()}
        rows[b] = summarise(b, raw[b]["jax"], raw[b]["torch"])
    print_table(rows)
    print(f"load average {os.getloadavg()} (cores: {os.cpu_count()}); ratios > 1: ours faster", flush=True)

    import jax
    import torch

    platform_name = raw[batches[0]]["jax"]["platform"]
    result = {
        "benchmark": "train_step", "size": args.size, "batches": batches, "parts": args.parts,
        "image_dtype": args.image_dtype,
        # torch's step stays float32 (autocast would also cast Spender and the heads, which ours
        # keeps float32): a bfloat16 row is ours-bfloat16 against torch-float32.
        "torch_dtype": "float32",
        "repeats": args.repeats,
        "steps": args.steps, "warmup": args.warmup, "parity": parity, "summary": rows, "raw": raw,
        "meta": {"jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version(),
                 "cpu_count": os.cpu_count(), "platform": platform_name,
                 "device_kind": raw[batches[0]]["jax"]["device_kind"],
                 "torch_device": raw[batches[0]]["torch"]["device"],
                 "torch_threads": raw[batches[0]]["torch"]["threads"],
                 "xla_flags": os.environ.get("XLA_FLAGS", ""),
                 "xla_threads": "XLA CPU intra-op pool: default (one thread per core)",
                 "load_avg": os.getloadavg(), "host": platform.node(),
                 "wall_s": time.time() - t_start, "date": time.strftime("%Y-%m-%d %H:%M:%S")},
    }
    out = args.out or os.path.join(RESULTS, f"train_step-{args.size}-{platform_name}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out} ({time.time() - t_start:.0f} s)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
