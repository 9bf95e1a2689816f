"""What both converters refuse, and that each refusal names what is actually wrong.

Source files are real torch modules saved the way their projects save them: a Spender hub file
`{"model": [state_dict], "losses": ...}` of a test-size `spender.SpectrumAutoencoder`, and a
narrow torchvision-layout ResNet (as in test_spender.py / test_resnet.py). Each corruption below
changes one known key; the message must name that key (and, for sizes, the size that the
other tensors agree on).
"""

from __future__ import annotations

import fractions
import inspect
import os
import re

import numpy as np
import pytest
import torch

from astroclip_jax import errors
from converters import common
from converters import resnet50 as conv_resnet
from converters import spender as conv_spender
from test_resnet import _lightning_ckpt, _narrow_resnet
from test_spender import flax_outputs, make_autoencoder, make_spectra, torch_outputs, assert_close


@pytest.fixture(scope="module")
def autoencoder():
    return make_autoencoder("test", "sdss", seed=5)  # encoder keys: see test_spender


@pytest.fixture(scope="module")
def resnet():
    return _narrow_resnet(width=8, head=(64, 32))


def _hub(model, **extra):
    return {"model": [dict(model.state_dict())], **extra}


def _refusal(tmp_path, converter, obj, **kwargs) -> str:
    """The one-line message a conversion of `obj` fails with; nothing may be written."""
    src = tmp_path / "in.pt"
    torch.save(obj, src)
    out = tmp_path / "out" / "tower"
    with pytest.raises(common.ConversionError) as err:
        converter.convert(str(src), str(out), **kwargs)
    assert isinstance(err.value, errors.UserError)  # main/CLI: one line, exit 1
    message = str(err.value)
    assert "\n" not in message and str(src.name) in message
    assert not (tmp_path / "out").exists()
    return message


# ----------------------------------------------------------------------------- trust

@pytest.mark.parametrize("which", ["spender", "resnet"])
def test_untrusted_pickle_recommends_the_option_that_exists(tmp_path, which, autoencoder,
                                                            resnet):
    converter = {"spender": conv_spender, "resnet": conv_resnet}[which]
    ratio = fractions.Fraction(1, 3)  # not plain data: a weights-only load refuses it
    obj = (_hub(autoencoder, losses=ratio) if which == "spender"
           else _lightning_ckpt(resnet, {"ratio": ratio}))
    message = _refusal(tmp_path, converter, obj)
    found = re.search(r"refuses: \['fractions\.Fraction'\]\. If you trust this file, convert it "
                      r"with (\w+)=True \(command line: (--[\w-]+)\)", message)
    assert found, message
    keyword, switch = found.groups()
    assert keyword in inspect.signature(converter.convert).parameters
    src = str(tmp_path / "in.pt")
    converter.convert(src, str(tmp_path / "by_keyword"), **{keyword: True})
    converter.main([src, str(tmp_path / "by_switch"), switch])  # the CLI knows the switch
    written = ["tower.json", "variables.npz"] + (["decoder"] if which == "spender" else [])
    assert sorted(os.listdir(tmp_path / "by_switch")) == sorted(written)


def test_numpy_entries_of_a_hub_file_load_without_trust(tmp_path, autoencoder):
    """`losses` and other entries of a hub file often hold NumPy arrays and scalars."""
    src = tmp_path / "hub.pt"
    torch.save(_hub(autoencoder, losses=np.random.default_rng(0).random((40, 3)),
                    best=np.float64(0.25), epoch=np.int64(40), history=[np.float32(1.5)]), src)
    out = conv_spender.convert(str(src), str(tmp_path / "tower"))
    spectra = make_spectra("sdss", n=2)
    got, _ = flax_outputs(out, spectra)
    assert_close(got["latent"], torch_outputs(autoencoder.encoder, spectra)["latent"])


# ----------------------------------------------------------------------------- the key at fault

def _spender_changed(autoencoder, change):
    sd = dict(autoencoder.state_dict())
    change(sd)
    return {"model": [sd]}


