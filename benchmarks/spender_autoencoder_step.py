"""Our Spender autoencoder train step vs the `spender` package's model doing the same step.

    python benchmarks/spender_autoencoder_step.py [--sizes small spender] [--batch 64] [--steps 5]
        [--repeats 2] [--torch-device cpu|cuda|auto] [--out benchmarks/results/spender_autoencoder_step.json]

For each size (encoder `models.spender.SIZES`, decoder `DECODER_SIZES`, DESI grid, restframe
9780): a `spender.SpectrumAutoencoder` with random weights is saved as a hub file and converted
(`converters/spender.py`), so both sides hold the same weights; on the same batch (normalised
synthetic-like spectra, weights, redshifts) the fidelity losses are checked equal first (1e-5
relative), then one step = fidelity loss, gradients, global-norm clip 1.0, Adam (lr 1e-3, eps
1e-4), as train_DESI.py, timed over --steps after a warm-up. Each framework runs in its own
subprocess, so its peak resident memory (VmHWM, `measure.peak_mb`) is its own; the two children
run alternately --repeats times (a shared machine's load hits both alike) and the medians are
compared. Our step is jitted as `--mode=pretrain_spender` jits it: the batch is an argument (not
a constant baked into the program) and the state is donated (updated in place, as torch's).
Prints spectra/s, CPU seconds per spectrum and peak MB; writes JSON (`measure.compare` fields).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import measure  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch_model(size: str):
    import spender
    import torch
    from torch import nn

    from astroclip_jax import wavelength_grids
    from astroclip_jax.models import spender as spender_model
    from astroclip_jax.models import spender_autoencoder as ae

    torch.manual_seed(0)
    cfg = spender_model.SIZES[size]
    wave = torch.from_numpy(wavelength_grids.desi_wave())
    wave_rest = torch.from_numpy(ae.restframe_grid(wave.numpy(), 0.8))
    model = spender.SpectrumAutoencoder(spender.Instrument(wave), wave_rest, n_latent=cfg["n_latent"],
                                        n_hidden=ae.DECODER_SIZES[size])
    enc = model.encoder
    if tuple(cfg["filters"]) != (128, 256, 512):  # spender hard-codes its filters
        enc.conv1, enc.conv2, enc.conv3 = enc._conv_blocks(list(cfg["filters"]), list(cfg["kernels"]))
        enc.n_feature = cfg["filters"][-1] // 2
    hidden = tuple(cfg["mlp_hidden"])
    enc.mlp = spender.MLP(enc.n_feature, cfg["n_latent"], n_hidden=hidden,
                          act=[nn.PReLU(n) for n in hidden] + [nn.Identity()])
    return model


def _batch(batch: int):
    from astroclip_jax import wavelength_grids

    wave = wavelength_grids.desi_wave()
    rng = np.random.default_rng(0)
    y = (1 + 0.3 * np.sin(wave[None, :] / rng.uniform(200, 600, (batch, 1)))
         + 0.1 * rng.standard_normal((batch, wave.size))).astype(np.float32)
    w = rng.uniform(50, 100, y.shape).astype(np.float32)
    z = rng.uniform(0.0, 0.5, batch).astype(np.float32)
    return y, w, z


def run_torch(hub: str, size: str, batch: int, steps: int, device: str = "cpu") -> dict:
    import spender
    import torch

    from astroclip_jax import wavelength_grids

    torch.set_num_threads(os.cpu_count())
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    instrument = spender.Instrument(torch.from_numpy(wavelength_grids.desi_wave())).to(device)
    model = _torch_model(size)
    model.load_state_dict(torch.load(hub, weights_only=True)["model"][0])
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
    y, w, z = (torch.from_numpy(a).to(device) for a in _batch(batch))

    losses = []

    def step():
        loss = model.loss(y, w, instrument, z=z)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))  # waits for the step (on a GPU too)

    out = measure.timed_calls(step, steps)
    return {"loss": losses[0], **out, "threads": torch.get_num_threads(), "device": device,
            "version": torch.__version__, **measure.peak_mb()}


def run_jax(tower: str, batch: int, steps: int) -> dict:
    import jax
    import optax

    from astroclip_jax.models import spender_autoencoder as ae

    model, params = ae.load_autoencoder(tower)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3, eps=1e-4))
    y, w, z = jax.device_put(_batch(batch))

    # As the trainer: the batch is an argument (a closed-over NumPy batch would be a constant
    # in the program, folded at compile time) and the state is donated.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, y, w, z):
        loss, grads = jax.value_and_grad(lambda p: model.loss(p, y, w, z))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = (params, tx.init(params))
    losses = []

    def one() -> None:
        nonlocal state
        *state, loss = step(*state, y, w, z)
        losses.append(float(loss))  # waits for the step

    out = measure.timed_calls(one, steps)
    return {"loss": losses[0], **out, "version": jax.__version__, **measure.peak_mb()}


def _child(args) -> None:
    out = (run_torch(args.hub, args.size, args.batch, args.steps, args.torch_device) if args.framework == "torch"
           else run_jax(args.tower, args.batch, args.steps))
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "spender"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2,
                        help="torch and JAX children run alternately this many times each")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                     "spender_autoencoder_step.json"))
    parser.add_argument("--torch-device", default="cpu", help="cpu | cuda | auto (torch's side)")
    parser.add_argument("--framework", choices=("jax", "torch"))  # internal: one child
    parser.add_argument("--size"), parser.add_argument("--hub"), parser.add_argument("--tower")
    args = parser.parse_args()
    if args.framework:
        return _child(args)
    import torch

    from converters import spender as converter

    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            hub, tower = os.path.join(tmp, "ae.pt"), os.path.join(tmp, "tower")
            torch.save({"model": [_torch_model(size).state_dict()]}, hub)
            converter.convert(hub, tower)
            runs: dict[str, list[dict]] = {"torch": [], "jax": []}
            for _ in range(args.repeats):
                for fw in ("torch", "jax"):
                    cmd = [sys.executable, os.path.abspath(__file__), f"--framework={fw}",
                           f"--size={size}", f"--hub={hub}", f"--tower={tower}",
                           f"--batch={args.batch}", f"--steps={args.steps}",
                           f"--torch-device={args.torch_device}"]
                    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
                    runs[fw].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            # Every run's timed steps pooled (median over all); the largest peak; the first compile.
            results = {fw: {**r[0], "times_s": [t for x in r for t in x["times_s"]],
                            "cpu_s": [t for x in r for t in x["cpu_s"]],
                            "peak_mb": max(x["peak_mb"] for x in r)} for fw, r in runs.items()}
            # The same step: the first losses (same weights, same batch) agree.
            np.testing.assert_allclose(results["jax"]["loss"], results["torch"]["loss"], rtol=1e-5)
            row = {"label": size, "batch": args.batch, "steps": args.steps,
                   "repeats": args.repeats, "torch_device": results["torch"]["device"], "loss": results["jax"]["loss"],
                   **measure.compare(results, args.batch, "spectrum", "spectra"),
                   "jax_over_torch_peak": round(results["jax"]["peak_mb"]
                                                / results["torch"]["peak_mb"], 3)}
            measure.print_comparison(row, results, "spectrum", "spectra")
            print(f"{'':14}peak jax/torch {row['jax_over_torch_peak']:.2f}, speed jax/torch "
                  f"{row['jax_over_torch']:.2f}, load average {row['load_avg']:.2f}", flush=True)
            rows.append(row)
    measure.write_json(args.out, {"benchmark": "spender_autoencoder_step", "rows": rows})


if __name__ == "__main__":
    main()
