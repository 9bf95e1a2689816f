"""The config, resolved once per mode into frozen, typed settings that the code below receives.

    settings = settings_lib.resolve(config, mode)     # once, in main.py; modes get `settings`
    settings.data.image_crop, settings.model.image_size, settings.train.batch_size, ...

One loop reads every section (`SECTIONS`: the section, its settings class, whether it is
required); `MODE_SECTIONS` says which optional sections a mode needs. Every default lives in the
config file (`configs/spender.py`); nothing here or below invents one. A field the config lacks
is an error that names it (`config field data.grid is missing`), and values are converted to
the declared type (JSON turns tuples into lists, so a config read back from a checkpoint
resolves to the same settings as the one that wrote it).

Every value is then checked against one table of rules (`RULES`: a dotted field -> its rules;
ranges, choices, relations to other fields), so a mode stops with one line naming the field
before anything is created, and a new section is one `SECTIONS` entry plus its rows in `RULES`.
`changes_on_resume` says which fields may differ when a run is resumed.

Derived values are computed here, once, instead of by each reader:
  model.image_size       the side of the images the towers see (augment.crop, else data.image_crop)
  model.spectrum_length  pixels of the configured wavelength grid
  train.trainable        the trainable-name regexes, plus the logit scale's when it is learned
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Callable, Mapping

from astroclip_jax import flat_tree, wavelength_grids
from astroclip_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """What to read and how the host preprocesses it (config section `data`)."""

    name: str  # "synthetic_desi" | "astroclip_desi"
    builder_config: str
    data_dir: str | None  # None: the tfds default
    manual_dir: str | None
    provabgs_path: str | None
    # The Multimodal Universe desi_provabgs files (a directory of healpix=*/ files, or one file):
    # log Z_MW, TAGE_MW and log sSFR for astroclip_desi/provabgs_properties (data/provabgs_mmu.py)
    provabgs_properties_path: str | None
    # data.name "mmu_pairs" (data/mmu_builder.py): the Multimodal Universe DESI and Legacy Survey
    # configuration folders (holding healpix=<i>/001-of-001.hdf5), the image bands in the order
    # the image tower takes them, and the sky cross-match radius (arcsec; upstream 1)
    mmu_desi_dir: str | None
    mmu_legacysurvey_dir: str | None
    bands: tuple[str, ...]
    crossmatch_radius_arcsec: float
    grid: str  # wavelength grid of the spectra
    image_crop: int  # host centre crop; 0 keeps the whole cutout
    image_transform: str  # "stein_rgb" (the ResNet's) | "astroclip_rgb" (the ViT's) | "raw"
    spectrum_norm: str  # "zscore" | "none"
    nan_policy: str  # "raise" | "mask"
    num_workers: int  # grain worker processes; 0 = this process
    duplicate_policy: str  # repeated targetids: "raise" | "drop" (all but the first occurrence)
    rebuild: bool  # prepare anew even when prepared (the old dataset stays until it is done)

    @property
    def is_synthetic(self) -> bool:
        return self.name.startswith("synthetic")

    def preprocessing_key(self) -> dict[str, Any]:
        """What the model's inputs depend on (the dataset and the host preprocessing), not
        where the files sit: a moved or re-mounted data_dir keys the same."""
        return {"name": self.name, "builder_config": self.builder_config, "grid": self.grid,
                "image_crop": self.image_crop, "image_transform": self.image_transform,
                "spectrum_norm": self.spectrum_norm}


@dataclasses.dataclass(frozen=True)
class TowerSettings:
    kind: str  # image: "resnet" | "dinov2_vit"; spectrum: "spender" | "specformer"
    size: str  # a named size of the module ("resnet50", "small", "test", ...)
    weights: str | None  # a converted tower directory; None = random init at `size`
    # Compute dtype of the frozen tower ("float32" | "bfloat16", where the kind has the option:
    # towers.KINDS compute_dtype): parameters stay float32, activations and matmuls in bfloat16.
    dtype: str

    def __post_init__(self):
        # "" on the command line (`--config.model.spectrum_tower.weights=`) means random too:
        # absl cannot pass None to a string field.
        if self.weights == "":
            object.__setattr__(self, "weights", None)


@dataclasses.dataclass(frozen=True)
class HeadSettings:
    kind: str  # "mlp" (on pooled features) | "cross_attention" (a learned query over tokens)
    hidden: tuple[int, ...]  # mlp: hidden widths; cross_attention: its MLP's one hidden width
    out: int
    init_from_tower: bool  # start from the tower's own MoCo head (image head only)
    num_heads: int  # cross_attention: attention heads (AstroCLIP: 4); mlp: 0
    residual: bool  # cross_attention: out = ln + mlp(ln) (AstroCLIP's spectrum side), else mlp(ln)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    image_tower: TowerSettings
    spectrum_tower: TowerSettings
    image_head: HeadSettings
    spectrum_head: HeadSettings
    heads_weights: str | None  # converted heads (converters/astroclip.py) to start both from
    logit_scale: float
    learn_logit_scale: bool
    grid: str  # the spectra's grid, checked against the Spender tower's own
    image_size: int  # derived: the side of the images the towers see
    spectrum_length: int  # derived: pixels of `grid`


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    """On-device augmentations of the online step (and of the cached views)."""

    rotation: bool
    flip: bool
    crop: int  # final size after rotation; 0 = no crop
    blur_sigma_max: float
    noise_std_max: float
    spectrum_noise_scale: float  # times the real per-pixel DESI flux std; 0 = off


@dataclasses.dataclass(frozen=True)
class FeatureCacheSettings:
    """Frozen towers run once over fixed views; the epochs then train the heads only."""

    enabled: bool
    image_draws: int
    spectrum_draws: int
    dtype: str
    batch_size: int
    on_device: bool
    dir: str | None  # None: the work directory


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    batch_size: int
    epochs: int
    learning_rate: float
    adam_b1: float
    adam_b2: float
    adam_eps: float
    plateau_factor: float
    plateau_patience: int
    plateau_threshold: float
    schedule: str  # "plateau" (Adam + ReduceLROnPlateau) | "warmup_cosine" (AdamW)
    weight_decay: float
    warmup_steps: int
    cosine_steps: int  # 0: every step of the run
    clip_norm: float  # 0: no clip
    trainable: tuple[str, ...]  # derived: includes the logit scale's when it is learned
    train_split: str
    val_split: str
    val_batch_size: int
    keep_checkpoints: int
    log_every_steps: int


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    split: str
    batch_size: int
    checkpoint: str  # "best" | "latest" | a step number | "initial" (as built, untrained)
    knn_neighbors: int
    knn_holdout: int
    knn_holdout_fraction: float
    seed: int
    search_k: int
    search_queries: int
    search_targetids: tuple[int, ...]
    umap_neighbors: int
    dbscan_eps: float
    dbscan_min_samples: int
    dbscan_scale: str
    kmeans_k_min: int
    kmeans_k_max: int
    overwrite: bool
    embed_chunk_rows: int
    embed_inputs: bool
    survey_file: str


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """`--mode=probe` (evaluation/probe.py): what is predicted from what, and how."""

    regression_targets: tuple[str, ...]  # columns of the embeddings file
    classification_targets: tuple[str, ...]  # integer class columns (synthetic: artefact)
    photometry_columns: tuple[str, ...]  # the photometry baseline's inputs (g, r, z magnitudes)
    fractions: tuple[float, ...]  # of the labelled fit rows (few-shot curves)
    seeds: tuple[int, ...]
    feature_sets: tuple[str, ...]  # what is probed (evaluation/feature_sets.py)
    curve_features: tuple[str, ...]  # feature sets probed at every fraction; others at 100 %
    knn_v2_neighbors: int  # AstroCLIP v2: 64, on standardised embeddings
    ridge_alphas: tuple[float, ...]  # the grid the validation slice chooses from
    val_fraction: float  # of the labelled rows, for early stopping and the ridge penalty
    mlp_hidden: tuple[int, ...]
    mlp_dropout: float
    mlp_learning_rate: float
    mlp_batch_size: int
    mlp_max_epochs: int
    mlp_patience: int
    supervised: tuple[str, ...]  # supervised bounds to train: "image", "spectrum", "photometry"
    supervised_image_size: str  # ResNet size ("test", "small", "resnet50")
    supervised_spectrum_size: str  # Spender encoder size
    supervised_epochs: int  # the image and spectrum networks
    supervised_photometry_epochs: int  # the magnitudes' MLP (cheap; AstroCLIP v2: 50)
    supervised_batch_size: int
    supervised_learning_rate: float


@dataclasses.dataclass(frozen=True)
class MorphologySettings:
    """Galaxy Zoo DECaLS morphology in `--mode=probe` (evaluation/morphology.py): AstroCLIP's
    MLP per question on a frozen embedding, trained on the vote fractions."""

    enabled: bool
    labels: str  # "fraction" (votes / total) or "debiased" (the published catalogue's; upstream)
    min_votes: int  # fit rows: at least this many answers to the question (AstroCLIP: 3)
    min_answers: int  # held-out rows scored: at least this many answers (AstroCLIP: > 34)
    hidden: tuple[int, ...]  # AstroCLIP's notebook: 3 x 256 (its function's default 3 x 128)
    dropout: float  # 0.2
    epochs: int  # 25, the best by validation loss kept
    learning_rate: float  # Adam 1e-3
    batch_size: int  # 256
    val_fraction: float  # of the fit rows (AstroCLIP: 0.1)
    weighted_sampling: bool  # rows drawn with replacement, weight = the top vote fraction
    standardise: bool  # features scaled by the fit rows (AstroCLIP: raw embeddings)
    # which of probe.feature_sets are scored (those the run has); the supervised image network
    # is trained beside them when probe.supervised names "image"
    feature_sets: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PosteriorSettings:
    """Posterior estimation in `--mode=probe` (evaluation/posterior.py): AstroCLIP v2's ensemble
    of conditional rational-quadratic spline flows on a frozen embedding, plus calibration."""

    enabled: bool
    ensemble: int  # members (upstream 10), each with its own seed and drawn width / blocks
    epochs: int  # 25; the best epoch by validation NLL is kept (upstream keeps the last)
    batch_size: int  # 128
    learning_rate: float  # Adam 5e-4, cosine decay per epoch ...
    min_learning_rate: float  # ... to this (upstream 1e-6)
    knots: int  # spline bins (upstream 8)
    bound: float  # the spline's interval [-bound, bound] on standardised targets (pyro: 3)
    blocks: tuple[int, int]  # block count drawn uniformly in [lo, hi] (upstream 2-3)
    hidden: tuple[int, int]  # conditioner width drawn log-uniformly in [lo, hi] (upstream 16-32)
    layers: int  # hidden layers per conditioner (upstream 3)
    val_fraction: float  # of the labelled fit rows, picks the best epoch (upstream 0.2)
    joint: bool  # one flow over all targets (elementwise given the features, as upstream)
    feature_sets: tuple[str, ...]  # which of probe.feature_sets are scored (those the run has)
    show: int  # held-out galaxies drawn in posteriors.png


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    """The vector index over a run's embeddings (evaluation/index.py; config section `index`)."""

    exact_max: int  # rows up to which the index is exact (IndexFlatIP); above: PQ + re-rank
    pq_dims_per_code: int  # embedding dimensions per 4-bit PQ code of the approximate index
    recall_target: float  # recall@10 vs exact search the re-rank depth is raised to reach
    recall_queries: int  # seeded table rows used as queries to measure it
    k_factor_max: int  # the deepest re-rank tried (candidates = k_factor * k)
    train_rows: int  # rows the PQ codebooks are trained on


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """`--mode=serve` (serving/app.py): the similarity-search page and its JSON API."""

    host: str  # 127.0.0.1: this machine only
    port: int
    k: int  # neighbours shown by default
    max_k: int
    max_upload_bytes: int
    duplicate_arcsec: float  # neighbours this close on the sky (where RA/Dec exist) are dropped
    allowed_hosts: tuple[str, ...]  # Host header names answered besides host and loopback


