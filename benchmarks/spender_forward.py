"""Spectra per second of the spectrum tower: jitted Flax vs spender (torch, eval, no_grad).

    python -m benchmarks.spender_forward [--batch 64] [--iters 3] [--size spender]

Both run the same random weights (a spender encoder converted by `converters.spender`) on the
DESI grid (7781 pixels) in the same process; also reports the largest difference between them.
Writes benchmarks/results/spender_forward.json (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
import torch
from torch import nn

import spender

from astroclip_jax.models import tower_weights
from astroclip_jax.models import spender as spender_model
from converters import spender as converter

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DESI_GRID = torch.linspace(3600.0, 9824.0, 7781, dtype=torch.float64)


def make_encoder(size: str, seed: int = 0) -> spender.SpectrumEncoder:
    """A spender encoder with `SIZES[size]` and random, non-trivial weights."""
    cfg = spender_model.SIZES[size]
    torch.manual_seed(seed)
    enc = spender.SpectrumEncoder(spender.Instrument(DESI_GRID), cfg["n_latent"],
                                  n_hidden=tuple(cfg["mlp_hidden"]))
    if tuple(cfg["filters"]) != (128, 256, 512):
        enc.conv1, enc.conv2, enc.conv3 = enc._conv_blocks(list(cfg["filters"]), list(cfg["kernels"]))
        enc.n_feature = cfg["filters"][-1] // 2
        enc.mlp = spender.MLP(enc.n_feature, cfg["n_latent"], n_hidden=tuple(cfg["mlp_hidden"]),
                              act=[nn.PReLU(n) for n in cfg["mlp_hidden"]] + [nn.Identity()])
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(-0.6, 0.9)
    return enc.eval()


def time_it(fn, iters: int) -> float:
    """Seconds per call, after one warm-up call (compilation for JAX)."""
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--size", default="spender", choices=sorted(spender_model.SIZES))
    parser.add_argument("--out", default=os.path.join(RESULTS, "spender_forward.json"))
    args = parser.parse_args(argv)

    enc = make_encoder(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "encoder.pt")
        torch.save(enc.state_dict(), src)
        tw = tower_weights.load_tower(converter.convert(src, os.path.join(tmp, "tower")), kind="spender")
    module = spender_model.SpectrumEncoder(**tw.config)
    variables = jax.device_put(tw.variables)

    rng = np.random.default_rng(0)
    spectra = (1 + 0.1 * rng.standard_normal((args.batch, DESI_GRID.numel()))).astype(np.float32)
    x_jax = jax.device_put(spectra)
    x_torch = torch.from_numpy(spectra)

    apply = jax.jit(module.apply)
    flax_call = lambda: jax.block_until_ready(apply(variables, x_jax))

    def torch_call():
        with torch.no_grad():
            return enc(x_torch)

    t_flax = time_it(flax_call, args.iters)
    t_torch = time_it(torch_call, args.iters)
    diff = float(np.abs(np.asarray(flax_call()["latent"]) - torch_call().numpy()).max())

    result = {
        "benchmark": "spender_forward",
        "size": args.size,
        "batch": args.batch,
        "length": int(DESI_GRID.numel()),
        "iters": args.iters,
        "flax_spectra_per_s": args.batch / t_flax,
        "torch_spectra_per_s": args.batch / t_torch,
        "max_abs_latent_diff": diff,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch_threads": torch.get_num_threads(),
        "jax_version": jax.__version__,
        "torch_version": torch.__version__,
        "machine": platform.platform(),
    }
    print(f"spender {args.size} batch {args.batch} on {result['length']} px: "
          f"flax ({result['jax_backend']}) {result['flax_spectra_per_s']:.1f} spectra/s, "
          f"torch (cpu) {result['torch_spectra_per_s']:.1f} spectra/s, max |dlatent| {diff:.2e}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
