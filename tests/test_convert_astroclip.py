"""`python -m converters.astroclip`: PolymathicAI's released checkpoints -> tower directories.

Source files are written in exactly upstream's formats by tests/upstream_checkpoints.py (random,
non-trivial weights; upstream-named classes pickled in the hyper-parameters). References are
independent of our code: timm's VisionTransformer built with DINOv2's options for AstroDINO's
token path, torch.nn.MultiheadAttention + LayerNorm + GELU MLP for the heads, and a float64
NumPy tokenisation followed by torch.nn.MultiheadAttention blocks (float64) for SpecFormer.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from astroclip_jax import errors
from converters import astroclip as conv
from converters import safe_pickle
from converters.common import ConversionError
from upstream_checkpoints import SIZES, write_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """The three upstream-format files at the test size."""
    return write_checkpoints(str(tmp_path_factory.mktemp("upstream")), "test", seed=3)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "converters.astroclip", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO, **(env or {})})


def _hub_cache(root, repo_id: str, files: dict[str, str]) -> str:
    """A huggingface_hub cache laid out as the library lays it out, holding `files`."""
    folder = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(COMMIT)
    for name, src in files.items():
        dest = os.path.join(folder, "snapshots", COMMIT, name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.symlink(src, dest)  # the hub links snapshots to blobs; a link is what it reads
    return root


# ------------------------------------------------------------ without the tower mappings

def test_kind_detected_from_structure(upstream):
    for name, kind in (("astroclip.ckpt", "astroclip"), ("astrodino.ckpt", "astrodino"),
                       ("specformer.ckpt", "specformer")):
        obj, _ = safe_pickle.load_checkpoint(upstream[name])
        assert conv.detect_kind(obj, name) == kind
    with pytest.raises(ConversionError, match="not an AstroCLIP checkpoint") as err:
        conv.detect_kind({"state_dict": {"encoder_q.conv1.weight": np.zeros(1)}}, "moco.ckpt")
    assert "\n" not in str(err.value) and "moco.ckpt" in str(err.value)


def test_head_counts_read_from_pickled_hyper_parameters(upstream):
    # No weight shape carries a head count: they come from the inert upstream modules.
    sizes = SIZES["test"]
    obj, _ = safe_pickle.load_checkpoint(upstream["astroclip.ckpt"])
    over = conv.hparam_overrides(obj, "astroclip")
    assert over["image"]["num_heads"] == sizes["vit_heads"]
    assert over["spectrum"]["num_heads"] == sizes["spec_heads"]
    assert over["spectrum"]["slice_section_length"] == 20 and over["spectrum"]["slice_overlap"] == 10
    assert over["image_head"]["num_heads"] == over["spectrum_head"]["num_heads"] == sizes["n_head"]
    obj, _ = safe_pickle.load_checkpoint(upstream["specformer.ckpt"])
    assert conv.hparam_overrides(obj, "specformer")["spectrum"]["num_heads"] == sizes["spec_heads"]


def test_hub_source_offline_from_a_prefilled_cache(tmp_path, upstream):
    cache = _hub_cache(str(tmp_path / "hub"), "polymathic-ai/specformer",
                       {"specformer.ckpt": upstream["specformer.ckpt"]})
    code = ("from converters import common; p = common.fetch('hf://polymathic-ai/specformer/"
            "specformer.ckpt'); print(p); print(common.hub_revision(p))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO, "HF_HUB_CACHE": cache,
                              "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    path, revision = out.stdout.split()
    assert os.path.samefile(path, upstream["specformer.ckpt"]) and revision == COMMIT


def test_hub_file_missing_offline_is_one_line(tmp_path, upstream):
    cache = _hub_cache(str(tmp_path / "hub"), "polymathic-ai/astroclip", {})
    out = _cli(f"hf://polymathic-ai/astroclip/astroclip.ckpt@{COMMIT}", tmp_path / "out",
               env={"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1 and not (tmp_path / "out").exists()
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hf://polymathic-ai/astroclip/astroclip.ckpt")
    assert "not found in the local huggingface_hub cache" in lines[0]


def test_harmful_checkpoint_refused_by_the_cli(tmp_path):
    marker = tmp_path / "MARKER"
    src = tmp_path / "astroclip.ckpt"
    with open(src, "wb") as f:  # a zip whose pickle would run `touch MARKER`
        import zipfile

        with zipfile.ZipFile(f, "w") as zf:
            zf.writestr("archive/data.pkl", f"cposix\nsystem\n(Vtouch {marker}\ntR.".encode())
    out = _cli(src, tmp_path / "out")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "'posix.system'" in lines[0], out.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_unknown_state_dict_key_writes_nothing(tmp_path, upstream):
    obj, _ = safe_pickle.load_checkpoint(upstream["astroclip.ckpt"])
    obj["state_dict"]["logit_scale_extra"] = np.zeros(1, np.float32)
    src = tmp_path / "astroclip.ckpt"
    torch.save({"epoch": 1, "state_dict": {k: torch.from_numpy(np.array(v))
                                           for k, v in obj["state_dict"].items()}}, src)
    with pytest.raises(ConversionError, match="logit_scale_extra") as err:
        conv.convert(str(src), str(tmp_path / "out"))
    assert isinstance(err.value, errors.UserError) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------ end to end (needs both mappings)

def _needs_mappings():
    for module in ("astroclip_jax.models.vit", "astroclip_jax.models.specformer",
                   "converters.dinov2", "converters.specformer"):
        pytest.importorskip(module, reason=f"{module} (engineers vit / spec) not merged here")


def _backbone(state, prefix):
    """DINOv2's backbone keys as timm names them: chunk index dropped, no mask_token."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix) and key != prefix + "mask_token":
            name = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key[len(prefix):])
            out[name] = torch.from_numpy(np.array(value))
    return out