@dataclasses.dataclass(frozen=True)
class SpenderPretrainSettings:
    """`--mode=pretrain_spender` (training/spender_pretrain.py): Spender's autoencoder recipe.
    Batch, epochs, learning rate (the one-cycle peak), Adam eps and splits come from `train`."""

    encoder_size: str  # models.spender.SIZES
    decoder_size: str  # models.spender_autoencoder.DECODER_SIZES
    activation: str  # "speculator" | "leaky_relu" (train_DESI.py's hub models)
    z_max: float  # restframe grid from wave_obs[0] / (1 + z_max) to wave_obs[-1]
    restframe_bins: int  # 0: the span over the observed pixel size (9780 on DESI)
    init_from: str | None  # a spender tower directory with decoder/ to fine-tune
    clip_norm: float  # global gradient norm clip (upstream 1.0)
    schedule_per: str  # the one-cycle steps per "epoch" (upstream) or per "step" (short runs)
    similarity: bool  # add similarity_amp x the restframe similarity loss
    consistency: bool  # add consistency_amp x the consistency loss on redshifted copies
    similarity_amp: float
    consistency_amp: float
    augment_z_max: float  # redshift augmentation: z_new ~ U(0, augment_z_max)
    tower_dir: str | None  # where the trained tower directory goes (None: <workdir>/tower)


