"""Pretraining the Spender spectrum tower as an autoencoder (Liang, Melchior et al.), `--mode=pretrain_spender`.

spender's recipe (`train/train_DESI.py`): fidelity loss on the flux spectra normalised by their
median over restframe 5300-5850 A, weights = inverse variances with sky lines masked; Adam
(lr 1e-3 peak, eps 1e-4) with a one-cycle schedule stepped per epoch, gradient norm clipped at
1; optional similarity (x3, annealed slope) and consistency (x1, on redshift-augmented copies)
losses. Writes a tower directory (encoder + decoder/) to <workdir>/tower, which
`model.spectrum_tower.weights` of configs/spender.py can name.

    python main.py --config=configs/spender_pretrain.py --mode=pretrain_spender --workdir=runs/spender_ae

Variants: "" (synthetic default, small towers), "smoke" (tiny, seconds), "desi" (the AstroCLIP
file, full-size Spender, 512 batch). Everything else is configs/spender.py's (data, splits).
"""

import os
import runpy

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """arg: "" (synthetic default), "desi" (real data, full size) or "smoke"."""
    if arg not in ("", "desi", "smoke"):
        raise ValueError(f"unknown config variant {arg!r}; expected '', 'desi' or 'smoke'")
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spender.py")
    c = runpy.run_path(base)["get_config"](arg)  # by path: `spender` is also a PyPI package
    c.spender_pretrain = p = ml_collections.ConfigDict()
    p.encoder_size = c.model.spectrum_tower.size  # the size the contrastive run uses
    p.decoder_size = {"": "small", "desi": "spender", "smoke": "test"}[arg]
    p.activation = "speculator"  # spender's default; train_DESI.py's hub models: "leaky_relu"
    p.z_max = 0.8  # restframe 2000-9824 A on DESI (BGS)
    p.restframe_bins = 0  # 0: 9780 on DESI (0.8 A pixels)
    p.init_from = ml_collections.config_dict.placeholder(str)  # fine-tune a converted model
    p.clip_norm = 1.0
    p.schedule_per = "epoch"  # OneCycleLR stepped once an epoch (upstream); "step": every step
    p.similarity = False
    p.consistency = True
    p.similarity_amp = 3.0
    p.consistency_amp = 1.0
    p.augment_z_max = 0.8
    p.tower_dir = ml_collections.config_dict.placeholder(str)  # None: <workdir>/tower

    train = c.train
    train.learning_rate = 1e-3  # the one-cycle peak
    train.adam_eps = 1e-4
    train.batch_size = 512
    train.val_batch_size = 512
    train.epochs = {"": 1, "desi": 100, "smoke": 2}[arg]
    train.log_every_steps = 5
    if arg == "":
        # Sized for a 2-core CPU (~15 min: 102 steps of 128 at ~10 spectra/s per core, shared):
        # one epoch with the one-cycle over its steps, the fidelity loss alone.
        train.batch_size = 128
        p.schedule_per = "step"
        p.consistency = False
    if arg == "smoke":
        train.batch_size = 32
        train.val_batch_size = 64
    return c
