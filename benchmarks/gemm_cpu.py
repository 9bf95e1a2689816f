"""float32 matrix products at the towers' shapes: XLA:CPU (jitted `x @ w`) vs torch (MKL).

    python benchmarks/gemm_cpu.py [--repeats 10]

The transformer towers spend most of their time in these products (ViT-L/12 at batch 4: 580
tokens x 1024 -> 3072 / 1024 / 4096 and 4096 -> 1024; SpecFormer: 778 tokens a spectrum, as
`towers.features` runs it on a CPU, and 8 spectra at once; the cached step's image head: 512 x
2048 -> 2048). Both sides run in this one process on the same arrays, in two rounds of
`--repeats` calls each, with a pause before each side's calls (torch's OpenMP threads spin on
after a call and would slow an XLA call that followed at once), and the median is kept; the
products are checked equal (1e-4 relative) first. Prints a table and writes
benchmarks/results/gemm_cpu.json (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (what, M, K, N)
SHAPES = [
    ("ViT-L/12 qkv", 580, 1024, 3072), ("ViT-L/12 proj", 580, 1024, 1024),
    ("ViT-L/12 fc1", 580, 1024, 4096), ("ViT-L/12 fc2", 580, 4096, 1024),
    ("SpecFormer qkv", 6224, 768, 2304), ("SpecFormer fc1", 6224, 768, 3072),
    ("SpecFormer fc2", 6224, 3072, 768), ("SpecFormer fc1, one spectrum", 778, 768, 3072),
    ("cached step image head", 512, 2048, 2048),
]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gemm_cpu.json"))
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    import torch

    from astroclip_jax import files

    matmul = jax.jit(lambda a, b: a @ b)
    rows = []
    print(f"{'product':30s} {'M x K x N':>18s} {'XLA ms':>8s} {'torch ms':>9s} {'ratio':>6s}")
    for what, m, k, n in SHAPES:
        rng = np.random.default_rng(0)
        a, b = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32)
        ja, jb, ta, tb = jax.device_put(a), jax.device_put(b), torch.from_numpy(a), torch.from_numpy(b)
        ours, ref = np.asarray(matmul(ja, jb)), (ta @ tb).numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        times = {"xla": [], "torch": []}
        for _ in range(2):  # two rounds of each side, so a load change hits both
            for side in ("xla", "torch"):
                # after its calls torch's OpenMP threads keep spinning for a while and would
                # steal the cores from the next XLA call: each side's calls run together,
                # after a pause
                time.sleep(0.5)
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    if side == "xla":
                        matmul(ja, jb).block_until_ready()
                    else:
                        with torch.no_grad():
                            ta @ tb
                    times[side].append(time.perf_counter() - t0)
        x_ms, t_ms = (1e3 * float(np.median(times[s])) for s in ("xla", "torch"))
        rows.append({"product": what, "m": m, "k": k, "n": n, "xla_ms": x_ms, "torch_ms": t_ms,
                     "ratio": t_ms / x_ms, "xla_gflops": 2 * m * k * n / x_ms / 1e6})
        print(f"{what:30s} {f'{m} x {k} x {n}':>18s} {x_ms:8.2f} {t_ms:9.2f} {t_ms / x_ms:5.2f}x")
    result = {"benchmark": "gemm_cpu", "jax": jax.__version__, "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0],
              "machine": platform.platform(), "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with files.atomic_path(args.out) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    print(f"ratio = torch ms / XLA ms (> 1: XLA faster); load average {result['load_avg']:.1f}; "
          f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
