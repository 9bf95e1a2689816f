"""The Flax SpectrumEncoder and its converter against the PyPI reference `spender` (0.3).

A real `spender.SpectrumAutoencoder` (so decoder keys are genuine) gets random, non-trivial
weights (PReLU slopes drawn, not 0.25), is saved as a hub file `{"model": [state_dict], "losses"}`,
converted by the CLI, and both towers are run on the same spectra. Full size (filters
[128, 256, 512]) on the DESI and SDSS grids; the test size elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from torch import nn

import spender

from astroclip_jax.models import tower_weights
from astroclip_jax.models import spender as spender_model
from converters import spender as converter
from converters.common import ConversionError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5  # relative to the largest reference value (float32 convs of ~5000 terms)

GRIDS = {
    "desi": lambda: torch.linspace(3600.0, 9824.0, 7781, dtype=torch.float64),
    "sdss": lambda: 10 ** torch.arange(3.578, 3.97, 1e-4),
    "odd": lambda: torch.linspace(4000.0, 5000.0, 1001),
}


def make_autoencoder(size: str, grid: str, seed: int = 0, n_latent: int | None = None):
    """A spender.SpectrumAutoencoder whose encoder has `SIZES[size]`, with random weights."""
    cfg = spender_model.SIZES[size]
    n_latent = n_latent or cfg["n_latent"]
    torch.manual_seed(seed)
    instrument = spender.Instrument(GRIDS[grid]())
    wave_rest = torch.linspace(2000.0, 10000.0, 300)  # short: the decoder is only ballast here
    model = spender.SpectrumAutoencoder(instrument, wave_rest, n_latent=n_latent, n_hidden=(16, 32, 64))
    enc = model.encoder
    if tuple(cfg["filters"]) != (128, 256, 512):  # spender hard-codes its filters; rebuild smaller
        enc.conv1, enc.conv2, enc.conv3 = enc._conv_blocks(list(cfg["filters"]), list(cfg["kernels"]))
        enc.n_feature = cfg["filters"][-1] // 2
    hidden = tuple(cfg["mlp_hidden"])
    enc.mlp = spender.MLP(enc.n_feature, n_latent, n_hidden=hidden,
                          act=[nn.PReLU(n) for n in hidden] + [nn.Identity()])
    with torch.no_grad():
        for module in enc.modules():
            if isinstance(module, nn.PReLU):
                module.weight.uniform_(-0.6, 0.9)
            elif isinstance(module, (nn.Conv1d, nn.Linear)):
                module.bias.normal_(0.0, 0.2)
    return model.eval()


def make_spectra(grid: str, n: int = 3, seed: int = 1) -> np.ndarray:
    """Smooth continuum + an emission line + noise, float32 (N, L)."""
    wave = GRIDS[grid]().numpy()
    rng = np.random.default_rng(seed)
    amp = rng.uniform(0.5, 2.0, (n, 1))
    line = np.exp(-0.5 * ((wave - rng.uniform(wave.min(), wave.max(), (n, 1))) / 5.0) ** 2)
    cont = 1 + 0.3 * np.sin(wave / rng.uniform(200, 600, (n, 1)))
    return (amp * cont + 3 * line + 0.1 * rng.standard_normal((n, wave.size))).astype(np.float32)


def torch_outputs(encoder: spender.SpectrumEncoder, spectra: np.ndarray) -> dict[str, np.ndarray]:
    """spender's attention features (its forward up to the MLP) and its latents."""
    with torch.no_grad():
        y = torch.from_numpy(spectra)
        h, a = encoder._downsample(y)
        feats = torch.sum(h * encoder.softmax(a), dim=2)  # the same lines as SpectrumEncoder.forward
        latent = encoder(y)
        assert torch.allclose(encoder.mlp(feats), latent)  # the split is where forward applies the MLP
    return {"features": feats.numpy(), "latent": latent.numpy()}


def flax_outputs(tower_dir: str, spectra: np.ndarray) -> tuple[dict[str, np.ndarray], tower_weights.TowerWeights]:
    tw = tower_weights.load_tower(tower_dir, kind="spender")
    module = spender_model.SpectrumEncoder(**tw.config)
    out = jax.jit(module.apply)(tw.variables, spectra)
    return {k: np.asarray(v) for k, v in out.items()}, tw


def assert_close(actual: np.ndarray, desired: np.ndarray) -> None:
    assert actual.shape == desired.shape
    scale = float(np.abs(desired).max())
    np.testing.assert_allclose(actual, desired, rtol=RTOL, atol=RTOL * scale)


