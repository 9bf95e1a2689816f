"""The Flax SpecFormer and its converter against independent references.

* Tokenisation and one transformer block: float64 NumPy written here from upstream's equations
  (astroclip/models/specformer.py `preprocess`, `_slice`; astroclip/modules.py), our float32 to
  1e-5 of the largest reference value, and our float64 path (JAX x64, in a subprocess) to 1e-10.
* The whole forward: a torch model assembled from torch.nn pieces (Linear, Embedding,
  LayerNorm, scaled_dot_product_attention, GELU; `benchmarks/torch_specformer.py`, which the
  benchmark shares) with upstream's state_dict names and random, non-trivial weights, converted
  by `converters.specformer`; test size and full size (768 x 6, 6 heads, 7781 pixels) to 1e-4
  relative in float32.
* mask_chunks: the chunk facts, and its offsets against upstream's `_mask_seq` (transcribed in
  torch below) by a chi-square test of the two samples.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from torch import nn

from benchmarks import torch_specformer
from benchmarks.torch_specformer import TorchSpecFormer, torch_model
from astroclip_jax.flat_tree import flatten
from astroclip_jax.models import specformer as sf
from astroclip_jax.models import tower_weights, towers
from converters import specformer as converter
from converters.common import ConversionError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-4  # float32 against float32 torch, relative to the largest reference value
RTOL64 = 1e-5  # float32 against float64 NumPy
DESI = 7781


# --- references -------------------------------------------------------------------------------

def numpy_tokens(flux: np.ndarray, section: int = 20, overlap: int = 10) -> np.ndarray:
    """Upstream's preprocess in float64, one spectrum at a time, as its text reads."""
    out = []
    for row in np.asarray(flux, np.float64):
        mean, std = row.mean(), max(row.std(ddof=1), 0.2)
        z = (row - mean) / std
        windows = [z[s:s + section] for s in range(0, len(z) - overlap, section - overlap)]
        windows = windows[:-1]  # upstream's length test always fails: the last is dropped
        tokens = np.zeros((len(windows) + 1, section + 2))
        tokens[1:, 2:] = np.stack(windows)
        tokens[0, :2] = (mean - 2) / 2, (std - 2) / 8
        out.append(tokens)
    return np.stack(out)


