"""ResNet50 (+ MoCo v2 head) forward throughput: jitted Flax vs torch eval/no_grad, same weights.

    python benchmarks/resnet50_forward.py [--batch 64] [--size 96] [--iters 5]
        [--xla-flags "--xla_cpu_use_onednn=true"] [--torch-threads N] [--dtype bfloat16]
        [--layout nhwc|nchw] [--label NAME]

The two frameworks run interleaved (one JAX call, one torch call, ...) so load from other
processes on a shared machine hits both alike; the median per-call time is reported. Results
are printed as a table and written as JSON to benchmarks/results/resnet50_forward-LABEL.json.
XLA flags must be set before JAX is imported, hence --xla-flags rather than importing at top.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch_model(threads: int | None):
    import torch
    import torchvision

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=128)
    model.fc = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 128))
    return model.eval()


def _flax_from_torch(model, dtype: str):
    """The same weights in the Flax module, via the converter's own key mapping."""
    import jax
    import jax.numpy as jnp

    from astroclip_jax import flat_tree
    from astroclip_jax.models.resnet import ResNet
    from converters import common, resnet50 as conv

    state = common.to_numpy(model.state_dict())
    config = conv.infer_config(state, "benchmark")
    flat = common.convert_strict(state, conv.key_mapping(config), [r".*\.num_batches_tracked"],
                                 conv._expected_shapes(config), "benchmark")
    module = ResNet(**{**config, "stage_sizes": tuple(config["stage_sizes"]), "dtype": dtype})
    variables = jax.tree.map(jnp.asarray, flat_tree.unflatten(flat))
    return module, variables


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before importing jax")
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--dtype", default="float32", help="Flax compute dtype")
    parser.add_argument("--layout", default="nhwc", choices=["nhwc", "nchw"],
                        help="layout of the array handed to the jitted JAX function (nchw: transposed inside)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--label", default="")
    args = parser.parse_args(argv)

    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    model = _torch_model(args.torch_threads)
    module, variables = _flax_from_torch(model, args.dtype)
    images = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)

    if args.layout == "nchw":
        fwd = jax.jit(lambda v, x: module.apply(v, jnp.transpose(x, (0, 2, 3, 1))))
        x_jax = jnp.asarray(images.transpose(0, 3, 1, 2))
    else:
        fwd = jax.jit(module.apply)
        x_jax = jnp.asarray(images)
    x_torch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

    t0 = time.perf_counter()
    out = jax.block_until_ready(fwd(variables, x_jax))  # compile + first run
    compile_s = time.perf_counter() - t0
    with torch.no_grad():
        ref = model(x_torch).numpy()
        model(x_torch)  # warm-up
    head_diff = float(np.max(np.abs(np.asarray(out["head"], np.float32) - ref)))

    # Wall time, and process CPU time: on a shared machine the second says how much work each
    # framework does per batch, independently of how many cores other jobs leave free.
    jax_times, torch_times, jax_cpu, torch_cpu = [], [], [], []
    for _ in range(args.iters):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fwd(variables, x_jax))
        jax_times.append(time.perf_counter() - t0)
        jax_cpu.append(time.process_time() - c0)
        if not args.skip_torch:
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                model(x_torch)
            torch_times.append(time.perf_counter() - t0)
            torch_cpu.append(time.process_time() - c0)

    jax_ips = args.batch / statistics.median(jax_times)
    torch_ips = args.batch / statistics.median(torch_times) if torch_times else float("nan")
    result = {
        "label": args.label or "default", "batch": args.batch, "size": args.size, "iters": args.iters,
        "dtype": args.dtype, "layout": args.layout, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "torch_threads": torch.get_num_threads(), "jax_images_per_s": round(jax_ips, 2),
        "torch_images_per_s": round(torch_ips, 2), "jax_over_torch": round(jax_ips / torch_ips, 3),
        "jax_compile_s": round(compile_s, 2), "head_max_abs_diff": head_diff,
        "jax_times_s": [round(t, 4) for t in jax_times], "torch_times_s": [round(t, 4) for t in torch_times],
        "jax_cpu_s_per_image": round(statistics.median(jax_cpu) / args.batch, 4),
        "torch_cpu_s_per_image": round(statistics.median(torch_cpu) / args.batch, 4) if torch_cpu else None,
        "jax": jax.__version__, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg()[0], "machine": platform.machine(),
    }
    print(f"{'label':<24}{'jax img/s':>10}{'torch img/s':>12}{'ratio':>7}"
          f"{'jax cpu-ms/img':>15}{'torch cpu-ms/img':>17}{'compile s':>10}{'|dhead|':>9}{'load':>6}")
    torch_cpu_ms = 1e3 * result["torch_cpu_s_per_image"] if torch_cpu else float("nan")
    print(f"{result['label']:<24}{jax_ips:>10.1f}{torch_ips:>12.1f}{jax_ips / torch_ips:>7.2f}"
          f"{1e3 * result['jax_cpu_s_per_image']:>15.1f}{torch_cpu_ms:>17.1f}"
          f"{compile_s:>10.1f}{head_diff:>9.1e}{result['load_avg']:>6.1f}")

    out_dir = os.path.join(REPO, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"resnet50_forward-{result['label']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)  # atomic: a reader never sees half a file
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