@dataclasses.dataclass(frozen=True)
class MocoSettings:
    """`--mode=pretrain_moco` (training/moco.py): Stein et al.'s MoCo v2 for the image tower.
    Batch, epochs, learning rate (the cosine's start) and splits come from `train`."""

    kind: str  # the image tower: "resnet" | "dinov2_vit"
    size: str  # a size of that tower (models.resnet.SIZES, models.vit.SIZES)
    queue_size: int  # negatives (Stein: 65536); a multiple of train.batch_size
    temperature: float  # Stein's released ResNet50: 0.1 (script default 0.2)
    encoder_momentum: float  # key encoder EMA (Stein: 0.996)
    sgd_momentum: float  # 0.9
    weight_decay: float  # 1e-4, on every parameter as torch's SGD
    cosine_epochs: int  # the cosine schedule's length in epochs (0: train.epochs)
    bn_groups: int  # shuffle-BN groups (MoCo: one per GPU); a multiple of the device count
    input_crop: int  # host centre crop of the flux cutouts before augmenting (0: whole cutout)
    crop: int  # the views' size (96; the contrastive run's data.image_crop)
    jitter: int  # jitter of the final crop (7)
    tower_dir: str | None  # where the trained tower directory goes (None: <workdir>/tower)


@dataclasses.dataclass(frozen=True)
class SpecformerPretrainSettings:
    """`--mode=pretrain_specformer` (training/specformer_pretrain.py): SpecFormer's masked-chunk
    modelling. Batch, epochs, the optimiser and its schedule come from `train`."""

    size: str  # models.specformer.SIZES
    mask_chunks: int  # chunks masked per spectrum (upstream 6)
    mask_width: int  # tokens per chunk (upstream 50)
    tower_dir: str | None  # where the trained tower directory goes (None: <workdir>/tower)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    seed: int
    multihost: bool
    data: DataSettings
    model: ModelSettings
    augment: AugmentSettings
    feature_cache: FeatureCacheSettings
    train: TrainSettings
    eval: EvalSettings
    # None when the config has no `probe` section: the config of a checkpoint written before it
    # existed (only --mode=probe needs it, and reads it from the command line's config).
    probe: ProbeSettings | None = None
    morphology: MorphologySettings | None = None  # None likewise (--mode=probe)
    posterior: PosteriorSettings | None = None  # None likewise (--mode=probe)
    index: IndexSettings | None = None  # None likewise (used by search and serve)
    serve: ServeSettings | None = None
    spender_pretrain: SpenderPretrainSettings | None = None  # None likewise
    moco: MocoSettings | None = None  # None likewise
    specformer_pretrain: SpecformerPretrainSettings | None = None  # None likewise
    # The config these settings were resolved from, as JSON (what checkpoints store); not part
    # of the settings' identity.
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False,
                                                  repr=False)


