"""The full released-AstroCLIP embed on CPU: our jitted Flax model vs PyTorch, same weights, same batch.

    python benchmarks/astroclip_embed.py [--size full|grid] [--batch 4] [--iters 3] [--label NAME] [--results DIR]

An `astroclip.ckpt` in upstream's exact format (random non-trivial weights, written by
tests/upstream_checkpoints.py; `--size full`: AstroDINO ViT-L/12 at 144 px, SpecFormer 768 x 6,
1024-d heads) goes through our converter (`converters.astroclip.convert`, as the command line
does). JAX: configs/astroclip.py pointed at the converted folders, the model built from the
resolved settings (`models.astroclip.build`), `jax.jit(model.embed)`: images and spectra in,
both normalised embeddings out, what `embed` and the feature-free evaluations run. PyTorch:
benchmarks/torch_astroclip.py (timm's ViT with DINOv2's options, the torch SpecFormer, heads
from torch.nn.MultiheadAttention) loaded with the checkpoint's state_dict. Each framework runs
in its own subprocess, so its peak resident memory (VmHWM) is its own; the median wall time of
--iters calls after a warm-up (JAX: the compile) gives galaxies/s (one galaxy = one image and
one spectrum), the median process CPU time the work per galaxy. Both embeddings must agree to
1e-4 relative or nothing is reported. Printed as a table; written atomically to
benchmarks/results/astroclip_embed-LABEL.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks import measure  # noqa: E402

CONFIG = {"full": "", "grid": "smoke"}  # the configs/astroclip.py variant each size runs through


def _upstream_writer():
    """tests/upstream_checkpoints.py, the writer of upstream's file formats (tests/ is not a
    package, so by path)."""
    path = os.path.join(ROOT, "tests", "upstream_checkpoints.py")
    spec = importlib.util.spec_from_file_location("upstream_checkpoints", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(sizes: dict, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.normal(0.3, 0.5, (batch, sizes["img_size"], sizes["img_size"], 3)).astype(np.float32)
    flux = (5 + 3 * rng.normal(size=(batch, sizes["spectrum_length"]))).astype(np.float32)
    return images, flux



def run_torch(args, sizes: dict) -> dict:
    import torch

    from benchmarks.torch_astroclip import TorchAstroCLIP

    with np.load(args.weights) as npz:
        model = TorchAstroCLIP({k: npz[k] for k in npz.files}, sizes)
    images, flux = _inputs(sizes, args.batch)
    x, f = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(flux)
    out = model(x, f)
    np.savez(args.out, image=out[0].numpy(), spectrum=out[1].numpy())
    return {**measure.timed_calls(lambda: model(x, f), args.iters),
            "threads": torch.get_num_threads(),
            "version": torch.__version__, **measure.peak_mb()}


def run_jax(args, sizes: dict) -> dict:
    import jax

    from astroclip_jax import settings as settings_lib
    from astroclip_jax.models import astroclip as astroclip_model
    from configs import astroclip as astroclip_config

    config = astroclip_config.get_config(CONFIG[args.size])
    model_cfg = config.model
    model_cfg.image_tower.weights = os.path.join(args.weights, "image_tower")
    model_cfg.spectrum_tower.weights = os.path.join(args.weights, "spectrum_tower")
    model_cfg.heads_weights = os.path.join(args.weights, "heads")
    for head in (model_cfg.image_head, model_cfg.spectrum_head):  # the file's head shapes
        head.out, head.hidden, head.num_heads = (sizes["embed_dim"], (4 * sizes["embed_dim"],),
                                                 sizes["n_head"])
    settings = settings_lib.resolve(config, "embed")
    model, params = astroclip_model.build(settings.model, jax.random.PRNGKey(0))
    images, flux = map(jax.device_put, _inputs(sizes, args.batch))
    embed = jax.jit(model.embed)

    def call():
        return jax.block_until_ready(embed(params, images, flux))

    timing = measure.timed_calls(call, args.iters)  # first: compile + run
    image, spectrum = call()
    np.savez(args.out, image=np.asarray(image), spectrum=np.asarray(spectrum))
    return {**timing, "version": jax.__version__, **measure.peak_mb()}


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(CONFIG), default="full")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--label", default="")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--framework", choices=("jax", "torch"))  # internal: one child
    parser.add_argument("--weights"), parser.add_argument("--out")
    args = parser.parse_args(argv)
    sizes = _upstream_writer().SIZES[args.size]
    if args.framework:
        result = run_torch(args, sizes) if args.framework == "torch" else run_jax(args, sizes)
        print(json.dumps(result))
        return None

    from converters import astroclip as converter

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _upstream_writer().write_checkpoints(
            os.path.join(tmp, "upstream"), args.size, args.seed, names=("astroclip.ckpt",))["astroclip.ckpt"]
        converted = os.path.join(tmp, "converted")
        converter.convert(ckpt, converted)
        outs = {}
        for fw, weights in (("torch", ckpt + ".reference.npz"), ("jax", converted)):
            outs[fw] = os.path.join(tmp, f"{fw}.npz")
            cmd = [sys.executable, os.path.abspath(__file__), f"--framework={fw}",
                   f"--size={args.size}", f"--batch={args.batch}", f"--iters={args.iters}",
                   f"--weights={weights}", f"--out={outs[fw]}"]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{fw} child failed:\n{proc.stderr[-3000:]}")
            results[fw] = json.loads(proc.stdout.strip().splitlines()[-1])
        with np.load(outs["torch"]) as ref, np.load(outs["jax"]) as ours:
            rel = {k: float(np.abs(ours[k] - ref[k]).max() / np.abs(ref[k]).max())
                   for k in ("image", "spectrum")}
    if not max(rel.values()) <= 1e-4:
        raise SystemExit(f"embeddings differ: {rel} (max abs diff / max |torch value|)")

    result = {"label": args.label or args.size, "size": args.size, "batch": args.batch,
              "iters": args.iters, "max_rel_diff": rel,
              **measure.compare(results, args.batch, "galaxy", "galaxies")}
    measure.print_comparison(result, results, "galaxy", "galaxies", (("batch", args.batch),))
    print(f"jax / torch galaxies/s: {result['jax_over_torch']:.2f}; embeddings agree to "
          f"{max(rel.values()):.1e}; load average {result['load_avg']:.1f}")

    measure.write_json(os.path.join(args.results, f"astroclip_embed-{result['label']}.json"), result)
    return result


if __name__ == "__main__":
    main()
