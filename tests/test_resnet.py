"""The Flax image tower against torchvision, through the converter.

Reference: torchvision's own ResNet code (resnet50 with the MoCo v2 head, and a narrow
[1, 1, 1, 1] model built by torchvision's `_make_layer`) with random weights and realistic
BatchNorm statistics; the JAX side only ever sees the converted files.
"""

from __future__ import annotations

import argparse
import fractions
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from astroclip_jax.models import resnet, towers
from converters import common, resnet50 as conv_resnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float32 rounding alone: at full size, features (max ~6) of torch float32 and of JAX are each
# ~7.5e-5 from a float64 torch run, so 1e-4 is tight but honest; an actual layout bug gives >1e-2.
TOL = 1e-4


# ---------------------------------------------------------------- torch reference models


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial BatchNorm affine params and statistics, at the magnitudes of a trained net.

    Affine params are drawn first; one train-mode pass (momentum 1) then sets the running
    statistics to those of the activations they normalise, so features stay O(1) as in a trained
    ResNet (running stats of 0/1 make 16 residual blocks blow activations up to O(1000), where
    float32 rounding alone exceeds 1e-4). The last BN of each residual branch gets a small scale,
    as trained ResNets have. The statistics are then perturbed so they are not batch statistics.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                low, high = (0.1, 0.4) if name.endswith(("bn3", "downsample.1")) else (0.5, 1.5)
                m.weight.copy_(low + (high - low) * torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.momentum = 1.0  # running stats := the statistics of the calibration batch
        model.train()
        model(torch.randn(8, 3, 64, 64, generator=gen))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.add_(0.05 * m.running_var.sqrt() * torch.randn(n, generator=gen))
                m.running_var.mul_(0.8 + 0.4 * torch.rand(n, generator=gen))
    return model.eval()


def _moco_resnet50(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet50(num_classes=128)
    model.fc = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 128))
    return _randomise(model, seed)


def _narrow_resnet(width: int, head: tuple[int, int] | None, seed: int = 1) -> torch.nn.Module:
    """torchvision ResNet(Bottleneck, [1, 1, 1, 1]) rebuilt at `width` with torchvision's own
    `_make_layer` (its constructor fixes the width at 64)."""
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(seed)
    model = ResNet(Bottleneck, [1, 1, 1, 1])
    model.inplanes = width
    model.conv1 = torch.nn.Conv2d(3, width, 7, 2, 3, bias=False)
    model.bn1 = torch.nn.BatchNorm2d(width)
    model.layer1 = model._make_layer(Bottleneck, width, 1)
    model.layer2 = model._make_layer(Bottleneck, 2 * width, 1, stride=2)
    model.layer3 = model._make_layer(Bottleneck, 4 * width, 1, stride=2)
    model.layer4 = model._make_layer(Bottleneck, 8 * width, 1, stride=2)
    model.fc = (torch.nn.Identity() if head is None else torch.nn.Sequential(
        torch.nn.Linear(32 * width, head[0]), torch.nn.ReLU(), torch.nn.Linear(head[0], head[1])))
    return _randomise(model, seed)


def _torch_outputs(model: torch.nn.Module, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """features (after avgpool + flatten) and head output of a torchvision ResNet."""
    captured = {}
    hook = model.avgpool.register_forward_hook(lambda m, i, o: captured.update(features=o.flatten(1)))
    with torch.no_grad():
        head = model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous())
    hook.remove()
    return {"features": captured["features"].numpy(), "head": head.numpy()}


def _lightning_ckpt(model: torch.nn.Module, hyper_parameters) -> dict:
    """The layout of an ssl-legacysurvey MoCo v2 Lightning checkpoint."""
    q = {f"encoder_q.{k}": v for k, v in model.state_dict().items()}
    k = {f"encoder_k.{k}": v.clone() for k, v in model.state_dict().items()}
    state = {**q, **k, "queue": torch.randn(128, 256), "queue_ptr": torch.zeros(1, dtype=torch.long),
             "val_queue": torch.randn(128, 256), "val_queue_ptr": torch.zeros(1, dtype=torch.long)}
    return {"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.5.10",
            "state_dict": state, "hyper_parameters": hyper_parameters,
            "optimizer_states": [], "lr_schedulers": []}


def _images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _jax_outputs(tower_dir: str, images: np.ndarray) -> dict[str, np.ndarray]:
    module, variables, _ = towers.load_tower_module(tower_dir, kind="resnet")
    with jax.default_matmul_precision("float32"):
        out = jax.jit(module.apply)(variables, jnp.asarray(images))
    return {k: np.asarray(v) for k, v in out.items()}