# Fields computed from others (not read from the config).
_DERIVED = {"ModelSettings": ("grid", "image_size", "spectrum_length")}
# Fields that live in another section of the config file than in the settings.
_MOVED = {("ModelSettings", "logit_scale"): "train", ("ModelSettings", "learn_logit_scale"): "train"}

# Every section of a config, read by one loop: (settings field, class, required). An optional
# section is None when the config lacks it: the config of a checkpoint written before it existed
# (the modes that need it say so, `MODE_SECTIONS`).
SECTIONS = (("data", DataSettings, True), ("augment", AugmentSettings, True),
            ("model", ModelSettings, True), ("feature_cache", FeatureCacheSettings, True),
            ("train", TrainSettings, True), ("eval", EvalSettings, True),
            ("probe", ProbeSettings, False),
            ("morphology", MorphologySettings, False), ("posterior", PosteriorSettings, False),
            ("index", IndexSettings, False),
            ("serve", ServeSettings, False), ("spender_pretrain", SpenderPretrainSettings, False),
            ("moco", MocoSettings, False),
            ("specformer_pretrain", SpecformerPretrainSettings, False))

# The optional sections each mode needs, and the config file that has them.
MODE_SECTIONS = {"probe": ("probe", "morphology", "posterior"), "search": ("index",), "serve": ("index", "serve"),
                 "pretrain_spender": ("spender_pretrain",), "pretrain_moco": ("moco",),
                 "pretrain_specformer": ("specformer_pretrain",)}
_SECTION_HOME = {"moco": "configs/moco.py", "spender_pretrain": "configs/spender_pretrain.py",
                 "specformer_pretrain": "configs/specformer_pretrain.py"}


def _get(section: Any, name: str, where: str) -> Any:
    try:
        return section[name]
    except (KeyError, AttributeError, TypeError):
        raise ConfigError(f"config field {where}.{name} is missing") from None


def _convert(value: Any, hint: Any, where: str) -> Any:
    """`value` as the declared type `hint` (a dataclass, tuple[T, ...], X | None, a scalar)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return hint(**_read(hint, value, where))
    if origin in (types.UnionType, typing.Union):  # X | None
        if value is None:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), where)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(f"config field {where} must be a sequence, got {value!r}")
        return tuple(_convert(v, args[0], where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field {where} must be True or False, got {value!r}")
        return value
    if hint in (int, float, str):
        if value is None or (hint is not str and isinstance(value, (bool, str))):
            raise ConfigError(f"config field {where} must be a {hint.__name__}, got {value!r}")
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"config field {where} must be a whole number, got {value!r}")
        try:
            converted = hint(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"config field {where} must be a {hint.__name__}, got {value!r}") \
                from None
        if hint is float and not math.isfinite(converted):
            raise ConfigError(f"config field {where} must be a finite number, got {value!r}")
        return converted
    raise TypeError(f"no conversion to {hint!r} for {where}")  # a bug in this module


def _read(cls: type, section: Any, where: str, root: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in _DERIVED.get(cls.__name__, ()):
            continue
        moved = _MOVED.get((cls.__name__, field.name))
        src, src_where = (_get(root, moved, "config"), moved) if moved else (section, where)
        values[field.name] = _convert(_get(src, field.name, src_where), hints[field.name],
                                      f"{src_where}.{field.name}")
    return values


def _derived(name: str, values: dict[str, Any], sections: Mapping[str, Any]) -> dict[str, Any]:
    """A section's fields computed from the others (`_DERIVED`)."""
    if name == "model":
        data, augment = sections["data"], sections["augment"]
        return {"grid": data.grid, "image_size": augment.crop or data.image_crop,
                "spectrum_length": len(wavelength_grids.wave(data.grid))}
    if name == "train" and sections["model"].learn_logit_scale:  # a learned scale always trains
        return {"trainable": values["trainable"] + (r"logit_scale/.*",)}
    return {}


def resolve(config: Mapping[str, Any], mode: str | None = None) -> RunSettings:
    """The typed settings of a config (a ConfigDict, or the dict a checkpoint stores), every
    field checked against `RULES`; with `mode`, the optional sections that mode needs are
    required too. Raises ConfigError naming the first field at fault."""
    for name in MODE_SECTIONS.get(mode, ()):
        if name not in config or config[name] is None:
            home = _SECTION_HOME.get(name, "configs/spender.py")
            raise ConfigError(f"config has no {name} section, which --mode={mode} needs: use "
                              f"{home}")
    sections: dict[str, Any] = {}
    for name, cls, required in SECTIONS:
        if not required and name not in config:
            sections[name] = None
            continue
        values = _read(cls, _get(config, name, "config"), name, root=config)
        if name == "data" and values["grid"] not in wavelength_grids.GRIDS:  # `_derived` reads it
            raise ConfigError(f"config field data.grid is {values['grid']!r}; expected one of "
                              f"{sorted(wavelength_grids.GRIDS)}")
        sections[name] = cls(**{**values, **_derived(name, values, sections)})
    settings = RunSettings(seed=_convert(_get(config, "seed", "config"), int, "seed"),
                           multihost=_convert(_get(config, "multihost", "config"), bool,
                                              "multihost"),
                           **sections, config=config_json(config))
    check(settings, mode)
    return settings


