"""Checkpoints in exactly the formats PolymathicAI's AstroCLIP releases, written with torch.save.

    astroclip.ckpt   a Lightning checkpoint of `astroclip.models.astroclip.AstroClipModel`:
                     state_dict `image_encoder.{backbone,cross_attention,mlp}.*`,
                     `spectrum_encoder.{backbone,cross_attention,mlp}.*`; hyper_parameters hold the
                     pickled `ImageHead` / `SpectrumHead` modules (DINOv2 backbone, SpecFormer
                     LightningModule, astroclip.modules heads) beside plain numbers, and
                     Lightning's `_instantiator` function.
    specformer.ckpt  a Lightning checkpoint of `SpecFormer`: state_dict without prefix,
                     hyper_parameters a plain dict.
    astrodino.ckpt   DINOv2's teacher checkpoint {"teacher": {backbone.*, dino_head.*}}.
Next to each, `<name>.reference.npz` holds its state_dict as NumPy arrays (what a loader must
read back) and `sizes.json` the sizes used.

Upstream's classes are not installed here, so the module tree is built from throwaway classes
registered in `sys.modules` under upstream's module and class names (`dinov2.layers.block.
NestedTensorBlock`, `astroclip.modules.CrossAttentionHead`, `lightning.pytorch.core.module.
LightningModule`, ...), with upstream's attribute and submodule names, so that torch pickles
them exactly as a real checkpoint does and the state_dict keys are upstream's own. That needs
a fresh interpreter: `write_checkpoints` runs this file as a script in a subprocess, and the
test process (and the loader under test) never sees those classes.

Weights are random and non-trivial (LayerNorm scales near 1, LayerScale gammas near 0.3, not
DINOv2's 1e-5 that would make every block an identity), seeded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SIZES = {
    "test": dict(img_size=36, patch_size=12, vit_dim=64, vit_depth=4, vit_heads=4, vit_mlp=256,
                 block_chunks=2, spec_dim=24, spec_layers=2, spec_heads=3, max_len=40,
                 spectrum_length=305, embed_dim=64, n_head=4, dino_hidden=48, dino_bottleneck=16,
                 dino_prototypes=64),
    # test widths on the real DESI grid (7781 pixels: 778 tokens) and configs/astroclip.py:smoke's
    # 24 px crop, so the converted files run through the config like the released ones
    "grid": dict(img_size=24, patch_size=12, vit_dim=64, vit_depth=2, vit_heads=4, vit_mlp=256,
                 block_chunks=2, spec_dim=24, spec_layers=2, spec_heads=3, max_len=800,
                 spectrum_length=7781, embed_dim=32, n_head=2, dino_hidden=48, dino_bottleneck=16,
                 dino_prototypes=64),
    # upstream's released sizes: AstroDINO ViT-L/12 at 144 px, SpecFormer 768 x 6, heads 1024 / 4
    "full": dict(img_size=144, patch_size=12, vit_dim=1024, vit_depth=24, vit_heads=16,
                 vit_mlp=4096, block_chunks=4, spec_dim=768, spec_layers=6, spec_heads=6,
                 max_len=800, spectrum_length=7781, embed_dim=1024, n_head=4, dino_hidden=2048,
                 dino_bottleneck=256, dino_prototypes=1024),
}
NAMES = ("astroclip.ckpt", "specformer.ckpt", "astrodino.ckpt")


def write_checkpoints(out_dir: str, size: str = "test", seed: int = 0,
                      names: tuple[str, ...] = NAMES) -> dict[str, str]:
    """Writes upstream-format files (`names`, default all three) to `out_dir` in a
    subprocess; name -> path."""
    os.makedirs(out_dir, exist_ok=True)
    subprocess.run([sys.executable, os.path.abspath(__file__), out_dir, size, str(seed), *names],
                   check=True, env={**os.environ, "PYTHONPATH": ""})
    return {name: os.path.join(out_dir, name) for name in names}


# ------------------------------------------------------------------ the subprocess side

def _register(module_name: str, **classes) -> None:
    """Puts throwaway modules named like upstream's into sys.modules, holding `classes`."""
    import types

    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        sys.modules.setdefault(name, types.ModuleType(name))
    module = sys.modules[module_name]
    for cls_name, cls in classes.items():
        cls.__module__, cls.__qualname__, cls.__name__ = module_name, cls_name, cls_name
        setattr(module, cls_name, cls)