def _timm_tokens(state, prefix, sizes, images):
    """AstroCLIP's image path, norm(blocks(patch_embed(x))), on timm's DINOv2-style ViT."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=sizes["img_size"], patch_size=sizes["patch_size"],
                            embed_dim=sizes["vit_dim"], depth=sizes["vit_depth"],
                            num_heads=sizes["vit_heads"], mlp_ratio=sizes["vit_mlp"] / sizes["vit_dim"],
                            qkv_bias=True, init_values=1.0, num_classes=0,
                            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                            act_layer=torch.nn.GELU)
    vit.load_state_dict(_backbone(state, prefix), strict=True)
    vit.eval()
    with torch.no_grad():
        x = vit.patch_embed(torch.from_numpy(images))
        for block in vit.blocks:
            x = block(x)
        return vit.norm(x)


def _torch_head(state, prefix, sizes, tokens, residual):
    """Upstream's head with torch.nn.MultiheadAttention: query attends over the tokens,
    LayerNorm, GELU MLP; spectrum side adds the residual."""
    e, kv = sizes["embed_dim"], tokens.shape[-1]
    dtype = tokens.dtype
    mha = torch.nn.MultiheadAttention(e, sizes["n_head"], batch_first=True, kdim=kv, vdim=kv).to(dtype)
    ln = torch.nn.LayerNorm(e).to(dtype)
    enc, dec = torch.nn.Linear(e, 4 * e).to(dtype), torch.nn.Linear(4 * e, e).to(dtype)
    t = lambda k: torch.from_numpy(np.array(state[prefix + k])).to(dtype)  # noqa: E731
    mha.load_state_dict({k[len("cross_attention.multihead_attn."):]: t(k) for k in (
        k[len(prefix):] for k in state if k.startswith(prefix + "cross_attention.multihead_attn."))})
    ln.load_state_dict({"weight": t("cross_attention.layernorm.weight"),
                        "bias": t("cross_attention.layernorm.bias")})
    enc.load_state_dict({"weight": t("mlp.encoder.weight"), "bias": t("mlp.encoder.bias")})
    dec.load_state_dict({"weight": t("mlp.decoder.weight"), "bias": t("mlp.decoder.bias")})
    with torch.no_grad():
        query = t("cross_attention.query").repeat(tokens.shape[0], 1, 1)
        x = ln(mha(query, tokens, tokens, need_weights=False)[0])
        mlp = dec(torch.nn.functional.gelu(enc(x)))
        return (x + mlp if residual else mlp)[:, 0].numpy()


def _numpy_tokens(flux):
    """SpecFormer's tokenisation in float64: z-score (unbiased std clipped at 0.2), windows of
    20 every 10 (a short last one dropped), two leading zeros, then the statistics token."""
    flux = np.asarray(flux, np.float64)
    mean = flux.mean(1, keepdims=True)
    std = np.maximum(flux.std(1, ddof=1, keepdims=True), 0.2)
    x = (flux - mean) / std
    starts = [s for s in range(0, x.shape[1] - 10, 10) if s + 20 <= x.shape[1]]
    tokens = np.zeros((x.shape[0], len(starts) + 1, 22))
    for i, s in enumerate(starts):
        tokens[:, i + 1, 2:] = x[:, s:s + 20]
    tokens[:, 0, 0], tokens[:, 0, 1] = (mean[:, 0] - 2) / 2, (std[:, 0] - 2) / 8
    return tokens


def _torch_specformer(state, prefix, sizes, flux):
    """SpecFormer's embedding (final_layernorm'ed) in float64 with torch.nn.MultiheadAttention."""
    t = lambda k: torch.from_numpy(np.array(state[prefix + k])).double()  # noqa: E731
    x = torch.from_numpy(_numpy_tokens(flux))
    x = x @ t("data_embed.weight").T + t("data_embed.bias") + t("position_embed.weight")[:x.shape[1]]
    d = sizes["spec_dim"]
    ln = lambda y, k: torch.nn.functional.layer_norm(y, (d,), t(k + ".weight"), t(k + ".bias"), 1e-5)  # noqa: E731
    for i in range(sizes["spec_layers"]):
        b = f"blocks.{i}."
        mha = torch.nn.MultiheadAttention(d, sizes["spec_heads"], batch_first=True).double()
        mha.load_state_dict({"in_proj_weight": t(b + "attention.attention.weight"),
                             "in_proj_bias": t(b + "attention.attention.bias"),
                             "out_proj.weight": t(b + "attention.projection.weight"),
                             "out_proj.bias": t(b + "attention.projection.bias")})
        with torch.no_grad():
            h = ln(x, b + "layernorm1")
            x = x + mha(h, h, h, need_weights=False)[0]
            h = ln(x, b + "layernorm2")
            h = torch.nn.functional.gelu(h @ t(b + "mlp.encoder.weight").T + t(b + "mlp.encoder.bias"))
            x = x + h @ t(b + "mlp.decoder.weight").T + t(b + "mlp.decoder.bias")
    return ln(x, "final_layernorm")


def _ours(out_dir, images_nchw, flux):
    import jax
    import jax.numpy as jnp

    from astroclip_jax.models import tower_weights, towers
    from astroclip_jax.models.heads import CrossAttentionHead

    vit, vit_vars, _ = towers.load_tower_module(os.path.join(out_dir, "image_tower"), "dinov2_vit")
    spec, spec_vars, _ = towers.load_tower_module(os.path.join(out_dir, "spectrum_tower"), "specformer")
    heads = tower_weights.load_tower(os.path.join(out_dir, "heads"), "astroclip_heads")
    params = heads.variables["params"]
    image_head = CrossAttentionHead(**heads.config["image_head"])
    spectrum_head = CrossAttentionHead(**heads.config["spectrum_head"])

    @jax.jit  # one compiled program per modality: eager dispatch is slower than compiling
    def embed(images, spectra):
        image = image_head.apply({"params": params["image_head"]}, vit.apply(vit_vars, images))
        spectrum = spectrum_head.apply({"params": params["spectrum_head"]},
                                       spec.apply(spec_vars, spectra))
        return image, spectrum

    image, spectrum = embed(jnp.asarray(images_nchw.transpose(0, 2, 3, 1)), jnp.asarray(flux))
    return np.asarray(image).reshape(len(flux), -1), np.asarray(spectrum).reshape(len(flux), -1)


def _inputs(sizes, n=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(0.3, 0.5, (n, 3, sizes["img_size"], sizes["img_size"])).astype(np.float32)
    flux = (5 + 3 * rng.normal(size=(n, sizes["spectrum_length"]))).astype(np.float32)
    flux[1] = 2.0 + 0.01 * rng.normal(size=sizes["spectrum_length"])  # std below the 0.2 clip
    return images, flux


def _close(ours, ref, what):
    ref = np.asarray(ref, np.float64)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-4, f"{what}: relative error {err:.2e}"


def _check_end_to_end(tmp_path, paths, size):
    sizes = SIZES[size]
    cache = _hub_cache(str(tmp_path / "hub"), "polymathic-ai/astroclip",
                       {"astroclip.ckpt": paths["astroclip.ckpt"]})
    out_dir = tmp_path / "converted"
    run = _cli("hf://polymathic-ai/astroclip/astroclip.ckpt", out_dir,
               env={"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    for folder, kind in (("image_tower", "dinov2_vit"), ("spectrum_tower", "specformer"),
                         ("heads", "astroclip_heads")):
        with open(out_dir / folder / "tower.json") as f:
            meta = json.load(f)
        assert meta["kind"] == kind and meta["source"]["file"] == "astroclip.ckpt"
        assert meta["source"]["hub_revision"] == COMMIT
    with np.load(paths["astroclip.ckpt"] + ".reference.npz") as npz:
        state = {k: npz[k] for k in npz.files}
    images, flux = _inputs(sizes)
    image, spectrum = _ours(str(out_dir), images, flux)
    tokens = _timm_tokens(state, "image_encoder.backbone.", sizes, images)
    _close(image, _torch_head(state, "image_encoder.", sizes, tokens, residual=False), "image")
    spec_tokens = _torch_specformer(state, "spectrum_encoder.backbone.", sizes, flux)
    _close(spectrum, _torch_head(state, "spectrum_encoder.", sizes, spec_tokens, residual=True),
           "spectrum")
    # A batch of one galaxy works and equals its row of the batch of eight.
    one_image, one_spectrum = _ours(str(out_dir), images[3:4], flux[3:4])
    _close(one_image[0], image[3], "image, batch of one")
    _close(one_spectrum[0], spectrum[3], "spectrum, batch of one")
    return out_dir


def test_astroclip_end_to_end_test_size(tmp_path, upstream):
    _needs_mappings()
    _check_end_to_end(tmp_path, upstream, "test")


def test_astroclip_end_to_end_full_size(tmp_path):
    """The one full-size check of the released model: ViT-L/12 at 144 px, SpecFormer 768 x 6,
    1024-d heads (a 1.2 GB checkpoint; about 2 minutes on 2 cores)."""
    _needs_mappings()
    paths = write_checkpoints(str(tmp_path / "upstream"), "full", seed=4, names=("astroclip.ckpt",))
    _check_end_to_end(tmp_path, paths, "full")


def test_astrodino_and_specformer_files_convert(tmp_path, upstream):
    _needs_mappings()
    for name, folder, kind in (("astrodino.ckpt", "image_tower", "dinov2_vit"),
                               ("specformer.ckpt", "spectrum_tower", "specformer")):
        out = tmp_path / name
        conv.convert(upstream[name], str(out))
        assert sorted(os.listdir(out)) == ["astroclip.json", folder]
        with open(out / folder / "tower.json") as f:
            meta = json.load(f)
        assert meta["kind"] == kind and meta["source"]["checkpoint_kind"] == name.split(".")[0]
    with np.load(upstream["specformer.ckpt"] + ".reference.npz") as npz:
        state = {k: npz[k] for k in npz.files}
    sizes = SIZES["test"]
    _, flux = _inputs(sizes)
    from astroclip_jax.models import towers

    spec, variables, _ = towers.load_tower_module(tmp_path / "specformer.ckpt" / "spectrum_tower")
    _close(np.asarray(spec.apply(variables, flux)), _torch_specformer(state, "", sizes, flux),
           "specformer.ckpt tokens")


def test_wrong_head_shape_writes_nothing(tmp_path, upstream):
    _needs_mappings()
    obj, _ = safe_pickle.load_checkpoint(upstream["astroclip.ckpt"])
    state = dict(obj["state_dict"])
    key = "spectrum_encoder.mlp.decoder.weight"
    state[key] = state[key][:, :-1]
    src = tmp_path / "astroclip.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                "epoch": 1}, src)
    out = _cli(src, tmp_path / "out")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and key in lines[0], out.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def converted_grid(tmp_path_factory):
    """astroclip.ckpt in upstream's format at test widths on the DESI grid, converted."""
    _needs_mappings()
    tmp = tmp_path_factory.mktemp("grid")
    paths = write_checkpoints(str(tmp / "upstream"), "grid", seed=5, names=("astroclip.ckpt",))
    out_dir = tmp / "converted"
    run = _cli(paths["astroclip.ckpt"], out_dir)
    assert run.returncode == 0, run.stderr
    return paths["astroclip.ckpt"], out_dir