def _drop(*keys):
    def change(sd):
        for key in keys:
            del sd[key]
    return change


def _set(key, shape):
    def change(sd):
        sd[key] = torch.randn(*shape)
    return change


# Test-size encoder: conv filters 8, 16, 32 (kernels 5, 11, 21); MLP 16 -> 16 -> 8 -> 8 -> 4.
SPENDER_FAULTS = {
    "first bias": (_drop("encoder.mlp.0.bias"), r"missing key\(s\) \['encoder\.mlp\.0\.bias'\]"),
    "last bias": (_drop("encoder.mlp.9.bias"), r"missing key\(s\) \['encoder\.mlp\.9\.bias'\]"),
    "conv bias": (_drop("encoder.conv3.0.bias"),
                  r"missing key\(s\) \['encoder\.conv3\.0\.bias'\]"),
    "hidden PReLU": (_drop("encoder.mlp.4.weight"),
                     r"missing key\(s\) \['encoder\.mlp\.4\.weight'\]"),
    "last Linear": (_drop("encoder.mlp.9.weight", "encoder.mlp.9.bias"),
                    r"missing key\(s\) \['encoder\.mlp\.9\.weight', 'encoder\.mlp\.9\.bias'\]"),
    "weight rows": (_set("encoder.mlp.0.weight", (17, 16)),
                    r"key 'encoder\.mlp\.0\.weight' has shape \(17, 16\), which gives \(16, 17\) "
                    r"for 'params/mlp_0/kernel'; expected \(16, 16\)"),
    "weight columns": (_set("encoder.mlp.3.weight", (8, 15)),
                       r"key 'encoder\.mlp\.3\.weight' has shape \(8, 15\), which gives "
                       r"\(15, 8\) for 'params/mlp_3/kernel'; expected \(16, 8\)"),
    "last weight": (_set("encoder.mlp.9.weight", (5, 8)),  # the decoder's input says 4
                    r"key 'encoder\.mlp\.9\.weight' has shape \(5, 8\), which gives \(8, 5\) "
                    r"for 'params/mlp_9/kernel'; expected \(8, 4\)"),
    "last bias size": (_set("encoder.mlp.9.bias", (5,)),
                       r"key 'encoder\.mlp\.9\.bias' has shape \(5,\), which gives \(5,\) for "
                       r"'params/mlp_9/bias'; expected \(4,\)"),
    "conv filters": (_set("encoder.conv2.0.weight", (17, 8, 11)),
                     r"key 'encoder\.conv2\.0\.weight' has shape \(17, 8, 11\), which gives "
                     r"\(11, 8, 17\) for 'params/conv2_0/kernel'; expected \(11, 8, 16\)"),
    "conv bias size": (_set("encoder.conv1.0.bias", (9,)),
                       r"key 'encoder\.conv1\.0\.bias' has shape \(9,\), which gives \(9,\) for "
                       r"'params/conv1_0/bias'; expected \(8,\)"),
    "PReLU size": (_set("encoder.conv3.2.weight", (31,)),
                   r"key 'encoder\.conv3\.2\.weight' has shape \(31,\), which gives \(31,\) for "
                   r"'params/conv3_2/negative_slope'; expected \(32,\)"),
}


@pytest.mark.parametrize("fault", sorted(SPENDER_FAULTS))
def test_spender_mismatch_names_the_key_at_fault(tmp_path, autoencoder, fault):
    change, message = SPENDER_FAULTS[fault]
    assert re.search(message, _refusal(tmp_path, conv_spender,
                                       _spender_changed(autoencoder, change)))


def test_a_size_with_two_carriers_that_disagree_names_both(tmp_path, autoencoder):
    """Without the decoder, n_latent is carried by the last weight and bias only."""
    encoder = {k: v for k, v in autoencoder.encoder.state_dict().items()}
    encoder["mlp.9.weight"] = torch.randn(5, 8)
    message = _refusal(tmp_path, conv_spender, encoder)
    assert ("the tensors that give the width of mlp.9 disagree ('mlp.9.weight' (5, 8), "
            "'mlp.9.bias' (4,)) and none has a majority; one of them has the wrong shape"
            in message)