# ------------------------------------------------------------------------------- the rules
#
# One table: a dotted field -> the rules its value must satisfy. A rule is (test, expected): the
# test gets the value and the whole settings (for rules that relate two fields); `expected` ends
# the message "config field NAME is VALUE; expected EXPECTED". A field of an absent optional
# section is not checked. Tuple-valued fields are checked as a whole (`each` checks elements).


@dataclasses.dataclass(frozen=True)
class Rule:
    test: Callable[[Any, "RunSettings"], bool]
    expected: str
    # Imports a module to check: only for a mode that needs the field's section
    # (MODE_SECTIONS), so other modes do not pay seconds of imports before their lock.
    imports: bool = False


def _plain(test: Callable[[Any], bool], expected: str) -> Rule:
    return Rule(lambda value, _: test(value), expected)


POSITIVE = _plain(lambda v: v > 0, "a value > 0")
NON_NEGATIVE = _plain(lambda v: v >= 0, "a value >= 0")
UNIT_OPEN = _plain(lambda v: 0 < v < 1, "a value in (0, 1)")  # fractions, factors
MOMENTUM = _plain(lambda v: 0 <= v < 1, "a value in [0, 1)")  # Adam betas, EMA and SGD momenta
NOT_EMPTY = _plain(lambda v: len(v) > 0, "at least one value")


def head_count(side: str) -> Rule:
    """A cross-attention head splits `out` evenly over its heads; an MLP head has none (0)."""
    def test(value, settings):
        head = getattr(settings.model, side)
        if head.kind == "mlp":
            return value == 0
        return value > 0 and head.out % value == 0
    return Rule(test, f"0 for an mlp head, else a positive divisor of model.{side}.out")


def mlp_of_cross_attention(side: str) -> Rule:
    """A cross-attention head's MLP has one hidden layer, a multiple of its width."""
    def test(value, settings):
        head = getattr(settings.model, side)
        return head.kind == "mlp" or (len(value) == 1 and value[0] % head.out == 0)
    return Rule(test, f"one width, a multiple of model.{side}.out, for a cross_attention head")


def residual_only_across(side: str) -> Rule:
    return Rule(lambda v, s: not v or getattr(s.model, side).kind == "cross_attention",
                "False for an mlp head (the residual is the cross-attention head's)")


def one_of(*choices: Any) -> Rule:
    return _plain(lambda v: v in choices, f"one of {list(choices)}")


def compute_dtype_of(tower: str) -> Rule:
    """bfloat16 only for tower kinds that have the option (models.towers.KINDS)."""
    def test(value, s):
        if value == "float32":
            return True
        # the kinds table imports flax: read only when bfloat16 is asked
        kinds = _module_table("astroclip_jax.models.towers", "KINDS")
        kind = kinds.get(getattr(s.model, tower).kind)
        return kind is not None and kind.compute_dtype
    return Rule(test, "float32 for this tower kind (bfloat16: resnet, dinov2_vit, specformer)")


def each(rule: Rule) -> Rule:
    return Rule(lambda values, s: all(rule.test(v, s) for v in values),
                f"values each {rule.expected.removeprefix('a ')}")


def at_most(field: str) -> Rule:
    return Rule(lambda v, s: v <= _field(s, field), f"a value <= {field}")


def at_least(field: str) -> Rule:
    return Rule(lambda v, s: v >= _field(s, field), f"a value >= {field}")


def multiple_of(field: str) -> Rule:
    return Rule(lambda v, s: v > 0 and v % _field(s, field) == 0,
                f"a positive multiple of {field}")


def divisor_of(field: str) -> Rule:
    return Rule(lambda v, s: v > 0 and _field(s, field) % v == 0,
                f"a positive divisor of {field}")


def _module_table(module: str, attribute: str) -> Any:
    """A table a module holds, imported when a rule checks it: those modules import these
    settings, so importing them here at load time would be a circle."""
    import importlib

    return getattr(importlib.import_module(module), attribute)


def names_in(module: str, attribute: str, subset: bool = False) -> Rule:
    """A name (or, with `subset`, names) of a table the named module holds (`_module_table`),
    e.g. a model's `SIZES`."""
    def table():
        return _module_table(module, attribute)

    if subset:
        return Rule(lambda v, _: set(v) <= set(table()), f"names from {module}.{attribute}",
                    imports=True)
    return Rule(lambda v, _: v in table(), f"one of the names in {module}.{attribute}",
                imports=True)


