"""Spectra per second and peak memory of the SpecFormer forward: jitted Flax vs the torch reference.

    python benchmarks/specformer_forward.py [--sizes specformer] [--batch 16] [--steps 3]
        [--dtype float32|bfloat16]

For each size (`models.specformer.SIZES`; default the released 768 x 6 on DESI's 7781 pixels):
the torch SpecFormer of `benchmarks/torch_specformer.py` (torch.nn pieces, upstream's names) gets
random weights, its state_dict is converted by `converters.specformer`, and each framework runs
the same batch (tokenisation included: flux in, embedding out; ours through
`towers.features`, as embedding and the feature cache run it) in its own subprocess, so its
peak resident memory (VmHWM, `measure.peak_mb`) is its own. Torch: eval, no_grad, on the CPU.
The embeddings of both are checked equal (1e-4 relative; `--dtype bfloat16`, both frameworks in
bfloat16 with float32 parameters on our side: every token's cosine similarity >= 0.999) before
anything is reported. Torch runs on the GPU when there is one. Prints a table and writes
benchmarks/results/specformer_forward[-bfloat16].json (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import measure  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
LENGTH = 7781  # DESI


def _batch(batch: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.uniform(0.5, 5, (batch, 1)) + rng.normal(0, 0.5, (batch, LENGTH))).astype(np.float32)


def run_torch(weights: str, size: str, batch: int, steps: int, dump: str, dtype: str) -> dict:
    import torch

    from benchmarks.torch_specformer import SIZES, TorchSpecFormer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = TorchSpecFormer(**SIZES[size]).eval()
    model.load_state_dict(torch.load(weights, weights_only=True))
    x = torch.from_numpy(_batch(batch))
    model, x = model.to(device), x.to(device)
    if dtype == "bfloat16":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)

    def step(t: int) -> float:
        with torch.no_grad():
            out = model(x)["embedding"]
        if t == 0:
            np.save(dump, out[0].float().cpu().numpy())
        return float(out[0, 0, 0])  # waits for the step

    _, dt = measure.timed(step, steps)
    device_peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"spectra_per_s": steps * batch / dt, "threads": torch.get_num_threads(),
            "device": device, "version": torch.__version__, **measure.peak_mb(device_peak)}


def run_jax(tower: str, batch: int, steps: int, dump: str, dtype: str) -> dict:
    import jax

    from astroclip_jax.models import towers

    module, variables, _ = towers.load_tower_module(tower, kind="specformer", dtype=dtype)
    # the product's frozen forward (`towers.features`: on a CPU, the batch in blocks)
    apply = jax.jit(lambda v, x: towers.features("specformer", module, v, x))
    x = jax.device_put(_batch(batch))

    def step(t: int) -> float:
        out = apply(variables, x)
        if t == 0:
            np.save(dump, np.asarray(out[0]))
        return float(out[0, 0, 0])  # waits for the step

    _, dt = measure.timed(step, steps)
    stats = jax.devices()[0].memory_stats() or {}
    return {"spectra_per_s": steps * batch / dt, "backend": jax.default_backend(),
            "version": jax.__version__, **measure.peak_mb(stats.get("peak_bytes_in_use"))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["specformer"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--out", default=None, help="default benchmarks/results/"
                        "specformer_forward.json (-bfloat16.json with --dtype bfloat16)")
    parser.add_argument("--framework", choices=("jax", "torch"))  # internal: one child
    parser.add_argument("--size"), parser.add_argument("--weights"), parser.add_argument("--dump")
    args = parser.parse_args(argv)
    if args.framework:
        out = (run_torch(args.weights, args.size, args.batch, args.steps, args.dump, args.dtype)
               if args.framework == "torch" else
               run_jax(args.weights, args.batch, args.steps, args.dump, args.dtype))
        print(json.dumps(out))
        return out
    import torch

    from astroclip_jax import files
    from astroclip_jax.models import tower_weights
    from benchmarks.torch_specformer import torch_model
    from converters import specformer as converter

    rows = []
    print(f"{'size':10s} {'framework':9s} {'spectra/s':>10s} {'peak MB':>9s} {'device MB':>9s}")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            model = torch_model(size)
            weights, tower = os.path.join(tmp, "sd.pt"), os.path.join(tmp, "tower")
            torch.save(model.state_dict(), weights)
            sd = {k: v.numpy() for k, v in model.state_dict().items()}
            config, flat = converter.convert_state_dict(sd, "", size, {"num_heads": model.blocks[0].heads})
            tower_weights.save_tower(tower, converter.KIND, config, tower_weights.unflatten(flat))
            results, dumps = {}, {}
            for fw, src in (("torch", weights), ("jax", tower)):
                dumps[fw] = os.path.join(tmp, f"{fw}.npy")
                cmd = [sys.executable, os.path.abspath(__file__), f"--framework={fw}", f"--size={size}",
                       f"--weights={src}", f"--dump={dumps[fw]}", f"--batch={args.batch}",
                       f"--steps={args.steps}", f"--dtype={args.dtype}"]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
                results[fw] = json.loads(proc.stdout.strip().splitlines()[-1])
            ref, ours = np.load(dumps["torch"]), np.load(dumps["jax"])
            rel, cos = measure.agreement(ours, ref, args.dtype, size)
            for fw, r in results.items():
                device = f"{r['device_peak_mb']:9.0f}" if "device_peak_mb" in r else f"{'-':>9s}"
                print(f"{size:10s} {fw:9s} {r['spectra_per_s']:10.1f} {r['peak_mb']:9.0f} {device}")
                rows.append({"size": size, "framework": fw, "max_rel_embedding_diff": rel,
                             "min_token_cosine": cos, **r})
    result = {"benchmark": "specformer_forward", "dtype": args.dtype, "batch": args.batch,
              "length": LENGTH, "load_avg": os.getloadavg()[0],
              "steps": args.steps, "machine": platform.platform(), "rows": rows}
    if args.out is None:
        suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
        args.out = os.path.join(RESULTS, f"specformer_forward{suffix}.json")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with files.atomic_path(args.out) as tmp_out, open(tmp_out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