RESNET_FAULTS = {  # width 8: the stem 8 wide, 256 features; head fc.0 256 -> 64, fc.2 -> 32
    "stem weight": (("conv1.weight", (9, 3, 7, 7)),
                    r"key 'conv1\.weight' has shape \(9, 3, 7, 7\), which gives \(7, 7, 3, 9\) "
                    r"for 'params/conv1/kernel'; expected \(7, 7, 3, 8\)"),
    "head hidden": (("fc.0.weight", (63, 256)),
                    r"key 'fc\.0\.weight' has shape \(63, 256\), which gives \(256, 63\) for "
                    r"'params/fc_0/kernel'; expected \(256, 64\)"),
    "head hidden bias": (("fc.0.bias", (65,)),
                         r"key 'fc\.0\.bias' has shape \(65,\), which gives \(65,\) for "
                         r"'params/fc_0/bias'; expected \(64,\)"),
    # The head's output width has two carriers only: both are named.
    "head out bias": (("fc.2.bias", (31,)),
                      r"the tensors that give the head's output width disagree \('fc\.2\.weight' "
                      r"\(32, 64\), 'fc\.2\.bias' \(31,\)\) and none has a majority"),
}


@pytest.mark.parametrize("fault", sorted(RESNET_FAULTS))
def test_resnet_mismatch_names_the_key_at_fault(tmp_path, resnet, fault):
    (key, shape), message = RESNET_FAULTS[fault]
    state = dict(resnet.state_dict(), **{key: torch.randn(*shape)})
    assert re.search(message, _refusal(tmp_path, conv_resnet, state))


# ----------------------------------------------------------------------------- non-finite values

@pytest.mark.parametrize("key,index,value", [
    ("encoder.conv2.0.weight", (3, 1, 4), float("nan")),
    ("encoder.mlp.6.bias", (2,), float("inf")),
    ("encoder.instrument.wave_obs", (100,), float("nan")),  # kept as an extra
    ("decoder.mlp.3.weight", (0, 0), float("-inf")),  # ignored, yet a sign of a bad file
])
def test_spender_refuses_non_finite_values(tmp_path, autoencoder, key, index, value):
    def change(sd):
        sd[key] = sd[key].clone()
        sd[key][index] = value
    message = _refusal(tmp_path, conv_spender, _spender_changed(autoencoder, change))
    size = autoencoder.state_dict()[key].numel()
    assert (f"key {key!r} holds 1 non-finite value(s) (NaN or inf) of {size}, the first "
            f"{value} at index {list(index)}; expected finite weights") in message


def test_resnet_refuses_non_finite_values(tmp_path, resnet):
    state = dict(resnet.state_dict())
    state["layer2.0.bn1.running_var"] = torch.full_like(state["layer2.0.bn1.running_var"],
                                                       float("nan"))
    message = _refusal(tmp_path, conv_resnet, state)
    n = state["layer2.0.bn1.running_var"].numel()
    assert (f"key 'layer2.0.bn1.running_var' holds {n} non-finite value(s) (NaN or inf) of {n}, "
            "the first nan at index [0]") in message


def test_cli_prints_one_line_and_exits_1(tmp_path, autoencoder, capsys):
    src = tmp_path / "in.pt"
    torch.save(_spender_changed(autoencoder, _drop("encoder.mlp.3.bias")), src)
    with pytest.raises(SystemExit) as err:
        conv_spender.main([str(src), str(tmp_path / "tower")])
    assert err.value.code == (f"error: {src}: missing key(s) ['encoder.mlp.3.bias']")
    with pytest.raises(SystemExit) as err:
        conv_spender.main([str(tmp_path / "absent.pt"), str(tmp_path / "tower")])
    assert err.value.code == f"error: {tmp_path / 'absent.pt'}: no such file"