def _grid_overrides(out_dir):
    """configs/astroclip.py:smoke pointed at the converted files, heads of their shape."""
    sizes = SIZES["grid"]
    hidden = f"({4 * sizes['embed_dim']},)"
    return {"model.image_tower.weights": str(out_dir / "image_tower"),
            "model.spectrum_tower.weights": str(out_dir / "spectrum_tower"),
            "model.heads_weights": str(out_dir / "heads"),
            "model.image_head.hidden": hidden, "model.spectrum_head.hidden": hidden,
            "model.image_head.out": sizes["embed_dim"], "model.spectrum_head.out":
                sizes["embed_dim"], "model.image_head.num_heads": sizes["n_head"],
            "model.spectrum_head.num_heads": sizes["n_head"]}


def _grid_settings(out_dir):
    import ast

    from astroclip_jax import settings as settings_lib
    from configs import astroclip as astroclip_config

    config = astroclip_config.get_config("smoke")
    for field, value in _grid_overrides(out_dir).items():
        section, *rest = field.split(".")
        target = config[section]
        for part in rest[:-1]:
            target = target[part]
        target[rest[-1]] = ast.literal_eval(value) if isinstance(value, str) and \
            value.startswith("(") else value
    return settings_lib.resolve(config, "train")


def test_converted_files_run_through_the_config(converted_grid):
    """What a user runs: the converted directories named in configs/astroclip.py, the model
    built from the settings (`models.astroclip.build`), against the torch references."""
    import jax

    from astroclip_jax.models import astroclip as astroclip_model

    checkpoint, out_dir = converted_grid
    sizes = SIZES["grid"]
    settings = _grid_settings(out_dir)
    model, params = astroclip_model.build(settings.model, jax.random.PRNGKey(0))
    images, flux = _inputs(sizes, n=4)
    image, spectrum = map(np.asarray, jax.jit(model.embed)(
        params, images.transpose(0, 2, 3, 1), flux))
    with np.load(checkpoint + ".reference.npz") as npz:
        state = {k: npz[k] for k in npz.files}
    tokens = _timm_tokens(state, "image_encoder.backbone.", sizes, images)
    spec_tokens = _torch_specformer(state, "spectrum_encoder.backbone.", sizes, flux)
    for ours, ref, what in (
            (image, _torch_head(state, "image_encoder.", sizes, tokens, residual=False), "image"),
            (spectrum, _torch_head(state, "spectrum_encoder.", sizes, spec_tokens, residual=True),
             "spectrum")):
        ref = np.asarray(ref, np.float64)
        _close(ours, ref / np.linalg.norm(ref, axis=1, keepdims=True), what)  # the model's L2


