"""The whole Flax Spender autoencoder against the `spender` package (0.3), through the converter.

A real `spender.SpectrumAutoencoder` with random, non-trivial weights (PReLU slopes drawn,
SpeculatorActivation's beta and gamma as spender draws them, biases non-zero) is saved as a hub
file, converted with the command line, restored whole (`load_autoencoder`) and run on the same
spectra and redshifts: latents, restframe model, observed-frame reconstruction and the
fidelity loss, on the DESI and SDSS grids, with both decoder activations and with an
(asymmetric) LSF. One case is full size (encoder 128/256/512, decoder 64/256/1024 -> 9780).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import spender

from astroclip_jax.models import spender_autoencoder as ae
from converters import spender as converter
from test_spender import GRIDS, assert_close, hub_file, make_autoencoder, run_cli


def _with_decoder(model, grid: str, activation: str, full: bool, lsf: bool, seed: int):
    """`model` (from test_spender.make_autoencoder) with a real decoder on a restframe grid."""
    torch.manual_seed(seed + 100)
    wave_obs = GRIDS[grid]()
    hidden = ae.DECODER_SIZES["spender" if full else "test"]
    bins = 9780 if full else 1500
    wave_rest = torch.from_numpy(ae.restframe_grid(wave_obs.numpy(), 0.8, bins))
    act = None if activation == "speculator" else [nn.LeakyReLU()] * (len(hidden) + 1)
    model.decoder = spender.SpectrumDecoder(wave_rest, model.encoder.n_latent, n_hidden=hidden,
                                            act=act)
    with torch.no_grad():
        for module in model.decoder.modules():
            if isinstance(module, nn.Linear):
                module.bias.normal_(0.0, 0.2)
    if lsf:
        kernel = torch.tensor([0.05, 0.2, 0.4, 0.25, 0.1, 0.02])  # asymmetric, even length
        model.encoder.instrument = spender.Instrument(wave_obs, lsf=kernel)
    return model.eval()


def _batch(grid: str, n: int = 3, seed: int = 1):
    wave = GRIDS[grid]().numpy()
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.3, 0.95, n).astype(np.float32)  # > 0.8: the blue edge moves inside
    cont = 1 + 0.3 * np.sin(wave / rng.uniform(200, 600, (n, 1)))
    y = (cont + 0.1 * rng.standard_normal((n, wave.size))).astype(np.float32)
    w = rng.uniform(0.5, 2.0, y.shape).astype(np.float32)
    w[:, rng.random(wave.size) < 0.05] = 0  # masked pixels (skylines)
    return y, w, z


def _torch_reference(model, y, w, z):
    with torch.no_grad():
        y_t, w_t, z_t = map(torch.from_numpy, (y, w, z))
        s, restframe, recon, valid = model._forward(y_t, z=z_t)
        loss = model.loss(y_t, w_t, model.encoder.instrument, z=z_t)
    return {"latent": s.numpy(), "restframe": restframe.numpy(), "recon": recon.numpy(),
            "valid": valid.numpy(), "loss": float(loss)}


def _flax_outputs(tower_dir, y, w, z):
    model, params = ae.load_autoencoder(tower_dir)  # op by op (see the module's note on jit)
    s, restframe, recon, valid = model.forward(params, y, z)
    loss = model.loss(params, y, w, z)
    return model, {"latent": np.asarray(s), "restframe": np.asarray(restframe),
                   "recon": np.asarray(recon), "valid": np.asarray(valid), "loss": float(loss)}


CASES = {  # name: (size, grid, activation, full decoder, lsf)
    "full-desi-speculator": ("spender", "desi", "speculator", True, False),
    "test-sdss-leaky-lsf": ("test", "sdss", "leaky_relu", False, True),
    "test-desi-leaky": ("test", "desi", "leaky_relu", False, False),
    "test-sdss-speculator-lsf": ("test", "sdss", "speculator", False, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_autoencoder_matches_spender_through_the_cli(tmp_path, case):
    size, grid, activation, full, lsf = CASES[case]
    model = _with_decoder(make_autoencoder(size, grid, seed=5), grid, activation, full, lsf, 5)
    src = hub_file(model, tmp_path / "ae.pt")
    out = str(tmp_path / "tower")
    if case == "test-sdss-leaky-lsf":  # the real command line once; others its parser in-process
        proc = run_cli(src, out)
        assert proc.returncode == 0, proc.stderr
    else:
        converter.main([src, out])
    y, w, z = _batch(grid, n=2 if full else 3)
    want = _torch_reference(model, y, w, z)
    flax_model, got = _flax_outputs(out, y, w, z)
    assert flax_model.decoder.activation == activation
    assert (flax_model.lsf is not None) == lsf
    for key in ("latent", "restframe", "recon"):
        assert_close(got[key], want[key])
    np.testing.assert_array_equal(got["valid"], want["valid"])
    assert not want["valid"].all() and want["valid"].any()  # redshifts move the edge inside
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)


def test_interp1d_matches_numpy_interp_inside_and_extrapolates_linearly():
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0, 10, (2, 50)), axis=1).astype(np.float32)
    y = rng.standard_normal((2, 50)).astype(np.float32)
    xnew = np.linspace(-1.0, 11.0, 200)
    hi, lo = ae.split_grid(xnew)
    got = np.asarray(ae.interp1d(x, y, hi, lo))
    for i in range(2):
        inside = (xnew >= x[i, 0]) & (xnew <= x[i, -1])
        np.testing.assert_allclose(got[i, inside], np.interp(xnew[inside], x[i], y[i]),
                                   rtol=1e-5, atol=1e-5)
        left = xnew < x[i, 0]  # the first interval's line, continued
        slope = (y[i, 1] - y[i, 0]) / (x[i, 1] - x[i, 0])
        np.testing.assert_allclose(got[i, left], y[i, 0] + slope * (xnew[left] - x[i, 0]),
                                   rtol=1e-4, atol=1e-4)


def test_lsf_matches_numpy_convolution_and_preserves_flux():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 40)).astype(np.float32)
    kernel = np.array([0.1, 0.5, 0.3, 0.1], np.float32)  # the kernel before LSF flips it
    weight = kernel[::-1].copy()
    got = np.asarray(ae.lsf_convolve(x, weight))
    # numpy.convolve with the kernel, 'same' on torch's side: (K-1)//2 zeros on the left
    full = np.stack([np.convolve(row, kernel) for row in x.astype(np.float64)])
    left = len(kernel) - 1 - (len(kernel) - 1) // 2
    np.testing.assert_allclose(got, full[:, left:left + 40] / kernel.sum(), rtol=1e-5, atol=1e-6)
    flat = np.ones((1, 40), np.float32)
    np.testing.assert_allclose(np.asarray(ae.lsf_convolve(flat, weight))[0, 3:-3], 1.0, rtol=1e-6)


def test_desi_restframe_grid_is_train_desi_s():
    grid = ae.restframe_grid(GRIDS["desi"]().numpy(), 0.8)
    assert grid.size == 9780 and grid.dtype == np.float32
    np.testing.assert_allclose([grid[0], grid[-1]], [3600 / 1.8, 9824.0], rtol=1e-6)
