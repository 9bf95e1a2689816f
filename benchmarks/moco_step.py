"""Our MoCo v2 train step (training/moco.py) vs a PyTorch MoCo v2 step on torchvision's ResNet.

    python benchmarks/moco_step.py [--sizes small resnet50] [--batch-small 64] [--batch-full 8]
        [--steps 3] [--bn-groups 0] [--augment] [--label NAME]

For each size of `models.resnet.SIZES` a torchvision ResNet (`torch_baseline.build_resnet`:
resnet50 itself, or the same Bottleneck code at our width and stage sizes, so the layouts are
identical) with random weights and random BatchNorm affine parameters is saved and converted
(`converters/resnet50.py`), so both sides start from the same weights. The PyTorch step is the
one of ssl-legacysurvey's `moco/moco2_module.py`: key encoder <- m key + (1 - m) query, keys on
the shuffled batch without gradient, queries, logits [q.k | q.queue] / T, cross-entropy,
enqueue, SGD (momentum, weight decay) on the query encoder. Hyperparameters (queue 4096,
T 0.1, m 0.996, lr 0.03, momentum 0.9, wd 1e-4) are configs/moco.py's, for both.

Shuffle BN on one device: both sides cut the batch into `bn_groups` groups with BatchNorm
statistics of their own (ours: vmap in `moco.grouped_forward`; torch: one encoder call per
group, as one call per GPU); keys use the same permutation (the one our step draws,
`_key_permutation`). Default groups: the batch / 16 rows of configs/moco.py (128 / 8), at least 1.

Inputs: the same already-augmented two views (B, 96, 96, 3) float32 for both; augmentation is
not timed. `--augment` adds a row "jax+augment": the trainer's own step (`make_train_step`,
both views drawn by `moco_augment.view` from (B, 152, 152, 3) flux cutouts inside the step).
Before the numbers count, the first step's losses (same weights, views, queue and permutation)
must agree to 1e-5 relative. The later steps' losses (which also see the momentum update, SGD and
the enqueue) are reported, not asserted: with one BN group they match a float64 torch run to
1e-5 at test size (tests/test_moco_step_benchmark.py). With groups of 4 rows (test size,
batch 16, 4 groups) the steps amplify float32 rounding: there torch's own float32 run parts from
its float64 run by 1.7e-4 at step 3 and 1.3e-3 at step 4, as ours does (1.3e-4, 1.0e-3); with 2
groups ours stays within 4e-7 of float64 and torch float32 within 1.3e-3. Each framework runs
in its own subprocess, so its peak resident memory (VmHWM) is its own. Prints pairs/s and peak MB and writes benchmarks/results/moco_step[-LABEL].json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import runpy
import subprocess
import sys
import tempfile
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import measure  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROP = 96  # configs/moco.py's moco.crop
FLUX_SIZE = 152  # the synthetic cutouts the trainer augments (--augment)
SEED = 0


def _settings(bn_groups: int):
    """configs/moco.py's resolved (moco, train) settings with our shuffle-BN groups."""
    from astroclip_jax import settings as settings_lib

    config = runpy.run_path(os.path.join(ROOT, "configs", "moco.py"))["get_config"]("")
    s = settings_lib.resolve(config)
    return dataclasses.replace(s.moco, bn_groups=bn_groups), s.train


def _key_permutation(step: int, n: int) -> np.ndarray:
    """The key-batch permutation `moco.make_train_step` draws at `step` from rng PRNGKey(SEED)."""
    import jax

    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(SEED), step), 0)
    return np.asarray(jax.random.permutation(jax.random.split(key, 3)[2], n))


def _inputs(path: str, batch: int, steps: int, queue_size: int, dim: int) -> None:
    """Two views, a normalised queue and the per-step key permutations, for both children."""
    rng = np.random.default_rng(SEED)
    queue = rng.standard_normal((queue_size, dim))
    np.savez(path, views=rng.standard_normal((2, batch, CROP, CROP, 3)).astype(np.float32),
             flux=(0.05 * rng.lognormal(size=(batch, FLUX_SIZE, FLUX_SIZE, 3))).astype(np.float32),
             queue=(queue / np.linalg.norm(queue, axis=1, keepdims=True)).astype(np.float32),
             perms=np.stack([_key_permutation(t, batch) for t in range(steps + 1)]))


