"""AstroCLIP (Stein ResNet50 image tower + Spender spectrum tower), contrastive head training.

The default trains on the built-in synthetic dataset with the paper's hyperparameters
(batch 512, Adam 5e-4, ReduceLROnPlateau 0.5 / 5 epochs, logit scale 15.5, heads
2048 -> [2048] -> 128 and 256 -> [256, 256, 256] -> 128, 80 epochs), sized to finish in
about ten minutes on a 2-core CPU: small towers (pretrained here, the spectrum tower with
configs/spender_pretrain.py and the image tower with configs/moco.py, shipped in the package), the
synthetic `default` set (16,384 pairs; generated and prepared on first use, about 4 minutes),
and the frozen-feature cache (the towers run once over the 8 exact rotations/flips of each
training image, about 5 minutes; then 80 epochs of 25 steps train the heads at about 7,000
pairs/s, about 3 minutes). Online augmentation instead: `--config.feature_cache.enabled=False`.

    python main.py --config=configs/spender.py --mode=train --workdir=runs/default

Real AstroCLIP data with converted pretrained towers (full size, 80 epochs, Stein RGB):

    python -m converters.resnet50 PATH/TO/stein_moco.ckpt weights/resnet50_stein
    python -m converters.spender PATH/TO/spender.desi-edr.galaxyae-b9bc8d12.pt weights/spender_desi
    python main.py --config=configs/spender.py:desi --mode=prepare --workdir=runs/desi
    python main.py --config=configs/spender.py:desi --mode=train --workdir=runs/desi
    python main.py --config=configs/spender.py:desi --mode=eval_knn --workdir=runs/desi

CPU smoke test (tiny everything, well under a minute):

    python main.py --config=configs/spender.py:smoke --mode=train --workdir=/tmp/smoke

Any field can be overridden on the command line, e.g. `--config.train.epochs=2`.
Training on a work directory that holds checkpoints resumes from the latest one.
"""

import ml_collections


