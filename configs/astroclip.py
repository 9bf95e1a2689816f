"""The released AstroCLIP (PolymathicAI): AstroDINO ViT-L/12 + SpecFormer towers, cross-attention
heads into a 1024-d space, converted from the published checkpoints (converters/astroclip.py).

    python -m converters.astroclip hf://polymathic-ai/astroclip/astroclip.ckpt weights/astroclip
    python main.py --config=configs/astroclip.py --mode=train --workdir=runs/astroclip   # re-align
    python main.py --config=configs/astroclip.py --mode=eval_knn --workdir=runs/astroclip

The towers are frozen; the heads start from the released ones (`model.heads_weights`) and are
re-aligned with upstream's recipe (configs/astroclip.yaml): AdamW 1e-4, weight decay 0.05, linear
warmup over 1,000 steps then a cosine, gradient norm clipped at 1, batch 256, logit scale 15.5
fixed. Preprocessing is upstream's: 152 px g, r, z cutouts -> the Legacy Survey viewer RGB with
the collator's axis order (`astroclip_rgb`) -> centre crop 144, no augmentation; raw flux
spectra (SpecFormer standardises them itself).

Variants: "" (the released model on the real AstroCLIP data), "synthetic" (a small ViT and a
small SpecFormer from the same code, pretrained here on the built-in data: the whole path with
nothing downloaded), "smoke" (test-size towers, seconds).
"""

import os
import runpy

import ml_collections

# The released architecture (astroclip/models/astroclip.py: ImageHead, SpectrumHead).
EMBED_DIM = 1024
ATTENTION_HEADS = 4


def _shipped_tower(name: str) -> str:
    """A tower directory shipped inside the package (astroclip_jax/models/resources/)."""
    from importlib import resources

    return str(resources.files("astroclip_jax.models").joinpath("resources", name))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """arg: "" (released model, real data), "synthetic" or "smoke"."""
    if arg not in ("", "synthetic", "smoke"):
        raise ValueError(f"unknown config variant {arg!r}; expected '', 'synthetic' or 'smoke'")
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spender.py")
    # by path: `spender` is also a PyPI package
    c = runpy.run_path(base)["get_config"]({"": "desi", "synthetic": "", "smoke": "smoke"}[arg])
    data, model, augment, train = c.data, c.model, c.augment, c.train

    data.image_transform = "astroclip_rgb"
    data.spectrum_norm = "none"  # SpecFormer standardises each spectrum itself
    data.image_crop = 144
    augment.rotation, augment.flip, augment.crop = False, False, 0  # upstream: crop only
    augment.blur_sigma_max, augment.noise_std_max, augment.spectrum_noise_scale = 0.0, 0.0, 0.0

    model.image_tower = ml_collections.ConfigDict(dict(kind="dinov2_vit", size="vit_large_p12",
                                                       dtype="float32"))
    model.image_tower.weights = ml_collections.config_dict.placeholder(str)
    model.spectrum_tower = ml_collections.ConfigDict(dict(kind="specformer", size="specformer",
                                                          dtype="float32"))
    model.spectrum_tower.weights = ml_collections.config_dict.placeholder(str)
    # Image side: out = mlp(ln(attention)); spectrum side: out = ln + mlp(ln) (upstream).
    model.image_head = ml_collections.ConfigDict(dict(
        kind="cross_attention", hidden=(4 * EMBED_DIM,), out=EMBED_DIM, init_from_tower=False,
        num_heads=ATTENTION_HEADS, residual=False))
    model.spectrum_head = ml_collections.ConfigDict(dict(
        kind="cross_attention", hidden=(4 * EMBED_DIM,), out=EMBED_DIM, init_from_tower=False,
        num_heads=ATTENTION_HEADS, residual=True))

    train.schedule = "warmup_cosine"
    train.learning_rate = 1e-4
    train.weight_decay = 0.05
    train.adam_b1, train.adam_b2, train.adam_eps = 0.9, 0.999, 1e-8  # torch AdamW's defaults
    train.warmup_steps = 1000
    train.cosine_steps = 10_000  # upstream T_max
    train.clip_norm = 1.0
    train.batch_size = 256
    train.val_batch_size = 256
    train.logit_scale = 15.5
    # Without augmentation the frozen-feature cache keeps one view per galaxy and tower, every
    # token of it: 144 x 1024 + 778 x 768 float16 at full size, about 1.5 MB a galaxy.

    if arg == "":
        model.image_tower.weights = "weights/astroclip/image_tower"
        model.spectrum_tower.weights = "weights/astroclip/spectrum_tower"
        model.heads_weights = "weights/astroclip/heads"
        train.epochs = 10
    elif arg == "synthetic":
        data.image_crop = 96  # 64 patches of 12 px: a CPU-sized ViT
        model.image_tower.size = "mini"
        model.spectrum_tower.size = "mini"
        # Pretrained here on the synthetic training split, each by the command in its tower.json
        # (configs/moco.py:astroclip, configs/specformer_pretrain.py:synthetic).
        model.image_tower.weights = _shipped_tower("vit_mini_synthetic")
        model.spectrum_tower.weights = _shipped_tower("specformer_mini_synthetic")
        for head in (model.image_head, model.spectrum_head):
            head.out, head.hidden = 256, (1024,)
        train.batch_size = 128
        train.val_batch_size = 128
        train.warmup_steps = 100
        train.cosine_steps = 0  # over the run
        train.epochs = 10
    else:  # smoke
        data.image_crop = 24  # 4 patches of 12 px
        model.image_tower.size = "test"
        model.spectrum_tower.size = "test"
        for head in (model.image_head, model.spectrum_head):
            head.out, head.hidden, head.num_heads = 32, (64,), 2
        train.batch_size = 32
        train.val_batch_size = 32
        train.warmup_steps = 2
        train.cosine_steps = 0
        train.epochs = 2
    return c