RULES: dict[str, tuple[Rule, ...]] = {
    "data.name": (one_of("synthetic_desi", "astroclip_desi", "mmu_pairs"),),
    "data.mmu_desi_dir": (Rule(lambda v, s: v is None or s.data.name == "mmu_pairs",
                               "None unless data.name is 'mmu_pairs'"),),
    "data.mmu_legacysurvey_dir": (Rule(lambda v, s: v is None or s.data.name == "mmu_pairs",
                                       "None unless data.name is 'mmu_pairs'"),),
    "data.bands": (  # three image planes: the towers take 3 channels
        _plain(lambda v: len(v) == 3 and len(set(v)) == 3 and set(v) <= {"g", "r", "i", "z"},
               "three different bands from 'g', 'r', 'i', 'z'"),
        Rule(lambda v, s: s.data.name != "mmu_pairs"
             or s.data.builder_config.split("_")[0] == "".join(v),
             "the bands that data.builder_config '<bands>_<size>' names, in its order, for "
             "data.name 'mmu_pairs'")),
    "data.crossmatch_radius_arcsec": (POSITIVE,),
    "data.image_transform": (one_of("stein_rgb", "astroclip_rgb", "raw"),),
    "data.spectrum_norm": (one_of("zscore", "none"),),
    "data.nan_policy": (one_of("raise", "mask"),),
    "data.duplicate_policy": (one_of("raise", "drop"),),
    "data.provabgs_properties_path": (Rule(  # only the builder configs that read it
        lambda v, s: v is None or (s.data.name, s.data.builder_config) == (
            "astroclip_desi", "provabgs_properties") or (
            s.data.name == "mmu_pairs" and s.data.builder_config.endswith("_properties")),
        "None unless data.name is 'astroclip_desi' with data.builder_config "
        "'provabgs_properties', or 'mmu_pairs' with a data.builder_config ending in "
        "'_properties' (the configs that read the desi_provabgs files)"),),
    "data.image_crop": (NON_NEGATIVE,),
    "data.num_workers": (NON_NEGATIVE,),
    "model.image_tower.kind": (one_of("resnet", "dinov2_vit"),),
    "model.spectrum_tower.kind": (one_of("spender", "specformer"),),
    "model.image_tower.dtype": (one_of("float32", "bfloat16"), compute_dtype_of("image_tower")),
    "model.spectrum_tower.dtype": (one_of("float32", "bfloat16"),
                                   compute_dtype_of("spectrum_tower")),
    "model.image_size": (Rule(lambda v, _: v > 0, "augment.crop or data.image_crop > 0: the "
                              "towers need a fixed image size"),),
    "model.image_head.kind": (one_of("mlp", "cross_attention"),),
    "model.image_head.out": (POSITIVE,),
    "model.image_head.hidden": (each(POSITIVE), mlp_of_cross_attention("image_head")),
    "model.image_head.num_heads": (head_count("image_head"),),
    "model.image_head.residual": (residual_only_across("image_head"),),
    "model.spectrum_head.kind": (one_of("mlp", "cross_attention"),),
    "model.spectrum_head.out": (POSITIVE,),
    "model.spectrum_head.hidden": (each(POSITIVE), mlp_of_cross_attention("spectrum_head")),
    "model.spectrum_head.num_heads": (head_count("spectrum_head"),),
    "model.spectrum_head.residual": (residual_only_across("spectrum_head"),),
    "model.logit_scale": (POSITIVE,),
    "augment.crop": (NON_NEGATIVE,),
    "augment.blur_sigma_max": (NON_NEGATIVE,),
    "augment.noise_std_max": (NON_NEGATIVE,),
    "augment.spectrum_noise_scale": (NON_NEGATIVE,),
    "feature_cache.image_draws": (POSITIVE,),
    "feature_cache.spectrum_draws": (POSITIVE,),
    "feature_cache.dtype": (one_of("float16", "float32"),),
    "feature_cache.batch_size": (POSITIVE,),
    "train.batch_size": (POSITIVE,),
    "train.val_batch_size": (POSITIVE,),
    "train.epochs": (POSITIVE,),
    "train.learning_rate": (POSITIVE,),
    "train.adam_b1": (MOMENTUM,),
    "train.adam_b2": (MOMENTUM,),
    "train.adam_eps": (POSITIVE,),
    "train.plateau_factor": (UNIT_OPEN,),
    "train.plateau_patience": (NON_NEGATIVE,),
    "train.plateau_threshold": (NON_NEGATIVE,),
    "train.schedule": (one_of("plateau", "warmup_cosine"),),
    "train.weight_decay": (NON_NEGATIVE, Rule(lambda v, s: v == 0 or s.train.schedule !=
                                              "plateau", "0 with train.schedule 'plateau' "
                                              "(Adam); AdamW is 'warmup_cosine'")),
    "train.warmup_steps": (NON_NEGATIVE,),
    "train.cosine_steps": (NON_NEGATIVE,),
    "train.clip_norm": (NON_NEGATIVE,),
    "train.keep_checkpoints": (POSITIVE,),
    "train.log_every_steps": (POSITIVE,),
    "eval.batch_size": (POSITIVE,),
    "eval.checkpoint": (_plain(lambda v: v in ("best", "latest", "initial") or v.isdigit(),
                               "'best', 'latest', a step number or 'initial' (the model "
                               "as the config builds it)"),),
    "eval.knn_neighbors": (POSITIVE,),
    "eval.knn_holdout": (POSITIVE,),
    "eval.knn_holdout_fraction": (UNIT_OPEN,),
    "eval.seed": (NON_NEGATIVE,),
    "eval.search_k": (POSITIVE,),
    "eval.search_queries": (POSITIVE,),
    "eval.umap_neighbors": (POSITIVE,),
    "eval.dbscan_eps": (POSITIVE,),
    "eval.dbscan_min_samples": (POSITIVE,),
    "eval.dbscan_scale": (one_of("raw", "density"),),
    "eval.kmeans_k_min": (_plain(lambda v: v >= 2, "a value >= 2"),),
    "eval.kmeans_k_max": (at_least("eval.kmeans_k_min"),),
    "eval.embed_chunk_rows": (POSITIVE,),
    "probe.feature_sets": (NOT_EMPTY, names_in("astroclip_jax.evaluation.feature_sets",
                                                "FEATURE_SETS", subset=True)),
    "probe.curve_features": (names_in("astroclip_jax.evaluation.feature_sets", "FEATURE_SETS",
                                      subset=True),),
    "probe.fractions": (NOT_EMPTY, each(_plain(lambda v: 0 < v <= 1, "a value in (0, 1]"))),
    "probe.seeds": (NOT_EMPTY,),
    "probe.knn_v2_neighbors": (POSITIVE,),
    "probe.ridge_alphas": (NOT_EMPTY, each(POSITIVE)),
    "probe.val_fraction": (UNIT_OPEN,),
    "probe.mlp_hidden": (each(POSITIVE),),
    "probe.mlp_dropout": (_plain(lambda v: 0 <= v < 1, "a value in [0, 1)"),),
    "probe.mlp_learning_rate": (POSITIVE,),
    "probe.mlp_batch_size": (POSITIVE,),
    "probe.mlp_max_epochs": (POSITIVE,),
    "probe.mlp_patience": (POSITIVE,),
    "probe.supervised": (_plain(lambda v: set(v) <= {"image", "spectrum", "photometry"},
                                "a subset of ('image', 'spectrum', 'photometry')"),),
    "probe.supervised_epochs": (POSITIVE,),
    "probe.supervised_photometry_epochs": (POSITIVE,),
    "probe.supervised_batch_size": (POSITIVE,),
    "probe.supervised_learning_rate": (POSITIVE,),
    "morphology.enabled": (one_of(True, False),),
    "morphology.labels": (one_of("fraction", "debiased"),),
    "morphology.min_votes": (POSITIVE,),
    "morphology.min_answers": (POSITIVE,),
    "morphology.hidden": (NOT_EMPTY, each(POSITIVE)),
    "morphology.dropout": (_plain(lambda v: 0 <= v < 1, "a value in [0, 1)"),),
    "morphology.epochs": (POSITIVE,),
    "morphology.learning_rate": (POSITIVE,),
    "morphology.batch_size": (POSITIVE,),
    "morphology.val_fraction": (UNIT_OPEN,),
    "morphology.weighted_sampling": (one_of(True, False),),
    "morphology.standardise": (one_of(True, False),),
    "morphology.feature_sets": (NOT_EMPTY, names_in("astroclip_jax.evaluation.feature_sets",
                                                     "FEATURE_SETS", subset=True)),
    "posterior.enabled": (one_of(True, False),),
    "posterior.ensemble": (POSITIVE,),
    "posterior.epochs": (POSITIVE,),
    "posterior.batch_size": (POSITIVE,),
    "posterior.learning_rate": (POSITIVE,),
    "posterior.min_learning_rate": (NON_NEGATIVE,),
    "posterior.knots": (_plain(lambda v: v >= 2, "a value >= 2"),),
    "posterior.bound": (POSITIVE,),
    "posterior.blocks": (_plain(lambda v: len(v) == 2 and 1 <= v[0] <= v[1],
                                "(lo, hi) with 1 <= lo <= hi"),),
    "posterior.hidden": (_plain(lambda v: len(v) == 2 and 1 <= v[0] <= v[1],
                                "(lo, hi) with 1 <= lo <= hi"),),
    "posterior.layers": (POSITIVE,),
    "posterior.val_fraction": (UNIT_OPEN,),
    "posterior.joint": (one_of(True, False),),
    "posterior.feature_sets": (NOT_EMPTY, names_in("astroclip_jax.evaluation.feature_sets",
                                                    "FEATURE_SETS", subset=True)),
    "posterior.show": (POSITIVE,),
    "index.exact_max": (POSITIVE,),
    "index.pq_dims_per_code": (POSITIVE,),
    "index.recall_target": (_plain(lambda v: 0 < v <= 1, "a value in (0, 1]"),),
    "index.recall_queries": (POSITIVE,),
    "index.k_factor_max": (POSITIVE,),
    "index.train_rows": (POSITIVE,),
    "serve.host": (_plain(bool, "a host name or address"),),
    "serve.port": (_plain(lambda v: 0 <= v <= 65535, "a port in [0, 65535]"),),
    "serve.max_k": (POSITIVE,),
    "serve.k": (POSITIVE, at_most("serve.max_k")),
    "serve.max_upload_bytes": (POSITIVE,),
    "serve.duplicate_arcsec": (NON_NEGATIVE,),
    "serve.allowed_hosts": (each(_plain(lambda h: h.split() == [h], "a host name without "
                                                                    "spaces")),),
    "spender_pretrain.encoder_size": (names_in("astroclip_jax.models.spender", "SIZES"),),
    "spender_pretrain.decoder_size": (names_in("astroclip_jax.models.spender_autoencoder",
                                                "DECODER_SIZES"),),
    "spender_pretrain.activation": (one_of("speculator", "leaky_relu"),),
    "spender_pretrain.z_max": (POSITIVE,),
    "spender_pretrain.restframe_bins": (_plain(lambda v: v == 0 or v >= 2,
                                               "0 (the default grid) or at least 2 bins"),),
    "spender_pretrain.clip_norm": (POSITIVE,),
    "spender_pretrain.schedule_per": (one_of("epoch", "step"),),
    "spender_pretrain.similarity_amp": (NON_NEGATIVE,),
    "spender_pretrain.consistency_amp": (NON_NEGATIVE,),
    "spender_pretrain.augment_z_max": (POSITIVE,),
    "moco.kind": (one_of("resnet", "dinov2_vit"),),
    "moco.size": (Rule(lambda v, s: v in _module_table(
        {"resnet": "astroclip_jax.models.resnet", "dinov2_vit": "astroclip_jax.models.vit"}[
            s.moco.kind], "SIZES"), "one of the sizes of moco.kind's module", imports=True),),
    "moco.queue_size": (multiple_of("train.batch_size"),),
    "moco.temperature": (POSITIVE,),
    "moco.encoder_momentum": (MOMENTUM,),
    "moco.sgd_momentum": (MOMENTUM,),
    "moco.weight_decay": (NON_NEGATIVE,),
    "moco.cosine_epochs": (NON_NEGATIVE,),
    "moco.bn_groups": (divisor_of("train.batch_size"),),
    "moco.crop": (POSITIVE,),
    # A view is cut from the input crop (the jitter shrinks to fit): it must not be larger.
    "moco.input_crop": (Rule(lambda v, s: v == 0 or v >= s.moco.crop,
                             "0 (the whole cutout) or a value >= moco.crop"),),
    "moco.jitter": (NON_NEGATIVE,),
    "specformer_pretrain.size": (names_in("astroclip_jax.models.specformer", "SIZES"),),
    "specformer_pretrain.mask_chunks": (POSITIVE,),
    "specformer_pretrain.mask_width": (POSITIVE, Rule(
        lambda v, s: (2 * s.specformer_pretrain.mask_chunks - 1) * v <= _spectrum_tokens(s),
        "a width whose chunks fit the spectrum's tokens with a gap of one width between them "
        "(upstream's check)", imports=True)),
}