def numpy_layer_norm(x, scale, bias, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def numpy_block(x: np.ndarray, p: dict, heads: int) -> np.ndarray:
    """modules.TransformerBlock (causal=False, eval) in float64 from its equations."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    b, t, d = x.shape
    hs = d // heads
    h = numpy_layer_norm(x, p["layernorm1"]["scale"], p["layernorm1"]["bias"])
    qkv = h @ p["attention"]["attention"]["kernel"] + p["attention"]["attention"]["bias"]
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, t, heads, hs).transpose(0, 2, 1, 3) for i in range(3))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    y = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    x = x + y @ p["attention"]["projection"]["kernel"] + p["attention"]["projection"]["bias"]
    h = numpy_layer_norm(x, p["layernorm2"]["scale"], p["layernorm2"]["bias"])
    u = h @ p["mlp"]["encoder"]["kernel"] + p["mlp"]["encoder"]["bias"]
    u = 0.5 * u * (1 + scipy.special.erf(u / np.sqrt(2)))  # exact GELU
    return x + u @ p["mlp"]["decoder"]["kernel"] + p["mlp"]["decoder"]["bias"]


def spectra(batch: int, length: int = DESI, seed: int = 0) -> np.ndarray:
    """Galaxy-like flux: a continuum of a few units, lines, noise; one faint one (std < 0.2)."""
    rng = np.random.default_rng(seed)
    wave = np.linspace(3600, 9824, length)
    flux = rng.uniform(0.5, 6, (batch, 1)) * (wave / 6000) ** rng.uniform(-2, 2, (batch, 1))
    for _ in range(8):
        centre = rng.uniform(3700, 9700, (batch, 1))
        flux += rng.uniform(-2, 8, (batch, 1)) * np.exp(-0.5 * ((wave - centre) / 5) ** 2)
    flux += rng.normal(0, 0.5, flux.shape)
    flux[0] = 0.3 + rng.normal(0, 0.02, length)  # std clipped to 0.2
    return flux.astype(np.float32)


def state_dict(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def converted(model: TorchSpecFormer, size: str, tmp_path):
    """(module, variables) through the converter's mapping and the tower directory on disk."""
    cfg = sf.SIZES[size]
    hp = dict(cfg, dropout=0.0, mask_num_chunks=6, mask_chunk_width=50)
    config, flat = converter.convert_state_dict(state_dict(model), "", "specformer.ckpt", hp)
    out = tower_weights.save_tower(tmp_path / "tower", converter.KIND, config, tower_weights.unflatten(flat))
    module, variables, _ = towers.load_tower_module(out, kind="specformer")
    return module, variables


def max_rel(ours, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


# --- tokenisation and one block ---------------------------------------------------------------

@pytest.mark.parametrize("length", [DESI, 7780, 101])
def test_tokenize_matches_float64_numpy(length):
    flux = spectra(3, length)
    ref = numpy_tokens(flux)
    ours = np.asarray(sf.tokenize(flux))
    assert ours.shape == ref.shape == (3, sf.num_tokens(length), 22)
    assert max_rel(ours, ref) < RTOL64
    assert ref[0, 0, 1] == (0.2 - 2) / 8  # the faint spectrum's std was clipped


def test_token_counts():
    # DESI: windows of 20 every 10 over 7781 pixels; the 778th (11 pixels) dropped, + stats token.
    assert sf.num_tokens(DESI) == 778
    # 7780 pixels: upstream drops the last window even though it is whole (7760:7780).
    assert sf.num_tokens(7780) == 777
    with pytest.raises(ValueError, match="more than 20"):
        sf.tokenize(np.zeros((1, 20), np.float32))


def test_block_matches_float64_numpy():
    d, heads = 64, 4
    rng = np.random.default_rng(1)
    # Per-token scales down to 0.01: there LayerNorm's eps (1e-5 vs Flax's 1e-6) matters.
    x = (rng.normal(0, 1, (2, 50, d)) * rng.uniform(0.01, 1, (2, 50, 1))).astype(np.float32)
    block = sf.TransformerBlock(num_heads=heads)
    params = jax.jit(block.init)(jax.random.PRNGKey(0), x)["params"]
    # Non-trivial: every parameter redrawn (LayerNorm scales around 1, biases non-zero).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
    ours = jax.jit(block.apply)({"params": params}, x)
    assert max_rel(ours, numpy_block(x.astype(np.float64), params, heads)) < RTOL64


_X64_SCRIPT = """
import sys
import jax, numpy as np
from astroclip_jax.flat_tree import unflatten
from astroclip_jax.models import specformer as sf
data = dict(np.load(sys.argv[1]))
flux, x, heads = data.pop("flux"), data.pop("x"), int(data.pop("heads"))
params = unflatten({k: np.asarray(v, np.float64) for k, v in data.items()})
assert jax.config.jax_enable_x64
np.savez(sys.argv[2], tokens=np.asarray(sf.tokenize(flux)),
         block=np.asarray(sf.TransformerBlock(num_heads=heads).apply({"params": params}, x)))
"""


def test_float64_path_matches_numpy_to_1e10(tmp_path):
    # The same equations in float64 (JAX x64 needs its own process): agreement to 1e-10 pins
    # every constant (eps, the std floor and its ddof, the scaling) beyond float32 rounding.
    d, heads = 48, 3
    rng = np.random.default_rng(4)
    flux = spectra(2, 2001).astype(np.float64)
    x = rng.normal(0, 1, (2, 30, d)) * rng.uniform(0.01, 1, (2, 30, 1))
    block = sf.TransformerBlock(num_heads=heads)
    params = jax.jit(block.init)(jax.random.PRNGKey(0), x.astype(np.float32))["params"]
    params = jax.tree.map(lambda a: np.asarray(a) + rng.normal(0, 0.3, a.shape), params)
    np.savez(tmp_path / "in.npz", flux=flux, x=x, heads=heads, **flatten(params))
    env = dict(os.environ, PYTHONPATH=REPO, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", _X64_SCRIPT, str(tmp_path / "in.npz"),
                          str(tmp_path / "out.npz")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = np.load(tmp_path / "out.npz")
    assert out["tokens"].dtype == out["block"].dtype == np.float64
    assert max_rel(out["tokens"], numpy_tokens(flux)) < 1e-10
    assert max_rel(out["block"], numpy_block(x, params, heads)) < 1e-10


# --- the whole forward against torch ----------------------------------------------------------

def _compare_forward(size: str, batch: int, tmp_path):
    model = torch_model(size)
    flux = spectra(batch)
    with torch.no_grad():
        ref = model(torch.from_numpy(flux))
    module, variables = converted(model, size, tmp_path)
    emb = jax.jit(module.apply)(variables, flux)
    assert emb.shape == (batch, 778, sf.SIZES[size]["embed_dim"])
    assert max_rel(emb, ref["embedding"]) < RTOL
    recon = jax.jit(lambda v, f: module.apply(v, module.apply(v, f, method="tokenize"),
                                              method="reconstruct"))(variables, flux)
    assert max_rel(recon, ref["reconstructions"]) < RTOL
    return module, variables, flux


def test_forward_matches_torch_and_batch_of_one(tmp_path):
    assert torch_specformer.SIZES == sf.SIZES  # the reference is built at our sizes
    module, variables, flux = _compare_forward("test", 8, tmp_path)
    apply = jax.jit(module.apply)
    eight = np.asarray(apply(variables, flux))
    for i in (0, 5):
        one = np.asarray(apply(variables, flux[i:i + 1]))
        assert one.shape == (1,) + eight.shape[1:]
        np.testing.assert_allclose(one[0], eight[i], rtol=0, atol=1e-5 * np.abs(eight[i]).max())


def test_forward_matches_torch_full_size(tmp_path):
    _compare_forward("specformer", 2, tmp_path)


# --- masking ----------------------------------------------------------------------------------

def upstream_mask_seq(seq: torch.Tensor, num_chunks: int = 6, chunk_width: int = 50) -> torch.Tensor:
    """Upstream's SpecFormer._mask_seq, verbatim but for `self.hparams`."""
    len_ = seq.shape[0]
    masked_seq = seq.clone()
    for i in range(num_chunks):
        start = (i * len_) // num_chunks
        loc = torch.randint(0, len_ // num_chunks - chunk_width, (1,)).item()
        masked_seq[loc + start: loc + start + chunk_width] = 0
    return masked_seq


def chunk_offsets(masked: np.ndarray, n_chunks: int = 6, width: int = 50) -> np.ndarray:
    """(rows, n_chunks) offsets of the zeroed runs in each part; checks the facts on the way."""
    zero = np.all(masked == 0, axis=-1)
    length = zero.shape[1]
    offsets = []
    for row in zero:
        assert row.sum() == n_chunks * width
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
        runs = edges.reshape(-1, 2)  # [start, end) of each zeroed run
        assert len(runs) == n_chunks and np.all(runs[:, 1] - runs[:, 0] == width)
        part = (np.arange(n_chunks) * length) // n_chunks
        off = runs[:, 0] - part
        assert np.all((off >= 0) & (off < length // n_chunks - width))
        offsets.append(off)
    return np.array(offsets)


def test_mask_chunks_facts_and_upstream_distribution():
    n_rows, length = 3000, 778
    tokens = jnp.ones((n_rows, length, 22))
    ours = chunk_offsets(np.asarray(sf.mask_chunks(jax.random.PRNGKey(0), tokens)))
    torch.manual_seed(0)
    ref = chunk_offsets(np.stack([upstream_mask_seq(torch.ones(length, 22)).numpy()
                                  for _ in range(n_rows)]))
    bins = length // 6 - 50  # 79 possible offsets
    for i in range(6):
        table = np.stack([np.bincount(ours[:, i], minlength=bins), np.bincount(ref[:, i], minlength=bins)])
        assert scipy.stats.chi2_contingency(table).pvalue > 1e-3
        assert scipy.stats.chisquare(table[0]).pvalue > 1e-3  # uniform over the 79 offsets
    # Parts and rows draw independently: offsets of neighbouring parts are uncorrelated.
    assert abs(np.corrcoef(ours[:, 0], ours[:, 1])[0, 1]) < 0.1


def test_mask_chunks_pure_and_too_short():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 778, 22))
    a = sf.mask_chunks(jax.random.PRNGKey(7), x)
    np.testing.assert_array_equal(a, sf.mask_chunks(jax.random.PRNGKey(7), x))
    kept = np.asarray(a) != 0
    np.testing.assert_array_equal(np.asarray(a)[kept], np.asarray(x)[kept])  # the rest untouched
    with pytest.raises(ValueError, match="too short"):
        sf.mask_chunks(jax.random.PRNGKey(0), x[:, :549])


# --- the converter's strictness ---------------------------------------------------------------

@pytest.fixture(scope="module")
def test_sd():
    return state_dict(torch_model("test"))


def _one_line_error(sd, hp=None, num_heads=None) -> str:
    with pytest.raises(ConversionError) as e:
        converter.convert_state_dict(sd, "", "specformer.ckpt", hp, num_heads)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_mapping_strictness(test_sd):
    config, flat = converter.convert_state_dict(test_sd, "", "specformer.ckpt", num_heads=2)
    assert set(flat) == set(converter.expected_shapes(config))
    # No head count in the file: the default (6), which cannot split a width of 32.
    assert "num_heads = 6" in _one_line_error(test_sd)

    missing = {k: v for k, v in test_sd.items() if k != "blocks.1.mlp.encoder.bias"}
    assert "'blocks.1.mlp.encoder.bias'" in _one_line_error(missing, num_heads=2)
    extra = dict(test_sd, **{"blocks.0.attention.extra": np.zeros(3, np.float32)})
    assert "'blocks.0.attention.extra'" in _one_line_error(extra, num_heads=2)
    wrong = dict(test_sd, **{"blocks.1.attention.projection.weight": np.zeros((32, 31), np.float32)})
    assert "'blocks.1.attention.projection.weight'" in _one_line_error(wrong, num_heads=2)
    assert "num_heads = 5" in _one_line_error(test_sd, num_heads=5)
    assert "hyper_parameters['embed_dim'] = 64" in _one_line_error(test_sd, hp={"embed_dim": 64})
    no_blocks = {k: v for k, v in test_sd.items() if not k.startswith("blocks.")}
    assert "'blocks.<i>.*'" in _one_line_error(no_blocks, num_heads=2)
    nan = dict(test_sd, **{"head.bias": np.full(22, np.nan, np.float32)})
    assert "'head.bias'" in _one_line_error(nan, num_heads=2)


def test_config_from_file_and_hyper_parameters(test_sd):
    prefixed = {"spectrum_encoder.backbone." + k: v for k, v in test_sd.items()}
    prefixed["image_encoder.other"] = np.zeros(1, np.float32)  # not below the prefix: not looked at
    config, _ = converter.convert_state_dict(prefixed, "spectrum_encoder.backbone.", "astroclip.ckpt",
                                             {"num_heads": 2, "slice_overlap": 10})
    assert config == dict(sf.SIZES["test"], slice_section_length=20, slice_overlap=10, dropout=0.0)


def test_cli_converts_a_lightning_checkpoint(tmp_path):
    pytest.importorskip("converters.safe_pickle", reason="the safe loader lands with engineer convert")
    model = torch_model("test", seed=3)
    src = tmp_path / "specformer.ckpt"
    hp = dict(sf.SIZES["test"], dropout=0.0, mask_num_chunks=6, mask_chunk_width=50,
              slice_section_length=20, slice_overlap=10, norm_first=False)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hp, "epoch": 3,
                "pytorch-lightning_version": "2.2.0"}, src)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, "-m", "converters.specformer", str(src), str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    module, variables, weights = towers.load_tower_module(out)
    assert weights.kind == "specformer" and weights.source["num_heads_from"] == "hyper_parameters"
    flux = spectra(2)
    with torch.no_grad():
        ref = model(torch.from_numpy(flux))["embedding"]
    assert max_rel(jax.jit(module.apply)(variables, flux), ref) < RTOL
    again = subprocess.run([sys.executable, "-m", "converters.specformer", str(src), str(out)],
                           cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode != 0 and again.stderr.strip().startswith("error:")
    assert len(again.stderr.strip().splitlines()) == 1
    shutil.rmtree(out)

    # No head count in the file: the default 6 cannot split 32 and says so; --num-heads can.
    del hp["num_heads"]
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hp}, src)
    bare = subprocess.run([sys.executable, "-m", "converters.specformer", str(src), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert bare.returncode != 0 and "--num-heads" in bare.stderr and not out.exists()
    assert len(bare.stderr.strip().splitlines()) == 1
    given = subprocess.run([sys.executable, "-m", "converters.specformer", str(src), str(out),
                            "--num-heads", "2"], cwd=REPO, env=env, capture_output=True, text=True)
    assert given.returncode == 0, given.stderr
    module, variables, weights = towers.load_tower_module(out)
    assert weights.config["num_heads"] == 2 and weights.source["num_heads_from"] == "argument"
    assert max_rel(jax.jit(module.apply)(variables, flux), ref) < RTOL


def test_dropout_only_in_training():
    # Upstream trains with dropout (0.1 in its defaults; the released model used 0): at inference
    # a model with dropout is the same function as one without; in training each key differs.
    flux = spectra(2, 301)
    base = sf.SpecFormer(**sf.SIZES["test"])
    noisy = sf.SpecFormer(**sf.SIZES["test"], dropout=0.3)
    variables = jax.jit(base.init)(jax.random.PRNGKey(0), flux)
    np.testing.assert_array_equal(jax.jit(noisy.apply)(variables, flux), jax.jit(base.apply)(variables, flux))
    train = jax.jit(lambda k: noisy.apply(variables, flux, train=True, rngs={"dropout": k}))
    a, b = train(jax.random.PRNGKey(1)), train(jax.random.PRNGKey(2))
    assert np.isfinite(a).all() and not np.allclose(a, b)