def _shipped_tower(name: str) -> str:
    """A tower directory shipped inside the package (astroclip_jax/models/resources/)."""
    from importlib import resources

    return str(resources.files("astroclip_jax.models").joinpath("resources", name))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """arg: "" (synthetic default), "desi" (real data + converted weights) or "smoke"."""
    if arg not in ("", "desi", "smoke", "mmu"):
        raise ValueError(f"unknown config variant {arg!r}; expected '', 'desi', 'smoke' or "
                         "'mmu'")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.multihost = False  # True: jax.distributed.initialize() (also automatic under a coordinator)

    # ---------------------------------------------------------------- data
    c.data = data = ml_collections.ConfigDict()
    data.name = "synthetic_desi"  # "synthetic_desi" | "astroclip_desi"
    # synthetic: "tiny" 256 | "small" 4096 | "default" 16384 | "large" 65536 pairs;
    # astroclip_desi: "joint" | "provabgs" (with the PROVABGS z and log M*) | "provabgs_properties"
    # (also log Z_MW, TAGE_MW, log sSFR from the Multimodal Universe desi_provabgs files)
    data.builder_config = "default"
    data.data_dir = ml_collections.config_dict.placeholder(str)  # None: the tfds default
    data.manual_dir = ml_collections.config_dict.placeholder(str)  # where astroclip_desi.1.1.5.h5 sits
    data.provabgs_path = ml_collections.config_dict.placeholder(str)  # PROVABGS catalogue (hdf5)
    # builder_config "provabgs_properties": the Multimodal Universe desi_provabgs files (Z_MW,
    # TAGE_MW, AVG_SFR); None: desi_provabgs/ in the manual dir
    data.provabgs_properties_path = ml_collections.config_dict.placeholder(str)
    # data.name "mmu_pairs" (variant "mmu"): the Multimodal Universe folders, e.g. .../dr1_main
    # and .../ssl_legacysurvey/south (or .../dr10_south_21), each holding healpix=<i>/ files
    data.mmu_desi_dir = ml_collections.config_dict.placeholder(str)
    data.mmu_legacysurvey_dir = ml_collections.config_dict.placeholder(str)
    data.bands = ("g", "r", "z")  # image planes in the tower's order (mmu_pairs: builder_config's)
    data.crossmatch_radius_arcsec = 1.0  # mmu_pairs: DESI x Legacy Survey sky match (upstream 1")
    data.grid = "desi"  # wavelength grid of the spectra; must match the Spender weights
    data.image_crop = 96  # host centre crop of the 152 px cutouts (what the ResNet was trained on)
    data.image_transform = "stein_rgb"  # "stein_rgb" (what the weights expect) | "raw" flux
    data.spectrum_norm = "zscore"  # per spectrum, std clipped at >= 0.2 (upstream)
    data.nan_policy = "raise"
    data.num_workers = 0  # grain worker processes; 0 = in the main process
    data.duplicate_policy = "raise"  # a repeated targetid: "raise" | "drop" (keep the first)
    data.rebuild = False  # prepare anew although prepared (the old dataset stays until done)

    # ---------------------------------------------------------------- model
    c.model = model = ml_collections.ConfigDict()
    # weights: a converted tower directory (converters/); None = random init at `size` (demo only).
    # dtype: the frozen tower's compute dtype ("bfloat16" on a GPU for embedding at scale)
    model.image_tower = ml_collections.ConfigDict(dict(kind="resnet", size="small", weights=None,
                                                       dtype="float32"))
    model.image_tower.weights = ml_collections.config_dict.placeholder(str)
    model.spectrum_tower = ml_collections.ConfigDict(dict(kind="spender", size="small",
                                                          dtype="float32"))  # Spender: float32
    model.spectrum_tower.weights = ml_collections.config_dict.placeholder(str)
    # Image head: the MoCo v2 head shape; starts from the tower's fc_0/fc_2 when weights exist.
    # (kind "cross_attention" with num_heads and residual is AstroCLIP's: configs/astroclip.py.)
    model.image_head = ml_collections.ConfigDict(dict(
        kind="mlp", hidden=(2048,), out=128, init_from_tower=True, num_heads=0, residual=False))
    # Spectrum head: [256, 256, 256] -> 128 = 230,272 parameters (the paper's count and code).
    model.spectrum_head = ml_collections.ConfigDict(dict(
        kind="mlp", hidden=(256, 256, 256), out=128, init_from_tower=False, num_heads=0,
        residual=False))
    # Converted heads to start both from (converters/astroclip.py); None: initialised here.
    model.heads_weights = ml_collections.config_dict.placeholder(str)

    # ---------------------------------------------------------------- augmentation (on device)
    c.augment = augment = ml_collections.ConfigDict()
    augment.rotation = True
    augment.flip = True
    augment.crop = 96  # final size after rotation; equal to data.image_crop = the paper's order
    augment.blur_sigma_max = 1.0
    augment.noise_std_max = 0.0
    augment.spectrum_noise_scale = 0.0  # x the real DESI per-pixel flux std; the paper augments images only

    # ---------------------------------------------------------------- training
    c.train = train = ml_collections.ConfigDict()
    train.batch_size = 512  # global; the loss sees all of it
    train.epochs = 80
    train.learning_rate = 5e-4  # the paper's runs (see its wandb export); Adam
    train.adam_b1, train.adam_b2, train.adam_eps = 0.9, 0.999, 1e-8  # torch.optim.Adam defaults
    train.plateau_factor = 0.5  # ReduceLROnPlateau on the validation loss
    train.plateau_patience = 5
    train.plateau_threshold = 1e-4
    # "plateau": Adam + the rule above (the paper); "warmup_cosine": AdamW with linear warmup
    # then a cosine to 0 (AstroCLIP's alignment recipe, configs/astroclip.py).
    train.schedule = "plateau"
    train.weight_decay = 0.0  # AdamW's decoupled decay ("warmup_cosine" only)
    train.warmup_steps = 0
    train.cosine_steps = 0  # the cosine's length in steps; 0: every step of the run
    train.clip_norm = 0.0  # global gradient-norm clip; 0: none
    train.logit_scale = 15.5  # multiplies the cosine similarity; fixed unless learn_logit_scale
    train.learn_logit_scale = False
    # Regexes (re.fullmatch) over flattened names like "image_head/params/fc_0/kernel".
    # Add r"image_tower/.*" / r"spectrum_tower/.*" to fine-tune the towers.
    train.trainable = (r"image_head/.*", r"spectrum_head/.*")
    train.train_split = "train"
    train.val_split = "test"  # upstream has no separate validation split
    train.val_batch_size = 512
    train.keep_checkpoints = 3  # latest ones kept; the best by validation loss is always kept too
    train.log_every_steps = 10

    # ---------------------------------------------------------------- frozen-feature cache
    # enabled: run the frozen towers once over fixed augmented views (8 exact rotations/flips x
    # image_draws blur/noise draws; spectrum_draws noise draws) and train the heads on the cached
    # features (training/steps.py, `cached_train_step`); False: the online step augments and
    # runs the towers every step (`online_train_step`). A run may switch on resume.
    c.feature_cache = ml_collections.ConfigDict(dict(
        enabled=True, image_draws=1, spectrum_draws=4, dtype="float16", batch_size=256,
        on_device=True))
    c.feature_cache.dir = ml_collections.config_dict.placeholder(str)  # None: the work dir

    # ---------------------------------------------------------------- evaluation
    c.eval = evaluation = ml_collections.ConfigDict()
    evaluation.split = "test"
    evaluation.batch_size = 512
    evaluation.checkpoint = "best"  # "best" | "latest"
    evaluation.knn_neighbors = 16
    evaluation.knn_holdout = 5000
    evaluation.knn_holdout_fraction = 0.2
    evaluation.seed = 0
    evaluation.search_k = 8
    evaluation.search_queries = 4
    evaluation.umap_neighbors = 15
    evaluation.dbscan_eps = 0.2
    evaluation.dbscan_min_samples = 5
    evaluation.kmeans_k_min = 2
    evaluation.kmeans_k_max = 15
    evaluation.overwrite = False  # replace earlier results of a mode
    evaluation.search_targetids = ()  # query galaxies for `search`; empty: seeded random ones
    evaluation.dbscan_scale = "raw"  # "raw": eps on UMAP coordinates as the paper; "density": scaled by sqrt(N)
    # --mode=embed streams rows in chunks of embed_chunk_rows, one Parquet file each
    # (evaluation/embed.py); embed_inputs adds the pooled model inputs (3.5 KB a galaxy) that
    # eval_knn's PCA baseline reads; survey_file: an image-only or spectrum-only survey file
    # or directory of files (data/survey_files.py) to embed instead of the dataset's split.
    evaluation.embed_chunk_rows = 4096
    evaluation.embed_inputs = True
    evaluation.survey_file = ""

    # ---------------------------------------------------------------- probes (--mode=probe)
    # What the embeddings are worth: zero-shot kNN (paper: 16, AstroCLIP v2: 64 on standardised
    # embeddings), ridge and MLP probes at few-shot fractions of the labelled fit rows, and
    # supervised bounds trained end to end on the same rows (evaluation/probe.py).
    c.probe = probe = ml_collections.ConfigDict()
    # Embeddings-file columns; synthetic: the generator's truths (z_hp = redshift there). The
    # five PROVABGS properties (redshift, log M*, log10 Z_MW, TAGE_MW in Gyr, log10 SFR / M*),
    # then the morphology.
    probe.regression_targets = ("z_hp", "log_mstar", "log_z_mw", "tage_mw", "log_ssfr",
                                "bulge_fraction", "r_eff_kpc")
    probe.classification_targets = ("artefact",)  # 0 none, 1 satellite trail, 2 bright star
    probe.photometry_columns = ("mag_g", "mag_r", "mag_z")
    probe.fractions = (0.01, 0.1, 1.0)
    probe.seeds = (0, 1, 2)
    # The run's embeddings, eval_knn's baselines (frozen tower features, untrained heads, PCA of
    # the inputs) and the magnitudes; those in curve_features get the full few-shot curve, the
    # others are probed at 100 % only.
    probe.feature_sets = ("image", "frozen_image_features", "untrained_heads_image",
                          "pca_image_inputs", "spectrum", "frozen_spectrum_features",
                          "untrained_heads_spectrum", "pca_spectrum_inputs", "photometry")
    probe.curve_features = ("image", "spectrum", "pca_image_inputs", "pca_spectrum_inputs",
                            "photometry")
    probe.knn_v2_neighbors = 64
    probe.ridge_alphas = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
    probe.val_fraction = 0.2  # of the labelled rows (never the held-out ones)
    probe.mlp_hidden = (64, 64)  # AstroCLIP v2's few-shot MLP
    probe.mlp_dropout = 0.1
    probe.mlp_learning_rate = 1e-3
    probe.mlp_batch_size = 64
    probe.mlp_max_epochs = 50
    probe.mlp_patience = 5
    probe.supervised = ("image", "spectrum", "photometry")  # () skips the supervised bounds
    probe.supervised_image_size = "test"  # the ResNet, from scratch on the images (CPU-sized)
    probe.supervised_spectrum_size = "test"  # the Spender encoder, from scratch on the spectra
    probe.supervised_epochs = 15  # best epoch by validation loss (of the labelled rows)
    probe.supervised_photometry_epochs = 50
    probe.supervised_batch_size = 64
    probe.supervised_learning_rate = 5e-4  # AstroCLIP v2's supervised baselines (Adam)

    # ---------------------------------------------------------------- morphology (--mode=probe)
    # Galaxy Zoo DECaLS: AstroCLIP's MLP per question on each frozen feature set, cross-entropy
    # on the vote fractions, accuracy and F1 on held-out rows with > 34 answers
    # (evaluation/morphology.py). 3 x 128 is its function's default (its notebook passes
    # MLP_dim=256) and it feeds raw embeddings; here features are scaled by the fit rows
    # (standardise: the magnitudes and PCA baselines need it).
    c.morphology = ml_collections.ConfigDict(dict(
        enabled=True, labels="fraction", min_votes=3, min_answers=35, hidden=(128, 128, 128),
        dropout=0.2, epochs=25, learning_rate=1e-3, batch_size=256, val_fraction=0.1,
        weighted_sampling=True, standardise=True,
        feature_sets=("image", "spectrum", "frozen_image_features", "pca_image_inputs",
                      "photometry")))

    # ---------------------------------------------------------------- posterior (--mode=probe)
    # AstroCLIP v2's posterior estimation: an ensemble of conditional rational-quadratic spline
    # flows per feature set x target (evaluation/posterior.py), held-out NLL + calibration.
    c.posterior = ml_collections.ConfigDict(dict(
        enabled=True, ensemble=10, epochs=25, batch_size=128, learning_rate=5e-4,
        min_learning_rate=1e-6, knots=8, bound=3.0, blocks=(2, 3), hidden=(16, 32), layers=3,
        val_fraction=0.2, joint=False, feature_sets=("image", "spectrum"), show=4))

    # ---------------------------------------------------------------- vector index (search, serve)
    # Exact inner product (faiss IndexFlatIP) up to exact_max rows: about 45 ms a query per
    # million 128-d vectors on 2 cores (benchmarks/search_index.py); above it 4-bit PQ fast scan
    # re-ranked exactly, its depth raised until recall@10 vs exact reaches recall_target.
    c.index = ml_collections.ConfigDict(dict(
        exact_max=200_000, pq_dims_per_code=2, recall_target=0.95, recall_queries=1000,
        k_factor_max=512, train_rows=65_536))

    # ---------------------------------------------------------------- the search page (--mode=serve)
    # 127.0.0.1: reachable from this machine only (use an SSH tunnel, or host="0.0.0.0" on a
    # trusted network). duplicate_arcsec: neighbours this close to the query or to a better
    # neighbour on the sky (where the catalogue has ra/dec) count as the same galaxy.
    # allowed_hosts: names clients reach the server by (its Host header) besides host,
    # localhost and 127.0.0.1, e.g. ("myserver.example.org",) with host="0.0.0.0"; others are
    # refused (DNS rebinding protection).
    c.serve = ml_collections.ConfigDict(dict(
        host="127.0.0.1", port=8000, k=8, max_k=100, max_upload_bytes=8 * 2 ** 20,
        duplicate_arcsec=2.0, allowed_hosts=()))

    if arg == "":
        # The small towers pretrained here on the synthetic default training split, each by the
        # command in its tower.json: Spender's autoencoder (configs/spender_pretrain.py) and
        # MoCo v2 (configs/moco.py).
        model.spectrum_tower.weights = _shipped_tower("spender_small_synthetic")
        model.image_tower.weights = _shipped_tower("resnet_small_synthetic")
        model.image_head.hidden = (512,)  # the small tower's MoCo head, which seeds the image head
    if arg in ("desi", "mmu"):
        data.name = "astroclip_desi"
        data.builder_config = "provabgs"  # all pairs, plus PROVABGS properties for evaluation
        data.manual_dir = "data/astroclip"
        data.provabgs_path = "data/astroclip/BGS_ANY_full.provabgs.sv3.v0.hdf5"
        data.num_workers = 4
        model.image_tower.size = "resnet50"
        model.image_tower.weights = "weights/resnet50_stein"
        model.spectrum_tower.size = "spender"
        model.spectrum_tower.weights = "weights/spender_desi"
        train.epochs = 80
        # The PROVABGS catalogue gives z and log M*. Z_MW, TAGE_MW and sSFR come from the
        # Multimodal Universe desi_provabgs files (the `provabgs` package's fits): with them,
        # --config.data.builder_config=provabgs_properties
        # --config.data.provabgs_properties_path=PATH (or desi_provabgs/ in the manual dir)
        # --config.probe.regression_targets="('z_hp','log_mstar','log_z_mw','tage_mw','log_ssfr')"
        probe.regression_targets = ("z_hp", "log_mstar")
        probe.classification_targets = ()
        probe.photometry_columns = ()  # the magnitudes are not in the prepared dataset yet
        probe.curve_features = ("image", "spectrum", "pca_image_inputs", "pca_spectrum_inputs")
        probe.supervised = ("image", "spectrum")
        c.morphology.enabled = False  # the AstroCLIP file has no Galaxy Zoo votes
    elif arg == "smoke":
        data.builder_config = "tiny"  # 256 pairs: 204 train, 52 test
        data.image_crop = 32
        augment.crop = 32
        model.image_tower.size = "test"
        model.spectrum_tower.size = "test"
        model.image_head.hidden = (64,)
        model.image_head.out = 32
        model.spectrum_head.hidden = (32, 32)
        model.spectrum_head.out = 32
        train.batch_size = 32
        train.val_batch_size = 32
        train.epochs = 3
        train.log_every_steps = 1
        evaluation.batch_size = 32
        evaluation.knn_holdout = 20
        probe.fractions = (0.25, 1.0)
        probe.seeds = (0, 1)
        probe.knn_v2_neighbors = 8
        probe.mlp_max_epochs = 5
        probe.supervised_image_size = "test"
        probe.supervised_spectrum_size = "test"
        probe.supervised_epochs = 2
        probe.supervised_photometry_epochs = 2
        probe.supervised_batch_size = 8
        c.morphology.hidden = (32, 32, 32)
        c.morphology.epochs = 3
        c.morphology.batch_size = 32
        c.posterior.ensemble = 2
        c.posterior.epochs = 2
        c.posterior.batch_size = 16
    if arg == "mmu":  # as "desi", with pairs cross-matched from Multimodal Universe folders
        data.name = "mmu_pairs"
        data.builder_config = "grz_152"  # "<bands>_<size>": 152 ssl_legacysurvey, 160 dr10_south_21
        data.bands = ("g", "r", "z")
        data.manual_dir = None
        data.provabgs_path = None
        data.mmu_desi_dir = "data/mmu/dr1_main"
        data.mmu_legacysurvey_dir = "data/mmu/ssl_legacysurvey/south"
        data.crossmatch_radius_arcsec = 1.0
        # Without a join z_hp and log M* are NaN (has_props False) and the probe finds no
        # labelled rows. The PROVABGS joins (by DESI TARGETID) are builder configs:
        # --config.data.builder_config=grz_152_provabgs
        # --config.data.provabgs_path=data/astroclip/BGS_ANY_full.provabgs.sv3.v0.hdf5
        # (z_hp, log_mstar, has_props), or grz_152_provabgs_properties and also
        # --config.data.provabgs_properties_path=PATH (the desi_provabgs files: log_z_mw, tage_mw,
        # log_ssfr; NaN where a target is missing) with
        # --config.probe.regression_targets="('z_hp','log_mstar','log_z_mw','tage_mw','log_ssfr')"
    return c