def run_torch(spec: dict, files: dict, steps: int, device: str, dtype=None) -> dict:
    """The PyTorch MoCo v2 step; `dtype` (default float32) e.g. torch.float64 for a reference."""
    import copy

    import torch
    import torch.nn.functional as F

    from benchmarks import torch_baseline as tb

    torch.set_num_threads(os.cpu_count())
    with open(os.path.join(files["tower"], "tower.json")) as f:
        cfg = json.load(f)["config"]
    enc_q = tb.build_resnet(cfg["stage_sizes"], cfg["width"], cfg["head_hidden"], cfg["head_out"])
    enc_q.load_state_dict(torch.load(files["weights"], weights_only=True))
    dtype = dtype or torch.float32
    enc_q.to(device, dtype)
    enc_k = copy.deepcopy(enc_q).requires_grad_(False)
    enc_q.train(), enc_k.train()
    opt = torch.optim.SGD(enc_q.parameters(), lr=spec["learning_rate"],
                          momentum=spec["sgd_momentum"], weight_decay=spec["weight_decay"])
    with np.load(files["inputs"]) as z:
        x_q, x_k = (torch.from_numpy(v).permute(0, 3, 1, 2).contiguous().to(device, dtype)
                    for v in z["views"])
        queue = torch.from_numpy(z["queue"].T.copy()).to(device, dtype)  # (D, K), as MoCo
        perms = torch.from_numpy(z["perms"]).to(device)
    n, m, groups = x_q.shape[0], spec["encoder_momentum"], spec["bn_groups"]
    ptr, labels = 0, torch.zeros(n, dtype=torch.long, device=device)

    def grouped(encoder, x):  # one call per shuffle-BN group, as one per GPU
        return torch.cat([encoder(c) for c in x.chunk(groups)])

    def step(t: int) -> float:
        nonlocal ptr
        with torch.no_grad():
            for pk, pq in zip(enc_k.parameters(), enc_q.parameters()):
                pk.mul_(m).add_(pq, alpha=1.0 - m)
            perm = perms[t]
            k = F.normalize(grouped(enc_k, x_k[perm]), dim=1)[torch.argsort(perm)]
        q = F.normalize(grouped(enc_q, x_q), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / spec["temperature"]
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            queue[:, ptr:ptr + n] = k.T
        ptr = (ptr + n) % queue.shape[1]
        return float(loss.detach())

    losses, dt = measure.timed(step, steps)
    cuda = device.startswith("cuda")
    return {"losses": losses, "pairs_per_s": steps * n / dt,
            **measure.peak_mb(torch.cuda.max_memory_allocated() if cuda else None)}


def run_jax(spec: dict, files: dict, steps: int, augment: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from astroclip_jax.models import resnet, tower_weights
    from astroclip_jax.training import moco, moco_augment

    p, train = _settings(spec["bn_groups"])
    tower = tower_weights.load_tower(files["tower"], "resnet")
    model = resnet.ResNet(**{**tower.config, "stage_sizes": tuple(tower.config["stage_sizes"])})
    tx, schedule = moco.make_optimizer(p, train, steps_per_epoch=10**9)  # lr stays 0.03
    step_fn = moco.make_train_step(model, p, tx, schedule,
                                   moco_augment.MocoAugment(size=p.crop, jitter=p.jitter))
    with np.load(files["inputs"]) as z:
        views, flux, queue = (jnp.asarray(z[k]) for k in ("views", "flux", "queue"))
    # The key encoder starts as a copy (own buffers: the state is donated).
    params, stats, key_params, key_stats = (jax.tree.map(jnp.array, tower.variables[c])
                                            for c in ("params", "batch_stats") * 2)
    state = moco.MocoState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                           opt_state=tx.init(params), rng=jax.random.PRNGKey(SEED),
                           key_params=key_params, key_batch_stats=key_stats, queue=queue,
                           queue_ptr=jnp.zeros((), jnp.int32))

    def on_views(state, x_q, x_k):
        """The trainer's step with its two `moco_augment.view` calls (query view first, then
        key view, in trace order) returning the given views: augmentation out of the timing."""
        given = iter((x_q, x_k))
        with mock.patch.object(moco.moco_augment, "view", lambda key, images, aug: next(given)):
            return step_fn(state, x_q)

    if augment:
        jitted = jax.jit(step_fn, donate_argnums=0)
        args = (flux,)
    else:
        jitted = jax.jit(on_views, donate_argnums=0)
        args = (views[0], views[1])

    def step(t: int):
        nonlocal state
        state, metrics = jitted(state, *args)
        return metrics["loss"]

    losses, dt = measure.timed(lambda t: jax.block_until_ready(step(t)), steps)
    device_stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU
    return {"losses": losses, "pairs_per_s": steps * views.shape[1] / dt,
            **measure.peak_mb(device_stats.get("peak_bytes_in_use"))}


def _child(args) -> None:
    with open(args.spec) as f:
        both = json.load(f)
    spec, files = both["spec"], both["files"]
    out = (run_torch(spec, files, args.steps, args.torch_device) if args.framework == "torch"
           else run_jax(spec, files, args.steps, augment=args.framework == "jax+augment"))
    print(json.dumps(out))


def _write_size_inputs(tmp: str, size: str, batch: int, bn_groups: int, steps: int) -> str:
    """Weights (torch file + our converted tower), inputs and the spec; the spec's path."""
    import torch

    from astroclip_jax.models import resnet
    from benchmarks import torch_baseline as tb
    from converters import resnet50 as converter

    cfg = resnet.SIZES[size]
    torch.manual_seed(SEED)
    model = tb.build_resnet(cfg["stage_sizes"], cfg["width"], cfg["head_hidden"], cfg["head_out"])
    tb.randomise_batchnorm(model, CROP, torch.Generator().manual_seed(SEED))
    files = {"weights": os.path.join(tmp, "resnet.pt"), "tower": os.path.join(tmp, "tower"),
             "inputs": os.path.join(tmp, "inputs.npz")}
    torch.save(model.state_dict(), files["weights"])
    converter.convert(files["weights"], files["tower"])
    p, train = _settings(bn_groups)
    _inputs(files["inputs"], batch, steps, p.queue_size, cfg["head_out"])
    spec = {**dataclasses.asdict(p), "learning_rate": train.learning_rate}
    path = os.path.join(tmp, "spec.json")
    with open(path, "w") as f:
        json.dump({"spec": spec, "files": files}, f)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "resnet50"])
    parser.add_argument("--batch-small", type=int, default=64, help="batch of every size but resnet50")
    parser.add_argument("--batch-full", type=int, default=8, help="batch of resnet50")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--bn-groups", type=int, default=0, help="0: batch / 16, at least 1")
    parser.add_argument("--augment", action="store_true", help="also time our step with augmentation")
    parser.add_argument("--torch-device", default="cpu", help="cpu or cuda")
    parser.add_argument("--label", default="")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--framework", choices=("jax", "torch", "jax+augment"))  # internal: a child
    parser.add_argument("--spec")
    args = parser.parse_args()
    if args.framework:
        return _child(args)
    from benchmarks.spender_forward import write_json

    load_start, rows = os.getloadavg(), []
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    print(f"{'size':9s} {'batch':>5s} {'groups':>6s} {'framework':12s} {'first loss':>11s} "
          f"{'pairs/s':>8s} {'peak MB':>8s} {'device MB':>9s} {'jax/torch':>9s}")
    for size in args.sizes:
        batch = args.batch_full if size == "resnet50" else args.batch_small
        groups = args.bn_groups or max(1, batch // 16)
        with tempfile.TemporaryDirectory() as tmp:
            spec = _write_size_inputs(tmp, size, batch, groups, args.steps)
            results = {}
            for fw in ("torch", "jax") + (("jax+augment",) if args.augment else ()):
                cmd = [sys.executable, os.path.abspath(__file__), f"--framework={fw}",
                       f"--spec={spec}", f"--steps={args.steps}",
                       f"--torch-device={args.torch_device}"]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{fw} child failed for size {size}:\n{proc.stderr[-3000:]}")
                results[fw] = json.loads(proc.stdout.strip().splitlines()[-1])
        # The same step: same weights, views, queue and permutation give the same first loss.
        jax_l, torch_l = (np.array(results[fw]["losses"]) for fw in ("jax", "torch"))
        rel = float(np.max(np.abs(jax_l - torch_l) / np.abs(torch_l)))
        np.testing.assert_allclose(jax_l[0], torch_l[0], rtol=1e-5, err_msg=f"size {size}")
        for fw, r in results.items():
            ratio = r["pairs_per_s"] / results["torch"]["pairs_per_s"]
            rows.append({"size": size, "batch": batch, "bn_groups": groups, "framework": fw,
                         "steps": args.steps, **r, "jax_over_torch": ratio,
                         "loss_max_rel_diff": rel})
            print(f"{size:9s} {batch:5d} {groups:6d} {fw:12s} {r['losses'][0]:11.6f} "
                  f"{r['pairs_per_s']:8.2f} {r['peak_mb']:8.0f} {r.get('device_peak_mb', 0):9.0f} "
                  f"{ratio:9.2f}")
        print(f"{size}: first losses agree to {abs(jax_l[0] / torch_l[0] - 1):.1e}; "
              f"max relative difference over {len(jax_l)} steps {rel:.1e}")
    load_end = os.getloadavg()
    print(f"load average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    import jax
    import torch

    name = "moco_step" + (f"-{args.label}" if args.label else "") + ".json"
    path = os.path.join(args.results, name)
    write_json(path, {"command": " ".join(sys.argv), "rows": rows, "load_avg_start": load_start,
                      "load_avg_end": load_end, "cpu_count": os.cpu_count(),
                      "jax": jax.__version__, "jax_backend": jax.default_backend(),
                      "torch": torch.__version__})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
