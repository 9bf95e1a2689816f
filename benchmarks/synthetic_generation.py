"""Throughput of the synthetic generator: image + spectrum pairs per second (single process, CPU).

Usage: python benchmarks/synthetic_generation.py [--n 1024] [--image-size 152] [--grid desi]
Prints pairs/s and writes benchmarks/results/synthetic_generation.json.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

from astroclip_jax.data import synthetic


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=152)
    parser.add_argument("--grid", default="desi")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    synthetic.generate(4, seed=args.seed + 1, image_size=args.image_size, grid=args.grid)  # warm imports/caches
    t0 = time.perf_counter()
    synthetic.parameters(args.n, seed=args.seed)
    t_params = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    out = synthetic.generate(args.n, seed=args.seed, image_size=args.image_size, grid=args.grid)
    t_total, cpu = time.perf_counter() - t0, time.process_time() - c0
    result = {
        "n": args.n,
        "image_size": args.image_size,
        "grid": args.grid,
        "seconds": round(t_total, 3),
        "pairs_per_s": round(args.n / t_total, 1),
        "cpu_seconds": round(cpu, 3),
        "pairs_per_cpu_s": round(args.n / cpu, 1),  # load-independent: what one free core gives
        "parameter_draw_seconds": round(t_params, 3),
        "output_megabytes": round(sum(v.nbytes for v in out.values()) / 2**20, 1),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    print(f"synthetic generation: {result['pairs_per_s']} pairs/s (n={args.n}, {args.image_size}px, {args.grid}; "
          f"{t_total:.1f} s, of which parameters {t_params:.1f} s); {result['pairs_per_cpu_s']} pairs per CPU-second "
          f"(load average {result['load_average_1min']} on {os.cpu_count()} cores)")
    path = Path(__file__).parent / "results" / "synthetic_generation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