def _spectrum_tokens(settings: "RunSettings") -> int:
    """SpecFormer's token count for the run's spectra."""
    return _module_table("astroclip_jax.models.specformer", "num_tokens")(
        settings.model.spectrum_length)


def _field(settings: Any, name: str) -> Any:
    value = settings
    for part in name.split("."):
        value = getattr(value, part)
    return value


def check(settings: RunSettings, mode: str | None = None) -> None:
    """Every rule of `RULES`, in table order (those that import: for the sections `mode`
    needs); ConfigError names the first field at fault."""
    needed = MODE_SECTIONS.get(mode, ())
    for name, rules in RULES.items():
        section = name.split(".")[0]
        if getattr(settings, section) is None:  # an absent optional section
            continue
        value = _field(settings, name)
        for rule in rules:
            if rule.imports and section not in needed:
                continue
            if not rule.test(value, settings):
                raise ConfigError(f"config field {name} is {value!r}; expected {rule.expected}")


# ------------------------------------------------------------------------------- resuming

# What may differ between a run's saved config and the one it resumes with (dotted prefixes):
# how long, how it is logged, kept and evaluated, where files are, and which of the two
# equivalent train steps runs. Everything else (data, model, augmentation, batch size,
# optimiser, seed) defines the run and must stay.
CHANGEABLE_ON_RESUME = ("train.epochs", "train.log_every_steps", "train.keep_checkpoints",
                        "train.val_batch_size", "eval.", "probe.", "index.", "serve.",
                        "feature_cache.", "data.num_workers",
                        "data.data_dir", "data.manual_dir", "data.provabgs_path",
                        "data.provabgs_properties_path", "data.rebuild",
                        "data.mmu_desi_dir", "data.mmu_legacysurvey_dir",
                        "multihost")


