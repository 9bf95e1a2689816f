"""The paper's AstroCLIP train step in PyTorch: the baseline our JAX step is measured against.

    images (B, 3, H, W) -> torchvision.transforms.v2 augmentation on the batched tensor
        (centre crop 96, RandomRotation, RandomHorizontalFlip, RandomVerticalFlip, GaussianBlur)
        -> Gaussian noise
        -> frozen ResNet50 trunk (eval mode, no_grad) -> 2048 features
        -> trainable image head 2048 -> 2048 ReLU -> 128 (initialised from the MoCo v2 head)
    spectra (B, L) -> (+ DESI pixel-std noise) -> frozen Spender convs + attention (no_grad) -> 256
        -> trainable spectrum head 256 -> [256, 256, 256] ReLU -> 128
    -> InfoNCE (F.normalize eps 1e-3, logits = 15.5 x cosine, symmetric CE) -> Adam.

torchvision's v2 transforms applied to one batched tensor draw ONE set of random parameters for
the whole batch (one angle, one flip, one sigma per step), which is how the paper's code used them;
our JAX step draws them per image. The cost is what is compared here, not the statistics.

Both sides share weights: `make_reference_towers` builds torch towers with random, non-trivial
weights (BatchNorm statistics from a calibration pass, random PReLU slopes and biases),
`save_upstream` writes them in the upstream file formats (ssl-legacysurvey Lightning checkpoint,
Spender hub file) and `convert_towers` runs our converters on those files. Head weights are then
copied from the Flax heads (`copy_heads_from_flax`) so the first loss must agree.

Torch is used here on CPU (or CUDA when given a device); `astroclip_jax` itself never imports it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.transforms import v2

# The same sizes as our towers: "full" is the paper's (ResNet50 + MoCo head, Spender on the DESI
# grid); "test" is a narrow ResNet [1, 1, 1, 1] and a narrow Spender on the SDSS grid.
SIZES: dict[str, dict[str, Any]] = {
    "full": dict(resnet_width=64, stage_sizes=(3, 4, 6, 3), head_hidden=2048, head_out=128,
                 spender_filters=(128, 256, 512), spender_mlp=(128, 64, 32), n_latent=6,
                 crop=96, spectrum_length=7781,
                 spectrum_head_hidden=(256, 256, 256), embed_dim=128),
    "test": dict(resnet_width=8, stage_sizes=(1, 1, 1, 1), head_hidden=64, head_out=32,
                 spender_filters=(8, 16, 32), spender_mlp=(16, 8, 8), n_latent=4,
                 crop=32, spectrum_length=3921,
                 spectrum_head_hidden=(32, 32, 32), embed_dim=32),
}

LOGIT_SCALE = 15.5


# ---------------------------------------------------------------- reference towers with shared weights

def randomise_batchnorm(model: nn.Module, image_size: int, gen: torch.Generator) -> None:
    """Realistic BatchNorm running statistics (one train-mode pass), then random affine params."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0  # running stats := statistics of the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, image_size, image_size, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.momentum = 0.1
    model.eval()


def build_resnet(stage_sizes: Sequence[int], width: int, head_hidden: int, head_out: int
                 ) -> nn.Module:
    """torchvision ResNet (Bottleneck) of any width with the MoCo v2 head `fc = Linear, ReLU,
    Linear`, torch's default initialisation: the layout of `models.resnet.SIZES` entries."""
    from torchvision.models.resnet import Bottleneck, ResNet

    if width == 64:
        model = torchvision.models.resnet50(num_classes=128)
        assert tuple(stage_sizes) == (3, 4, 6, 3)
    else:
        # torchvision's constructor fixes the width at 64; rebuild with its own _make_layer.
        model = ResNet(Bottleneck, list(stage_sizes))
        model.inplanes = width
        model.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        model.bn1 = nn.BatchNorm2d(width)
        for i, n in enumerate(stage_sizes):
            setattr(model, f"layer{i + 1}",
                    model._make_layer(Bottleneck, width * 2**i, n, stride=1 if i == 0 else 2))
    model.fc = nn.Sequential(nn.Linear(32 * width, head_hidden), nn.ReLU(),
                             nn.Linear(head_hidden, head_out))
    return model


def make_resnet(size: str, seed: int = 0) -> nn.Module:
    """`build_resnet` of a SIZES entry with random, non-trivial BatchNorm (eval mode)."""
    cfg = SIZES[size]
    torch.manual_seed(seed)
    model = build_resnet(cfg["stage_sizes"], cfg["resnet_width"], cfg["head_hidden"],
                         cfg["head_out"])
    randomise_batchnorm(model, cfg["crop"], torch.Generator().manual_seed(seed))
    return model