def _build(sizes: dict, seed: int, with_teacher: bool = True):

    import numpy as np
    import torch
    from torch import nn

    torch.manual_seed(seed)

    # Lightning's classes, as far as a pickle names them.
    class AttributeDict(dict):
        pass

    class LightningModule(nn.Module):
        def __init__(self, hparams: dict):
            super().__init__()
            # What LightningModule.__init__ and save_hyperparameters() leave in __dict__.
            self.prepare_data_per_node = True
            self.allow_zero_length_dataloader_with_multiple_devices = False
            self._log_hyperparams = True
            self._dtype = torch.float32
            self._device = torch.device("cpu")
            self._trainer = None
            self._example_input_array = None
            self._automatic_optimization = True
            self._strict_loading = None
            self._current_fx_name = None
            self._param_requires_grad_state = {}
            self._metric_attributes = None
            self._compiler_ctx = None
            self._fabric = None
            self._fabric_optimizers = []
            self._hparams_name = "kwargs"
            self._hparams = AttributeDict(hparams)
            self._hparams_initial = AttributeDict(hparams)

    def instantiate_module(class_type, config):  # Lightning CLI's hparams["_instantiator"]
        raise AssertionError("never called")

    _register("lightning.fabric.utilities.data", AttributeDict=AttributeDict)
    _register("lightning.pytorch.core.module", LightningModule=LightningModule)
    _register("lightning.pytorch.cli", instantiate_module=instantiate_module)

    # DINOv2 (dinov2/layers/*.py, dinov2/models/vision_transformer.py): names and attributes.
    class PatchEmbed(nn.Module):
        def __init__(self, img_size, patch_size, in_chans, embed_dim):
            super().__init__()
            self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
            self.patches_resolution = (img_size // patch_size,) * 2
            self.num_patches = self.patches_resolution[0] ** 2
            self.in_chans, self.embed_dim, self.flatten_embedding = in_chans, embed_dim, True
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
            self.norm = nn.Identity()

    class MemEffAttention(nn.Module):
        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
            self.qkv = nn.Linear(dim, 3 * dim, bias=True)
            self.attn_drop = nn.Dropout(0.0)
            self.proj = nn.Linear(dim, dim, bias=True)
            self.proj_drop = nn.Dropout(0.0)

    class Mlp(nn.Module):
        def __init__(self, dim, hidden):
            super().__init__()
            self.fc1, self.act = nn.Linear(dim, hidden), nn.GELU()
            self.fc2, self.drop = nn.Linear(hidden, dim), nn.Dropout(0.0)

    class LayerScale(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.inplace = False
            self.gamma = nn.Parameter(1e-5 * torch.ones(dim))

    class NestedTensorBlock(nn.Module):
        def __init__(self, dim, heads, hidden):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.attn = MemEffAttention(dim, heads)
            self.ls1, self.drop_path1 = LayerScale(dim), nn.Identity()
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.mlp = Mlp(dim, hidden)
            self.ls2, self.drop_path2 = LayerScale(dim), nn.Identity()
            self.sample_drop_ratio = 0.3

    class BlockChunk(nn.ModuleList):
        pass

    class DinoVisionTransformer(nn.Module):
        def __init__(self, s):
            super().__init__()
            dim, depth = s["vit_dim"], s["vit_depth"]
            self.num_features = self.embed_dim = dim
            self.num_tokens, self.n_blocks, self.num_heads = 1, depth, s["vit_heads"]
            self.patch_size, self.num_register_tokens = s["patch_size"], 0
            self.interpolate_antialias, self.interpolate_offset = False, 0.1
            self.patch_embed = PatchEmbed(s["img_size"], s["patch_size"], 3, dim)
            n = self.patch_embed.num_patches
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
            self.register_tokens = None
            blocks = [NestedTensorBlock(dim, s["vit_heads"], s["vit_mlp"]) for _ in range(depth)]
            self.chunked_blocks = True
            chunk = depth // s["block_chunks"]
            # DINOv2 pads chunk i with i*chunk Identities so block j keeps its index j.
            self.blocks = nn.ModuleList([BlockChunk([nn.Identity()] * i + blocks[i:i + chunk])
                                         for i in range(0, depth, chunk)])
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.head = nn.Identity()
            self.mask_token = nn.Parameter(torch.zeros(1, dim))

    class DINOHead(nn.Module):
        def __init__(self, s):
            super().__init__()
            h, b = s["dino_hidden"], s["dino_bottleneck"]
            self.mlp = nn.Sequential(nn.Linear(s["vit_dim"], h), nn.GELU(), nn.Linear(h, h),
                                     nn.GELU(), nn.Linear(h, b))
            self.last_layer = nn.utils.weight_norm(nn.Linear(b, s["dino_prototypes"], bias=False))

    _register("dinov2.layers.patch_embed", PatchEmbed=PatchEmbed)
    _register("dinov2.layers.attention", MemEffAttention=MemEffAttention)
    _register("dinov2.layers.mlp", Mlp=Mlp)
    _register("dinov2.layers.layer_scale", LayerScale=LayerScale)
    _register("dinov2.layers.block", NestedTensorBlock=NestedTensorBlock)
    _register("dinov2.layers.dino_head", DINOHead=DINOHead)
    _register("dinov2.models.vision_transformer", BlockChunk=BlockChunk,
              DinoVisionTransformer=DinoVisionTransformer)

    # astroclip/modules.py
    class LayerNorm(nn.Module):
        def __init__(self, shape, eps=1e-5):
            super().__init__()
            self.eps, self.normalized_shape = eps, (shape,)
            self.weight = nn.Parameter(torch.ones(shape))
            self.bias = nn.Parameter(torch.zeros(shape))

    class MLP(nn.Module):
        def __init__(self, in_features, hidden_features, dropout=0.0):
            super().__init__()
            self.in_features, self.hidden_features = in_features, hidden_features
            self.activation = nn.GELU()
            self.dropout, self.bias = dropout, True
            self.encoder = nn.Linear(in_features, hidden_features)
            self.decoder = nn.Linear(hidden_features, in_features)
            self.dropout_layer = nn.Dropout(dropout) if dropout > 0 else None

    class SelfAttention(nn.Module):
        def __init__(self, dim, heads, dropout):
            super().__init__()
            self.embedding_dim, self.num_heads, self.dropout, self.causal = dim, heads, dropout, False
            self.attention = nn.Linear(dim, 3 * dim)
            self.projection = nn.Linear(dim, dim)
            self.attention_dropout, self.residual_dropout = nn.Dropout(dropout), nn.Dropout(dropout)
            self.uses_flash = True

    class TransformerBlock(nn.Module):
        def __init__(self, dim, heads, dropout):
            super().__init__()
            self.layernorm1 = LayerNorm(dim)
            self.attention = SelfAttention(dim, heads, dropout)
            self.layernorm2 = LayerNorm(dim)
            self.mlp = MLP(dim, 4 * dim, dropout)

    class CrossAttentionHead(nn.Module):
        def __init__(self, embed_dim, n_head, model_embed_dim, dropout):
            super().__init__()
            self.query = nn.Parameter(torch.randn(1, 1, embed_dim))
            self.multihead_attn = nn.MultiheadAttention(embed_dim, n_head, batch_first=True,
                                                        kdim=model_embed_dim, vdim=model_embed_dim)
            self.layernorm = nn.LayerNorm(embed_dim)
            self.dropout = nn.Dropout(dropout)

    _register("astroclip.modules", LayerNorm=LayerNorm, MLP=MLP, SelfAttention=SelfAttention,
              TransformerBlock=TransformerBlock, CrossAttentionHead=CrossAttentionHead)

    # astroclip/models/specformer.py
    class SpecFormer(LightningModule):
        def __init__(self, **hp):
            super().__init__(hp)
            d = hp["embed_dim"]
            self.data_embed = nn.Linear(hp["input_dim"], d)
            self.position_embed = nn.Embedding(hp["max_len"], d)
            self.dropout = nn.Dropout(hp["dropout"])
            self.blocks = nn.ModuleList([TransformerBlock(d, hp["num_heads"], hp["dropout"])
                                         for _ in range(hp["num_layers"])])
            self.final_layernorm = LayerNorm(d)
            self.head = nn.Linear(d, hp["input_dim"])

    _register("astroclip.models.specformer", SpecFormer=SpecFormer)

    # astroclip/models/astroclip.py
    class ImageHead(nn.Module):
        def __init__(self, s):
            super().__init__()
            self.backbone = DinoVisionTransformer(s)
            self.freeze_backbone = True
            self.cross_attention = CrossAttentionHead(s["embed_dim"], s["n_head"], s["vit_dim"], 0.1)
            self.mlp = MLP(s["embed_dim"], 4 * s["embed_dim"], 0.1)

    class SpectrumHead(nn.Module):
        def __init__(self, s, backbone):
            super().__init__()
            self.backbone = backbone
            self.freeze_backbone = True
            self.cross_attention = CrossAttentionHead(s["embed_dim"], s["n_head"], s["spec_dim"], 0.1)
            self.mlp = MLP(s["embed_dim"], 4 * s["embed_dim"], 0.1)

    class CLIPLoss(nn.Module):
        pass

    class AstroClipModel(LightningModule):
        def __init__(self, image_encoder, spectrum_encoder, **hp):
            super().__init__(dict(image_encoder=image_encoder, spectrum_encoder=spectrum_encoder, **hp))
            self.image_encoder, self.spectrum_encoder = image_encoder, spectrum_encoder
            self.logit_scale = np.log(hp["logit_scale"])
            self.criterion = CLIPLoss()

    _register("astroclip.models.astroclip", ImageHead=ImageHead, SpectrumHead=SpectrumHead,
              CLIPLoss=CLIPLoss, AstroClipModel=AstroClipModel)

    spec_hp = dict(input_dim=22, embed_dim=sizes["spec_dim"], num_layers=sizes["spec_layers"],
                   num_heads=sizes["spec_heads"], max_len=sizes["max_len"], mask_num_chunks=6,
                   mask_chunk_width=50, slice_section_length=20, slice_overlap=10, dropout=0.1,
                   norm_first=False)
    specformer = SpecFormer(**spec_hp)
    image_head = ImageHead(sizes)
    spectrum_head = SpectrumHead(sizes, SpecFormer(**spec_hp))
    model = AstroClipModel(image_head, spectrum_head, temperature=15.5, lr=1e-4,
                           weight_decay=0.05, epochs=100, eta_min=5e-7, logit_scale=15.5,
                           learnable_logit_scale=False)
    model._hparams["_instantiator"] = instantiate_module
    teacher = (nn.ModuleDict({"backbone": DinoVisionTransformer(sizes), "dino_head": DINOHead(sizes)})
               if with_teacher else nn.ModuleDict())  # a second ViT: only when it is written
    for module in (specformer, model, teacher):
        _randomise(module, seed)
    for p in [*image_head.backbone.parameters(), *spectrum_head.backbone.parameters()]:
        p.requires_grad_(False)  # upstream freezes both backbones (freeze_backbone=True)
    return specformer, spec_hp, model, teacher


def _randomise(module, seed: int) -> None:
    """Non-trivial values for every parameter, from the name (torch's init would leave
    LayerNorms at 1/0 and LayerScale at 1e-5, which would hide mistakes)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                p.copy_(1.0 + 0.1 * noise)
            elif leaf == "gamma":
                p.copy_(0.3 + 0.1 * noise)
            elif leaf in ("bias", "in_proj_bias"):
                p.copy_(0.05 * noise)
            elif p.ndim >= 2 and "embed" not in name and "token" not in name and name != "query":
                fan_in = p[0].numel()
                p.copy_(noise / fan_in ** 0.5)
            else:  # tokens, positions, the query, embeddings
                p.copy_(0.5 * noise)


def _lightning(state_dict, hyper_parameters, trainable) -> dict:
    """A Lightning 2.x checkpoint dict around a state_dict (as Trainer.save_checkpoint writes)."""
    import torch

    exp = {i: {"step": torch.tensor(1000.0), "exp_avg": torch.randn_like(p),
               "exp_avg_sq": torch.rand_like(p)} for i, p in enumerate(trainable)}
    return {
        "epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.1.3",
        "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 1000},
                               "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss_nologit', 'mode': 'min'}": {
            "monitor": "val_loss_nologit", "best_model_score": torch.tensor(3.25),
            "best_model_path": "/outputs/epoch=3.ckpt", "kth_value": torch.tensor(3.5),
            "best_k_models": {"/outputs/epoch=3.ckpt": torch.tensor(3.25)}},
            "LearningRateMonitor": {}},
        "optimizer_states": [{"state": exp, "param_groups": [{
            "lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05, "amsgrad": False,
            "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
            "fused": None, "initial_lr": 1e-4, "params": list(exp)}]}],
        "lr_schedulers": [{"T_max": 10000, "T_warmup": 1000, "eta_min": 2e-7, "base_lrs": [1e-4],
                           "last_epoch": 1000, "_step_count": 1001, "_last_lr": [9e-5]}],
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters,
    }


def _main(out_dir: str, size: str, seed: int, names: list[str]) -> None:
    import numpy as np
    import torch

    sizes = SIZES[size]
    specformer, spec_hp, model, teacher = _build(sizes, seed, "astrodino.ckpt" in names)
    files = {
        "astroclip.ckpt": (_lightning(model.state_dict(), dict(model._hparams),
                                      [p for p in model.parameters() if p.requires_grad]),
                           model.state_dict()),
        "specformer.ckpt": (_lightning(specformer.state_dict(), dict(spec_hp),
                                       list(specformer.parameters())), specformer.state_dict()),
        "astrodino.ckpt": ({"teacher": teacher.state_dict()}, teacher.state_dict()),
    }
    for name, (obj, state) in files.items():
        if name not in names:
            continue
        torch.save(obj, os.path.join(out_dir, name))
        np.savez(os.path.join(out_dir, name + ".reference.npz"),
                 **{k: v.detach().numpy() for k, v in state.items()})
    with open(os.path.join(out_dir, "sizes.json"), "w") as f:
        json.dump({**sizes, "input_dim": 22}, f)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