def hub_file(model: nn.Module, path) -> str:
    torch.save({"model": [model.state_dict()], "losses": torch.zeros(3, 2)}, path)
    return str(path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "converters.spender", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("size,grid", [("spender", "desi"), ("spender", "sdss"),
                                       ("test", "desi"), ("test", "sdss"), ("test", "odd")])
def test_cli_conversion_matches_spender(tmp_path, size, grid):
    model = make_autoencoder(size, grid, n_latent=10 if size == "spender" else None)
    src = hub_file(model, tmp_path / "ae.pt")
    out = str(tmp_path / "tower")
    proc = run_cli(src, out)
    assert proc.returncode == 0, proc.stderr
    spectra = make_spectra(grid)
    got, tw = flax_outputs(out, spectra)
    want = torch_outputs(model.encoder, spectra)
    assert_close(got["features"], want["features"])
    assert_close(got["latent"], want["latent"])
    # shapes and sizes read from the file; wave_obs kept exactly (its dtype too)
    cfg = spender_model.SIZES[size]
    assert tw.config["filters"] == list(cfg["filters"])
    assert tw.config["n_latent"] == (10 if size == "spender" else cfg["n_latent"])
    np.testing.assert_array_equal(tw.extras["wave_obs"], model.encoder.instrument.wave_obs.numpy())
    assert tw.extras["wave_obs"].dtype == model.encoder.instrument.wave_obs.numpy().dtype
    assert tw.source["has_decoder"] and not any(k.startswith("decoder.") for k in tw.source["ignored"])
    # the features-only path (no MLP) gives spender's features too
    feats = spender_model.features(spender_model.SpectrumEncoder(**tw.config), tw.variables, spectra)
    assert_close(np.asarray(feats), want["features"])


def test_pool_lengths_follow_torch_floor_rule():
    for length, pooled in [(7781, (1557, 142)), (3921, (785, 72)), (1001, (201, 19))]:
        x = torch.zeros(1, 1, length)
        p1 = nn.MaxPool1d(5, padding=2)(x)
        p2 = nn.MaxPool1d(11, padding=5)(p1)
        assert (p1.shape[-1], p2.shape[-1]) == pooled
        y = np.zeros((1, length, 1), np.float32)
        y1 = spender_model.max_pool(y, 5)
        assert (y1.shape[1], spender_model.max_pool(y1, 11).shape[1]) == pooled


@pytest.mark.parametrize("variant", ["legacy_mlp", "plain_encoder", "prefixed_encoder", "redshift_input"])
def test_other_layouts_convert(tmp_path, variant):
    model = make_autoencoder("test", "sdss", seed=3)
    if variant == "legacy_mlp":
        sd = {k.replace("encoder.mlp.", "encoder.mlp.mlp."): v for k, v in model.state_dict().items()}
        obj = {"model": sd, "losses": None}
    elif variant == "plain_encoder":
        obj = model.encoder.state_dict()
    elif variant == "prefixed_encoder":
        obj = {"encoder." + k: v for k, v in model.encoder.state_dict().items()}
    else:  # old files: the MLP took z as a 257th input; spender.load_model drops that column
        sd = dict(model.state_dict())
        w = sd["encoder.mlp.0.weight"]
        sd["encoder.mlp.0.weight"] = torch.cat([w, torch.randn(w.shape[0], 1)], dim=1)
        obj = {"model": sd}
    torch.save(obj, tmp_path / "in.pt")
    out = converter.convert(str(tmp_path / "in.pt"), str(tmp_path / "tower"))
    spectra = make_spectra("sdss", n=2)
    got, tw = flax_outputs(out, spectra)
    assert_close(got["latent"], torch_outputs(model.encoder, spectra)["latent"])
    assert tw.source["legacy_mlp_naming"] == (variant == "legacy_mlp")
    assert tw.source["dropped_redshift_input"] == (variant == "redshift_input")
    np.testing.assert_array_equal(tw.extras["wave_obs"], GRIDS["sdss"]().numpy())


def _state_dict(model):
    return dict(model.state_dict())


def _drop(sd):
    del sd["encoder.conv2.2.weight"]
    return sd


def _extra(sd):
    sd["encoder.conv1.1.running_mean"] = torch.zeros(8)
    return sd


def _reshape(sd):
    sd["encoder.conv2.2.weight"] = torch.zeros(7)
    return sd


@pytest.mark.parametrize("corrupt,message", [
    ("text", "not a readable PyTorch checkpoint"),
    ("no_model", "not a Spender checkpoint"),
    (_drop, "missing key(s) ['encoder.conv2.2.weight']"),
    (_extra, "unexpected key(s) ['encoder.conv1.1.running_mean']"),
    (_reshape, "key 'encoder.conv2.2.weight' has shape (7,), which gives (7,) "
               "for 'params/conv2_2/negative_slope'; expected (16,)"),
])
def test_rejections_name_the_problem_and_write_nothing(tmp_path, corrupt, message):
    src = tmp_path / "in.pt"
    if corrupt == "text":
        src.write_text("not a checkpoint\n")
    elif corrupt == "no_model":
        torch.save({"weights": [1, 2, 3]}, src)
    else:
        torch.save({"model": [corrupt(_state_dict(make_autoencoder("test", "sdss")))], "losses": None}, src)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    with pytest.raises(ConversionError) as err:
        converter.convert(str(src), str(out_parent / "tower"))
    assert message in str(err.value)
    assert str(src) in str(err.value)
    assert os.listdir(out_parent) == []  # no output and no temporary sibling


def test_cli_reports_error_and_refuses_overwrite(tmp_path):
    src = tmp_path / "in.pt"
    torch.save({"model": [_drop(_state_dict(make_autoencoder("test", "sdss")))]}, src)
    proc = run_cli(str(src), str(tmp_path / "tower"))
    assert proc.returncode != 0 and "missing key(s)" in proc.stderr
    assert not (tmp_path / "tower").exists()
    (tmp_path / "tower").mkdir()
    with pytest.raises(FileExistsError):
        converter.convert(str(src), str(tmp_path / "tower"))