def _assert_close(jax_out, torch_out, keys):
    for key in keys:
        assert jax_out[key].shape == torch_out[key].shape, key
        err = float(np.max(np.abs(jax_out[key] - torch_out[key])))
        scale = float(np.max(np.abs(torch_out[key])))
        assert scale > 1e-2, f"{key}: reference output is trivially small ({scale})"
        assert err <= TOL, f"{key}: max abs diff {err:.2e} > {TOL} (max |ref| {scale:.2f})"
        print(f"{key}: max abs diff {err:.2e}, max |ref| {scale:.2f}")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def full_model():
    return _moco_resnet50()


@pytest.fixture(scope="module")
def full_tower(full_model, tmp_path_factory):
    """resnet50 + MoCo head in the Lightning layout, converted with the CLI in a subprocess."""
    tmp = tmp_path_factory.mktemp("full")
    ckpt = tmp / "moco_v2.ckpt"
    # Real hyper-parameters hold argparse.Namespace and NumPy scalars: the weights-only allowlist.
    hparams = {"args": argparse.Namespace(lr=0.03, arch="resnet50"), "lr": np.float64(0.03), "bs": 256}
    torch.save(_lightning_ckpt(full_model, hparams), ckpt)
    out = tmp / "tower"
    proc = subprocess.run([sys.executable, "-m", "converters.resnet50", str(ckpt), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return str(out)


@pytest.fixture(scope="module")
def narrow_model():
    return _narrow_resnet(width=8, head=(64, 32))


@pytest.fixture(scope="module")
def narrow_ckpt(narrow_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("narrow") / "narrow_state_dict.pt"
    torch.save(narrow_model.state_dict(), path)
    return path


# ---------------------------------------------------------------- numerical equality


@pytest.mark.parametrize("size", [96, 152])
def test_full_resnet50_matches_torchvision(full_model, full_tower, size):
    images = _images(2, size, seed=size)
    _assert_close(_jax_outputs(full_tower, images), _torch_outputs(full_model, images), ["features", "head"])


def test_full_tower_metadata(full_tower):
    _, _, weights = towers.load_tower_module(full_tower)
    assert weights.config == {"stage_sizes": [3, 4, 6, 3], "width": 64, "head_hidden": 2048, "head_out": 128}
    assert weights.config == {**resnet.SIZES["resnet50"], "stage_sizes": [3, 4, 6, 3]}
    assert weights.source["format"] == "lightning-moco"
    assert weights.source["file"] == "moco_v2.ckpt" and len(weights.source["sha256"]) == 64


def test_narrow_state_dict_matches_torchvision(narrow_model, narrow_ckpt, tmp_path):
    out = conv_resnet.convert(str(narrow_ckpt), str(tmp_path / "tower"))
    _, _, weights = towers.load_tower_module(out)
    assert weights.config == {"stage_sizes": [1, 1, 1, 1], "width": 8, "head_hidden": 64, "head_out": 32}
    assert weights.config == {**resnet.SIZES["test"], "stage_sizes": [1, 1, 1, 1]}
    images = _images(2, 40, seed=0)
    _assert_close(_jax_outputs(out, images), _torch_outputs(narrow_model, images), ["features", "head"])


def test_backbone_only_and_linear_classifier(tmp_path):
    """No fc.* converts without a head; a 1000-class `fc` is refused unless no_head=True."""
    model = _narrow_resnet(width=8, head=None, seed=2)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    out = conv_resnet.convert(str(plain), str(tmp_path / "backbone"))
    images = _images(2, 32, seed=1)
    jax_out = _jax_outputs(out, images)
    assert set(jax_out) == {"features"}
    _assert_close(jax_out, _torch_outputs(model, images), ["features"])

    state = dict(model.state_dict(), **{"fc.weight": torch.randn(1000, 256), "fc.bias": torch.randn(1000)})
    classifier = tmp_path / "classifier.pt"
    torch.save(state, classifier)
    with pytest.raises(common.ConversionError, match=r"'fc.weight' \(1000, 256\).*--no-head"):
        conv_resnet.convert(str(classifier), str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    conv_resnet.convert(str(classifier), str(tmp_path / "dropped"), no_head=True)
    assert "head" not in _jax_outputs(str(tmp_path / "dropped"), images)


# ---------------------------------------------------------------- rejections


def _refused(tmp_path, state_or_bytes, match, **kwargs):
    src = tmp_path / "bad.ckpt"
    if isinstance(state_or_bytes, bytes):
        src.write_bytes(state_or_bytes)
    else:
        torch.save(state_or_bytes, src)
    out = tmp_path / "out"
    with pytest.raises(common.ConversionError, match=match):
        conv_resnet.convert(str(src), str(out), **kwargs)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_rejects_random_bytes(tmp_path):
    _refused(tmp_path, np.random.default_rng(0).bytes(4096), r"bad\.ckpt: not a readable PyTorch checkpoint")


def test_rejects_missing_key(tmp_path, narrow_model):
    state = narrow_model.state_dict()
    del state["layer2.0.bn1.running_var"]
    _refused(tmp_path, state, r"bad\.ckpt: missing key\(s\) \['layer2\.0\.bn1\.running_var'\]")


def test_rejects_extra_key(tmp_path, narrow_model):
    state = dict(narrow_model.state_dict(), **{"layer1.0.conv4.weight": torch.zeros(3)})
    _refused(tmp_path, state, r"bad\.ckpt: unexpected key\(s\) \['layer1\.0\.conv4\.weight'\]")
    ckpt = _lightning_ckpt(narrow_model, {})
    ckpt["state_dict"]["encoder_r.conv1.weight"] = torch.zeros(1)
    _refused(tmp_path, ckpt, r"unexpected key\(s\) \['encoder_r\.conv1\.weight'\]")


def test_rejects_shape_mismatch(tmp_path, narrow_model):
    state = narrow_model.state_dict()
    state["layer3.0.conv2.weight"] = torch.zeros(32, 32, 5, 5)
    _refused(tmp_path, state, r"'layer3\.0\.conv2\.weight' has shape \(32, 32, 5, 5\), which gives "
                              r"\(5, 5, 32, 32\) for 'params/layer3_0/conv2/kernel'; expected \(3, 3, 32, 32\)")


def test_untrusted_pickle_refused_unless_trusted(tmp_path, narrow_model):
    ckpt = _lightning_ckpt(narrow_model, {"ratio": fractions.Fraction(1, 3)})
    _refused(tmp_path, ckpt, r"refuses: \['fractions\.Fraction'\].*--trust-checkpoint")
    out = conv_resnet.convert(str(tmp_path / "bad.ckpt"), str(tmp_path / "trusted"), trust_checkpoint=True)
    assert towers.load_tower_module(out)[2].source["format"] == "lightning-moco"


def test_existing_output_needs_overwrite(tmp_path, narrow_ckpt, capsys):
    out = tmp_path / "tower"
    conv_resnet.main([str(narrow_ckpt), str(out)])
    with pytest.raises(SystemExit, match="already exists; pass --overwrite"):
        conv_resnet.main([str(narrow_ckpt), str(out)])
    conv_resnet.main([str(narrow_ckpt), str(out), "--overwrite"])  # an earlier resnet tower
    assert sorted(os.listdir(out)) == ["tower.json", "variables.npz"]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_that_is_not_a_tower_is_never_replaced(tmp_path, narrow_ckpt, overwrite):
    out = tmp_path / "weights"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit, match=r"^error: OUTPUT_DIR: .*has no tower\.json"):
        conv_resnet.main([str(narrow_ckpt), str(out), *overwrite])
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


# ---------------------------------------------------------------- frozen BatchNorm


def test_batch_stats_frozen():
    config = towers.tower_config("resnet", "test")
    module = towers.build_tower("resnet", config)
    images = jnp.asarray(_images(4, 32, seed=3) * 5.0 + 2.0)
    # Random variables of the right shapes (compiling init costs more than the whole check),
    # positive variances and statistics far from those of the batch so an update would show.
    abstract = jax.eval_shape(module.init, jax.random.key(0), images)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda a: np.abs(rng.normal(size=a.shape)).astype(np.float32) + 0.5, abstract)
    before = jax.tree.map(np.copy, variables["batch_stats"])
    # jit: op-by-op dispatch compiles every primitive separately (tens of seconds on 2 cores).
    jax.jit(module.apply)(variables, images)  # no mutable collections needed
    out, updates = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, images)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, updates["batch_stats"]))
    jax.tree.map(np.testing.assert_array_equal, before, variables["batch_stats"])
    assert out["features"].shape == (4, resnet.feature_dim(8))