def make_spender(size: str, seed: int = 0):
    """spender.SpectrumEncoder on the DESI grid (full) or a short grid (test), random weights."""
    import spender

    cfg = SIZES[size]
    torch.manual_seed(seed + 1)
    # The grids our model checks the converted `wave_obs` against: DESI (full), SDSS (test).
    if cfg["spectrum_length"] == 7781:
        wave = torch.linspace(3600.0, 9824.0, 7781, dtype=torch.float64)
    else:
        wave = 10 ** torch.arange(3.578, 3.97, 1e-4, dtype=torch.float64)
    hidden = tuple(cfg["spender_mlp"])
    enc = spender.SpectrumEncoder(spender.Instrument(wave), cfg["n_latent"], n_hidden=hidden,
                                  act=[nn.PReLU(n) for n in hidden] + [nn.Identity()])
    if tuple(cfg["spender_filters"]) != (128, 256, 512):  # spender hard-codes its filters
        enc.conv1, enc.conv2, enc.conv3 = enc._conv_blocks(list(cfg["spender_filters"]), [5, 11, 21])
        enc.n_feature = cfg["spender_filters"][-1] // 2
        enc.mlp = spender.MLP(enc.n_feature, cfg["n_latent"], n_hidden=hidden,
                              act=[nn.PReLU(n) for n in hidden] + [nn.Identity()])
    with torch.no_grad():
        for module in enc.modules():
            if isinstance(module, nn.PReLU):
                module.weight.uniform_(-0.6, 0.9)  # not the trivial 0.25 everywhere
            elif isinstance(module, (nn.Conv1d, nn.Linear)):
                module.bias.normal_(0.0, 0.2)
    return enc.eval()


def make_reference_towers(size: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    return make_resnet(size, seed), make_spender(size, seed)


def save_upstream(resnet: nn.Module, encoder: nn.Module, out_dir: str) -> dict[str, str]:
    """Writes the towers as upstream files: a MoCo v2 Lightning `.ckpt` and a Spender hub file."""
    os.makedirs(out_dir, exist_ok=True)
    sd = resnet.state_dict()
    state = {**{f"encoder_q.{k}": v for k, v in sd.items()},
             **{f"encoder_k.{k}": v.clone() for k, v in sd.items()},
             "queue": torch.randn(128, 64), "queue_ptr": torch.zeros(1, dtype=torch.long)}
    paths = {"resnet": os.path.join(out_dir, "moco_v2.ckpt"),
             "spender": os.path.join(out_dir, "spender.pt")}
    torch.save({"state_dict": state, "hyper_parameters": {"lr": 0.03}}, paths["resnet"])
    enc_sd = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    torch.save({"model": [enc_sd], "losses": []}, paths["spender"])
    return paths


def load_upstream(paths: Mapping[str, str], size: str) -> tuple[nn.Module, nn.Module]:
    """The torch towers back from the files `save_upstream` wrote."""
    resnet, encoder = make_reference_towers(size)
    state = torch.load(paths["resnet"], map_location="cpu", weights_only=True)["state_dict"]
    resnet.load_state_dict({k[len("encoder_q."):]: v for k, v in state.items()
                            if k.startswith("encoder_q.")})
    enc = torch.load(paths["spender"], map_location="cpu", weights_only=True)["model"][0]
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in enc.items()})
    return resnet.eval(), encoder.eval()


def convert_towers(paths: Mapping[str, str], out_dir: str) -> dict[str, str]:
    """Our converters on the upstream files -> {"image": tower_dir, "spectrum": tower_dir}."""
    from converters import resnet50 as conv_resnet
    from converters import spender as conv_spender

    return {"image": conv_resnet.convert(paths["resnet"], os.path.join(out_dir, "image_tower"),
                                         overwrite=True),
            "spectrum": conv_spender.convert(paths["spender"], os.path.join(out_dir, "spectrum_tower"),
                                             overwrite=True)}


# ---------------------------------------------------------------- the AstroCLIP model in torch

def spender_features(encoder: nn.Module, spectra: torch.Tensor) -> torch.Tensor:
    """Spender's frozen part: convs + attention (its forward up to the MLP)."""
    h, a = encoder._downsample(spectra)
    return torch.sum(h * encoder.softmax(a), dim=2)


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear -> ReLU ... -> Linear, a torch Sequential named like our Flax heads (fc_0, fc_2, ...)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class TorchAstroCLIP(nn.Module):
    """Frozen towers (eval, no grad) + trainable heads, as the paper trained it."""

    def __init__(self, resnet: nn.Module, encoder: nn.Module, spectrum_head_hidden: Sequence[int],
                 embed_dim: int):
        super().__init__()
        self.image_head = resnet.fc  # the MoCo v2 head itself: 2048 -> 2048 ReLU -> 128
        resnet.fc = nn.Identity()
        self.image_tower = resnet.eval().requires_grad_(False)
        self.spectrum_tower = encoder.eval().requires_grad_(False)
        self.spectrum_head = mlp([encoder.n_feature, *spectrum_head_hidden, embed_dim])

    def tower_features(self, images: torch.Tensor, spectra: torch.Tensor):
        with torch.no_grad():
            return self.image_tower(images), spender_features(self.spectrum_tower, spectra)

    def forward(self, images: torch.Tensor, spectra: torch.Tensor):
        img, spec = self.tower_features(images, spectra)
        return self.image_head(img), self.spectrum_head(spec)


