"""AstroDINO ViT forward on CPU: our jitted Flax `VisionTransformer` vs timm's, same weights.

    python benchmarks/vit_forward.py [--size vit_large_p12] [--batch 4] [--iters 3]
        [--path cls|tokens] [--dtype float32|bfloat16] [--torch-threads N] [--label NAME]

A timm `VisionTransformer` with DINOv2's options (as tests/test_vit.py builds it) gets timm's
random init plus a random `mask_token`; its weights go through `converters.dinov2`'s mapping into
a tower directory, so both sides hold the same numbers. `--path cls` times the standalone
DINOv2 forward (timm `forward_features(x)[:, 0]`), `--path tokens` AstroCLIP's use of the
backbone (norm(blocks(patch_embed(x))), no CLS, no positions). Each framework runs in its own
subprocess, so its peak resident memory (VmHWM, `measure.peak_mb`) is its own; the median
wall time of --iters calls after a warm-up (JAX: the compile) gives images/s, the median
process CPU time the work per image; the two outputs on the shared batch must agree (1e-4
relative; `--dtype bfloat16`: both frameworks in bfloat16 with float32 parameters on our side,
every output row's cosine similarity >= 0.999) or nothing is reported. Printed as a table;
written as JSON to benchmarks/results/vit_forward-LABEL.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks import measure  # noqa: E402


def _timm_model(size: str):
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from astroclip_jax.models.vit import SIZES

    cfg = SIZES[size]
    return VisionTransformer(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], num_classes=0, global_pool="token",
        embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_hidden"] / cfg["embed_dim"], qkv_bias=True, init_values=1e-5,
        class_token=True, no_embed_class=False, act_layer=torch.nn.GELU,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()


def _images(batch: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)



def run_torch(args) -> dict:
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model = _timm_model(args.size)
    model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    x = torch.from_numpy(_images(args.batch, model.patch_embed.img_size[0])).permute(0, 3, 1, 2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, x = model.to(device), x.to(device)
    if args.dtype == "bfloat16":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)

    def forward():
        with torch.no_grad():
            if args.path == "cls":
                return model.forward_features(x)[:, 0]
            return model.norm(model.blocks(model.patch_embed(x)))

    def timed_call():
        out = forward()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    np.save(args.out, forward().float().cpu().numpy())
    return {**measure.timed_calls(timed_call, args.iters), "threads": torch.get_num_threads(),
            "device": device,
            "version": torch.__version__,
            **measure.peak_mb(torch.cuda.max_memory_allocated() if device == "cuda" else None)}


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp

    from astroclip_jax.models import towers

    module, variables, weights = towers.load_tower_module(args.weights, kind="dinov2_vit",
                                                          dtype=args.dtype)
    x = jnp.asarray(_images(args.batch, weights.config["img_size"]))
    fwd = jax.jit(functools.partial(module.apply, method="cls_embedding") if args.path == "cls"
                  # the product's frozen forward, as embedding and the feature cache run it
                  else lambda v, x: towers.features("dinov2_vit", module, v, x))

    def forward():
        return jax.block_until_ready(fwd(variables, x))

    timing = measure.timed_calls(forward, args.iters)  # first: compile + run
    np.save(args.out, np.asarray(forward()))
    device_peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")  # None: CPU
    return {**timing, "version": jax.__version__, **measure.peak_mb(device_peak)}


def _child(args) -> None:
    print(json.dumps(run_torch(args) if args.framework == "torch" else run_jax(args)))


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="vit_large_p12")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--path", choices=("cls", "tokens"), default="cls")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--label", default="")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--framework", choices=("jax", "torch"))  # internal: one child
    parser.add_argument("--weights"), parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.framework:
        return _child(args)

    import torch

    from astroclip_jax.models import tower_weights
    from converters import common, dinov2 as conv

    torch.manual_seed(0)
    model = _timm_model(args.size)
    state = model.state_dict()
    state["mask_token"] = torch.randn(1, model.embed_dim)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), os.path.join(tmp, "timm.pt"))
        config, flat = conv.convert_state(common.to_numpy(state), "", "benchmark")
        tower_weights.save_tower(os.path.join(tmp, "tower"), conv.KIND, config,
                                 tower_weights.unflatten(flat), source={"file": "benchmark"})
        del model, state, flat
        for fw, weights in (("torch", "timm.pt"), ("jax", "tower")):
            cmd = [sys.executable, os.path.abspath(__file__), f"--framework={fw}",
                   f"--size={args.size}", f"--batch={args.batch}", f"--iters={args.iters}",
                   f"--path={args.path}", f"--dtype={args.dtype}",
                   f"--torch-threads={args.torch_threads}",
                   f"--weights={os.path.join(tmp, weights)}", f"--out={os.path.join(tmp, fw)}.npy"]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{fw} child failed:\n{proc.stderr[-3000:]}")
            results[fw] = json.loads(proc.stdout.strip().splitlines()[-1])
        ref, ours = np.load(os.path.join(tmp, "torch.npy")), np.load(os.path.join(tmp, "jax.npy"))
    rel, cos = measure.agreement(ours, ref, args.dtype, f"{args.size} vs timm")

    result = {
        "label": args.label or "default", "size": args.size, "batch": args.batch,
        "iters": args.iters, "path": args.path, "dtype": args.dtype, "max_rel_diff": rel,
        "min_row_cosine": cos, "torch_device": results["torch"]["device"],
        **measure.compare(results, args.batch, "image", "images")}
    measure.print_comparison(result, results, "image", "images",
                             (("path", args.path), ("batch", args.batch)))
    print(f"jax / torch images/s: {result['jax_over_torch']:.2f}; outputs agree to {rel:.1e}; "
          f"load average {result['load_avg']:.1f}")

    measure.write_json(os.path.join(args.results, f"vit_forward-{result['label']}.json"), result)
    return result


if __name__ == "__main__":
    main()