def _dotted(tree: Mapping[str, Any]) -> dict[str, Any]:
    """{"train.epochs": 80, ...}: config field names as the command line writes them."""
    return {name.replace(flat_tree.SEP, "."): value
            for name, value in flat_tree.flatten(tree).items()}


def changes_on_resume(saved: Mapping[str, Any], current: Mapping[str, Any]
                      ) -> dict[str, tuple[Any, Any]]:
    """{field: (saved value, new value)} of the allowed changes between two config JSONs;
    raises ConfigError naming the first field that may not change (with both values)."""
    old, new = _dotted(saved), _dotted(current)
    changes = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)}
    for name, (was, now) in changes.items():
        if name not in old:  # a field newer than the run: it takes its value from now on
            continue
        if not any(name == p or (p.endswith(".") and name.startswith(p))
                   for p in CHANGEABLE_ON_RESUME):
            raise ConfigError(f"config field {name} is {now!r} but the run in this work "
                              f"directory was started with {was!r}; it cannot change on resume "
                              "(use a new work directory)")
    return changes


def with_missing_fields(stored: Mapping[str, Any], defaults: Mapping[str, Any]) -> Any:
    """`stored` (a config a checkpoint or export holds) with every field it lacks taken from
    `defaults`: a run written before a field existed still resolves, to the field's default
    (which keeps the behaviour from before the field existed)."""
    import ml_collections

    merged = config_json(defaults)

    def overlay(into: dict, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, Mapping) and isinstance(into.get(key), dict):
                overlay(into[key], value)
            else:
                into[key] = value

    overlay(merged, config_json(stored))
    return ml_collections.ConfigDict(merged)


def config_json(config: Any) -> dict[str, Any]:
    """The config as JSON-able dicts (what checkpoints and `config.json` store): resolving it
    gives back the same settings."""
    import json

    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config))