def clip_loss(image_emb: torch.Tensor, spectrum_emb: torch.Tensor,
              logit_scale: float = LOGIT_SCALE) -> torch.Tensor:
    """Upstream CLIPLoss: normalise (eps 1e-3), scale x cosine, mean of both cross-entropies."""
    img = F.normalize(image_emb, dim=-1, eps=1e-3)
    spec = F.normalize(spectrum_emb, dim=-1, eps=1e-3)
    logits = logit_scale * img @ spec.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def copy_heads_from_flax(model: TorchAstroCLIP, image_head: Mapping[str, Any],
                         spectrum_head: Mapping[str, Any]) -> None:
    """Flax Dense params {"fc_0": {"kernel", "bias"}, ...} -> the torch Sequentials (kernel.T)."""
    for seq, params in ((model.image_head, image_head), (model.spectrum_head, spectrum_head)):
        linears = {i: m for i, m in enumerate(seq) if isinstance(m, nn.Linear)}
        names = {f"fc_{i}" for i in linears}
        if names != set(params):
            raise ValueError(f"head layers differ: torch {sorted(names)} vs flax {sorted(params)}")
        with torch.no_grad():
            for i, lin in linears.items():
                p = params[f"fc_{i}"]
                lin.weight.copy_(torch.from_numpy(np.asarray(p["kernel"], np.float32).T.copy()))
                lin.bias.copy_(torch.from_numpy(np.asarray(p["bias"], np.float32).copy()))


def heads_as_flax(model: TorchAstroCLIP, tensor=lambda p: p
                  ) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """The torch heads as Flax Dense params (the inverse of `copy_heads_from_flax`):
    {"image_head": {"fc_0": {"kernel", "bias"}, ...}, "spectrum_head": {...}}; `tensor` maps a
    parameter to what is reported in its place (e.g. its Adam state), in the same layout."""
    def array(p: torch.Tensor) -> np.ndarray:
        return tensor(p).detach().cpu().numpy().copy()

    return {name: {f"fc_{i}": {"kernel": array(m.weight).T.copy(), "bias": array(m.bias)}
                   for i, m in enumerate(seq) if isinstance(m, nn.Linear)}
            for name, seq in (("image_head", model.image_head),
                              ("spectrum_head", model.spectrum_head))}


def to_torch(images: np.ndarray, spectra: np.ndarray, device: str = "cpu"):
    """NumPy (B, H, W, 3) images and (B, L) spectra -> torch NCHW images and spectra."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device),
            torch.from_numpy(spectra).to(device))


# ---------------------------------------------------------------- augmentation and the step

def make_augment(crop: int, blur_sigma_max: float, noise_std_max: float,
                 spectrum_noise_scale: float, pixel_std: np.ndarray | None):
    """The paper's torch-side augmentation: transforms.v2 on the batched (B, C, H, W) tensor."""
    radius = int(4.0 * blur_sigma_max + 0.5)  # same kernel width as our JAX blur
    ops: list[nn.Module] = [v2.CenterCrop(crop), v2.RandomRotation(180.0),
                            v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if blur_sigma_max > 0:
        ops.append(v2.GaussianBlur(2 * radius + 1, sigma=(1e-3, blur_sigma_max)))
    image_ops = v2.Compose(ops)
    std = None if pixel_std is None else torch.from_numpy(np.asarray(pixel_std, np.float32))

    def augment(images: torch.Tensor, spectra: torch.Tensor):
        images = image_ops(images)
        if noise_std_max > 0:
            scale = noise_std_max * torch.rand(images.shape[0], 1, 1, 1, device=images.device)
            images = images + scale * torch.randn_like(images)
        if spectrum_noise_scale > 0 and std is not None:
            spectra = spectra + spectrum_noise_scale * std.to(spectra.device) * torch.randn_like(spectra)
        return images, spectra

    return augment


def center_crop(images: torch.Tensor, crop: int) -> torch.Tensor:
    """Centre crop only (the parity check runs without random augmentation)."""
    return v2.functional.center_crop(images, [crop, crop])


def make_step(model: TorchAstroCLIP, optimizer: torch.optim.Optimizer, augment,
              logit_scale: float = LOGIT_SCALE):
    """One training step on (images NCHW, spectra) -> loss (a Python float)."""
    def step(images: torch.Tensor, spectra: torch.Tensor) -> float:
        with torch.no_grad():
            images, spectra = augment(images, spectra)
        zi, zs = model(images, spectra)
        loss = clip_loss(zi, zs, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def make_cached_step(model: TorchAstroCLIP, optimizer: torch.optim.Optimizer,
                     logit_scale: float = LOGIT_SCALE):
    """Heads only, from precomputed tower features: torch's best case for the cached step."""
    def step(image_feats: torch.Tensor, spectrum_feats: torch.Tensor) -> float:
        loss = clip_loss(model.image_head(image_feats), model.spectrum_head(spectrum_feats), logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step
