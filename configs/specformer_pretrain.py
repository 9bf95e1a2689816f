"""Pretraining the SpecFormer spectrum tower by masked-chunk modelling, `--mode=pretrain_specformer`.

Upstream's recipe (configs/specformer.yaml): 6 chunks of 50 tokens masked per spectrum, AdamW
lr 1e-5, weight decay 0.1, betas (0.9, 0.95), linear warmup over 2,000 steps then a cosine over
500,000, gradient norm clipped at 1, batch 64. Writes a tower directory to <workdir>/tower
(kind "specformer"), which `model.spectrum_tower.weights` of configs/astroclip.py can name.

    python main.py --config=configs/specformer_pretrain.py:synthetic --mode=pretrain_specformer --workdir=runs/specformer

Variants as configs/astroclip.py's: "" (the real AstroCLIP file, full size), "synthetic" (small
SpecFormer, the built-in data, sized for a CPU), "smoke" (test size, seconds).
"""

import os
import runpy

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """arg: "" (real data, full size), "synthetic" or "smoke"."""
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "astroclip.py")
    c = runpy.run_path(base)["get_config"](arg)  # checks `arg`
    c.specformer_pretrain = p = ml_collections.ConfigDict()
    p.size = c.model.spectrum_tower.size  # the size the alignment uses
    p.mask_chunks = 6
    p.mask_width = 50
    p.tower_dir = ml_collections.config_dict.placeholder(str)  # None: <workdir>/tower

    train = c.train
    train.schedule = "warmup_cosine"
    train.learning_rate = 1e-5
    train.weight_decay = 0.1
    train.adam_b1, train.adam_b2 = 0.9, 0.95
    train.warmup_steps = 2000
    train.cosine_steps = 500_000
    train.clip_norm = 1.0
    train.batch_size = 64
    train.val_batch_size = 64
    train.log_every_steps = 10
    if arg == "synthetic":
        # A CPU-sized run: one pass with a faster rate over the run's own steps.
        train.learning_rate = 5e-4
        train.warmup_steps = 20
        train.cosine_steps = 0
        train.epochs = 1
    elif arg == "smoke":
        train.learning_rate = 1e-3
        train.warmup_steps = 2
        train.cosine_steps = 0
        train.batch_size = 32
        train.val_batch_size = 32
        train.epochs = 2
    return c