def test_the_released_model_is_evaluated_and_exported_as_published(converted_grid, tmp_path):
    """`eval.checkpoint=initial`: eval_knn and export of the converted model with no training
    and no checkpoint; the exported folder's Embedder equals the model built from the config."""
    import jax

    import cli_runs
    from astroclip_jax.evaluation import restore
    from astroclip_jax.models import astroclip as astroclip_model

    _, out_dir = converted_grid
    flags = [f"--config.{k}={v}" for k, v in _grid_overrides(out_dir).items()]
    flags.append("--config.eval.checkpoint=initial")
    workdir = str(tmp_path / "released")
    for mode in ("eval_knn", "export"):
        cli_runs.run(mode, workdir, *flags, config_file="configs/astroclip.py")
    with open(os.path.join(workdir, "eval_knn", "results.json")) as f:
        results = json.load(f)
    assert results["checkpoint"] == {"step": 0, "directory": "initial"}
    assert all(np.isfinite(v) for per_target in results["r2"].values()
               for v in per_target.values())
    embedder = restore.load_embedder(os.path.join(workdir, "export"))
    model, params = astroclip_model.build(_grid_settings(out_dir).model, jax.random.PRNGKey(0))
    sizes = SIZES["grid"]
    rng = np.random.default_rng(2)
    flux = (5 + rng.normal(size=(3, sizes["spectrum_length"]))).astype(np.float32)
    np.testing.assert_allclose(embedder.embed_spectra(flux),
                               np.asarray(model.embed_spectra(params, flux)), rtol=1e-5,
                               atol=1e-6)


def test_out_dir_is_never_a_users_folder(tmp_path, upstream):
    """--overwrite replaces an earlier conversion, never a folder it did not write."""
    _needs_mappings()
    out = tmp_path / "weights"
    conv.convert(upstream["specformer.ckpt"], str(out))
    conv.convert(upstream["specformer.ckpt"], str(out), overwrite=True)  # its own: replaced
    assert sorted(os.listdir(out)) == ["astroclip.json", "spectrum_tower"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    run = _cli(upstream["specformer.ckpt"], mine, "--overwrite")
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1 and "OUTPUT_DIR" in lines[0], run.stderr
    assert sorted(os.listdir(mine)) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"
