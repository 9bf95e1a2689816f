"""Speed of the on-device image augmentation (jitted), full chain and each stage.

    .venv/bin/python benchmarks/augment_speed.py [--batch 512] [--size 96] [--repeats 5]

Uses the training config's augmentation (rotation, flips, crop = size, blur sigma <= 1, no
noise) on (batch, size, size, 3) float32 images and prints the median seconds per batch
(after one compile-and-warm-up call) for the chain and for each stage alone.

Measured on the 2-core dev CPU (shared, load ~4): chain 4.3-4.7 s before the fused
rotation/flip/crop gather and matmul blur, 0.5-0.65 s after (~0.25 s on an idle machine).
"""

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from astroclip_jax.settings import AugmentSettings  # noqa: E402
from astroclip_jax.training import augment  # noqa: E402


def _time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chain-only", action="store_true")
    args = parser.parse_args()

    cfg = AugmentSettings(rotation=True, flip=True, crop=args.size, blur_sigma_max=1.0,
                          noise_std_max=0.0, spectrum_noise_scale=0.0)
    images = jnp.asarray(np.random.default_rng(0).normal(
        size=(args.batch, args.size, args.size, 3)).astype(np.float32))
    key = jax.random.PRNGKey(0)
    angles = jax.random.uniform(key, (args.batch,), jnp.float32, 0.0, 2 * math.pi)
    bits = jax.random.bernoulli(key, 0.5, (2, args.batch))
    sigmas = jax.random.uniform(key, (args.batch,), jnp.float32, 0.0, 1.0)
    radius = augment.blur_radius(1.0)

    stages = {"chain": (jax.jit(lambda k, x: augment.augment_images(k, x, cfg)), (key, images))}
    if not args.chain_only:
        stages.update({
            "rotate": (jax.jit(augment.rotate), (images, angles)),
            "flip": (jax.jit(augment.flip), (images, bits[0], bits[1])),
            "blur": (jax.jit(lambda x, s: augment.blur(x, s, radius)), (images, sigmas)),
            "noise": (jax.jit(augment.gaussian_noise), (key, images, (0.0, 0.1))),
        })
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {args.batch}, "
          f"{args.size}x{args.size}x3 float32, median of {args.repeats}")
    for name, (fn, fn_args) in stages.items():
        print(f"  {name:8s} {_time(fn, *fn_args, repeats=args.repeats):.3f} s")


if __name__ == "__main__":
    main()
