"""Pretraining the image tower with Stein et al.'s MoCo v2, `--mode=pretrain_moco`.

Stein et al.'s recipe (ssl-legacysurvey `moco/moco2_module.py`, `scripts/train_ssl.py`): ResNet50
with the MLP head (2048 -> 2048 -> 128), queue of 65,536 negatives, key-encoder momentum 0.996,
temperature 0.1 (the released model), SGD lr 0.03, momentum 0.9, weight decay 1e-4, cosine
schedule, batch 256 per GPU with BatchNorm shuffled across GPUs; the augmentations of
`training/moco_augment.py`. Writes a tower directory (kind "resnet", head fc_0/fc_2) to
<workdir>/tower, which `model.image_tower.weights` of configs/spender.py can name.

    python main.py --config=configs/moco.py --mode=pretrain_moco --workdir=runs/moco

Variants: "" (the small tower on the synthetic default training split, sized for a 2-core CPU:
one epoch, a smaller queue) and "smoke" (test tower, tiny dataset, seconds). Everything else
(data, splits) is configs/spender.py's. "astroclip" and "astroclip_smoke" pretrain the ViT of
configs/astroclip.py:synthetic / :smoke the same way (the same MoCo head on its CLS embedding,
views in that config's RGB), for `model.image_tower.weights` there:

    python main.py --config=configs/moco.py:astroclip --mode=pretrain_moco --workdir=runs/moco_vit
"""

import os
import runpy

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """arg: "" (synthetic default) or "smoke"."""
    variants = ("", "smoke", "astroclip", "astroclip_smoke")
    if arg not in variants:
        raise ValueError(f"unknown config variant {arg!r}; expected one of {variants}")
    vit = arg.startswith("astroclip")
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "astroclip.py" if vit else "spender.py")
    # by path: `spender` is also a PyPI package
    c = runpy.run_path(base)["get_config"](
        {"astroclip": "synthetic", "astroclip_smoke": "smoke"}.get(arg, arg))
    c.moco = p = ml_collections.ConfigDict()
    p.kind = c.model.image_tower.kind  # the tower the contrastive run aligns, at its size
    p.size = c.model.image_tower.size
    p.queue_size = 4096  # Stein: 65536 (the synthetic default has 13,107 training images)
    p.temperature = 0.1
    p.encoder_momentum = 0.996
    p.sgd_momentum = 0.9
    p.weight_decay = 1e-4
    p.cosine_epochs = 0  # 0: over train.epochs
    p.bn_groups = 8  # shuffle-BN groups of 16 (MoCo: one per GPU of 256)
    p.input_crop = 0  # the whole 152 px cutout, as upstream
    p.crop = c.data.image_crop  # 96: what the contrastive run feeds the tower
    p.jitter = 7
    p.tower_dir = ml_collections.config_dict.placeholder(str)  # None: <workdir>/tower

    train = c.train
    train.learning_rate = 0.03  # the cosine's start
    train.batch_size = 128
    train.val_batch_size = 128
    train.epochs = 1
    train.log_every_steps = 5
    if vit:  # the contrastive run's recipe is AdamW's; MoCo keeps its own (SGD, cosine)
        train.schedule, train.weight_decay, train.warmup_steps, train.clip_norm = (
            "plateau", 0.0, 0, 0.0)
    if arg == "astroclip_smoke":
        p.jitter = 2
        p.input_crop = 28  # the 24 px views and their jitter
    if arg in ("smoke", "astroclip_smoke"):
        p.queue_size = 64
        p.bn_groups = 2
        p.input_crop = 48  # room for the rotation and a 4 px jitter around the 32 px view
        p.jitter = 4
        train.batch_size = 32
        train.val_batch_size = 32
        train.epochs = 2
        train.log_every_steps = 1
    return c
