"""The config, resolved once per mode into frozen, typed settings that the code below receives.

    settings = settings_lib.resolve(config)     # at the top of every mode's `run`
    settings.data.image_crop, settings.model.image_size, settings.train.batch_size, ...

Every default lives in the config file (`configs/spender.py`); nothing here or below invents
one. A field the config lacks is an error that names it (`config field data.grid is missing`),
and values are converted to the declared type (JSON turns tuples into lists, so a config read
back from a checkpoint resolves to the same settings as the one that wrote it).

Every value is checked here too (sizes > 0, ranges, choices), so a mode stops with one line
naming the field before any work; `changes_on_resume` says which fields may differ when a run
is resumed.

Derived values are computed here, once, instead of by each reader:
  model.image_size       the side of the images the towers see (augment.crop, else data.image_crop)
  model.spectrum_length  pixels of the configured wavelength grid
  train.trainable        the trainable-name regexes, plus the logit scale's when it is learned
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

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
    grid: str  # wavelength grid of the spectra
    image_crop: int  # host centre crop; 0 keeps the whole cutout
    image_transform: str  # "stein_rgb" | "raw"
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
    kind: str  # "resnet" | "spender"
    size: str  # a named size of the module ("resnet50", "small", "test", ...)
    weights: str | None  # a converted tower directory; None = random init at `size`

    def __post_init__(self):
        # "" on the command line (`--config.model.spectrum_tower.weights=`) means random too:
        # absl cannot pass None to a string field.
        if self.weights == "":
            object.__setattr__(self, "weights", None)


@dataclasses.dataclass(frozen=True)
class HeadSettings:
    hidden: tuple[int, ...]
    out: int
    init_from_tower: bool  # start from the tower's own MoCo head (image head only)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    image_tower: TowerSettings
    spectrum_tower: TowerSettings
    image_head: HeadSettings
    spectrum_head: HeadSettings
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
    checkpoint: str  # "best" | "latest" | a step number
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
    feature_sets: tuple[str, ...]  # what is probed (evaluation/probe.py FEATURE_SETS)
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

    size: str  # models.resnet.SIZES
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
    index: IndexSettings | None = None  # None likewise (used by search and serve)
    serve: ServeSettings | None = None
    spender_pretrain: SpenderPretrainSettings | None = None  # None likewise
    moco: MocoSettings | None = None  # None likewise


# Fields computed from others (not read from the config).
_DERIVED = {"ModelSettings": ("grid", "image_size", "spectrum_length")}
# Fields that live in another section of the config file than in the settings.
_MOVED = {("ModelSettings", "logit_scale"): "train", ("ModelSettings", "learn_logit_scale"): "train"}


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
        if value is None:
            raise ConfigError(f"config field {where} must be a {hint.__name__}, got None")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config field {where} must be a {hint.__name__}, got {value!r}") \
                from None
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


def resolve(config: Mapping[str, Any]) -> RunSettings:
    """The typed settings of a config (a ConfigDict, or the dict a checkpoint stores)."""
    data = DataSettings(**_read(DataSettings, _get(config, "data", "config"), "data"))
    if data.grid not in wavelength_grids.GRIDS:
        raise ConfigError(f"config field data.grid is {data.grid!r}; expected one of "
                          f"{sorted(wavelength_grids.GRIDS)}")
    augment = AugmentSettings(**_read(AugmentSettings, _get(config, "augment", "config"),
                                      "augment"))
    model_section = _get(config, "model", "config")
    model_values = _read(ModelSettings, model_section, "model", root=config)
    model = ModelSettings(
        **model_values, grid=data.grid, image_size=augment.crop or data.image_crop,
        spectrum_length=len(wavelength_grids.wave(data.grid)))
    if model.image_size <= 0:
        raise ConfigError("config fields augment.crop and data.image_crop are both 0: the "
                          "towers need a fixed image size")
    train_values = _read(TrainSettings, _get(config, "train", "config"), "train")
    if model.learn_logit_scale:  # a learned scale always trains
        train_values["trainable"] += (r"logit_scale/.*",)
    settings = RunSettings(
        seed=_convert(_get(config, "seed", "config"), int, "seed"),
        multihost=_convert(_get(config, "multihost", "config"), bool, "multihost"),
        data=data, model=model, augment=augment,
        feature_cache=FeatureCacheSettings(**_read(
            FeatureCacheSettings, _get(config, "feature_cache", "config"), "feature_cache")),
        train=TrainSettings(**train_values),
        eval=EvalSettings(**_read(EvalSettings, _get(config, "eval", "config"), "eval")),
        probe=(ProbeSettings(**_read(ProbeSettings, config["probe"], "probe"))
               if "probe" in config else None),
        index=(IndexSettings(**_read(IndexSettings, config["index"], "index"))
               if "index" in config else None),
        serve=(ServeSettings(**_read(ServeSettings, config["serve"], "serve"))
               if "serve" in config else None),
        spender_pretrain=(SpenderPretrainSettings(**_read(
            SpenderPretrainSettings, config["spender_pretrain"], "spender_pretrain"))
            if "spender_pretrain" in config else None),
        moco=(MocoSettings(**_read(MocoSettings, config["moco"], "moco"))
              if "moco" in config else None),
    )
    _validate(settings)
    return settings


# ------------------------------------------------------------------------------- validation

# Fields that must be > 0, >= 0, or one of a few values: checked before any work starts.
_POSITIVE = ("train.batch_size", "train.val_batch_size", "train.epochs", "train.learning_rate",
             "train.keep_checkpoints", "train.log_every_steps", "eval.batch_size",
             "eval.knn_neighbors", "eval.knn_holdout", "eval.search_k", "eval.search_queries",
             "eval.umap_neighbors", "eval.dbscan_eps", "eval.dbscan_min_samples",
             "eval.embed_chunk_rows",
             "feature_cache.batch_size", "feature_cache.image_draws",
             "feature_cache.spectrum_draws", "model.logit_scale", "model.image_head.out",
             "model.spectrum_head.out")
_NON_NEGATIVE = ("data.image_crop", "data.num_workers", "augment.crop", "augment.blur_sigma_max",
                 "augment.noise_std_max", "augment.spectrum_noise_scale",
                 "train.plateau_patience", "train.plateau_threshold")
_CHOICES = {
    "data.name": ("synthetic_desi", "astroclip_desi"),
    "data.image_transform": ("stein_rgb", "raw"),
    "data.spectrum_norm": ("zscore", "none"),
    "data.nan_policy": ("raise", "mask"),
    "data.duplicate_policy": ("raise", "drop"),
    "eval.dbscan_scale": ("raw", "density"),
    "feature_cache.dtype": ("float16", "float32"),
    "model.image_tower.kind": ("resnet",),
    "model.spectrum_tower.kind": ("spender",),
}


def _field(settings: RunSettings, name: str) -> Any:
    value = settings
    for part in name.split("."):
        value = getattr(value, part)
    return value


def _validate(settings: RunSettings) -> None:
    for name in _POSITIVE:
        if not _field(settings, name) > 0:
            raise ConfigError(f"config field {name} is {_field(settings, name)!r}; it must be > 0")
    for name in _NON_NEGATIVE:
        if not _field(settings, name) >= 0:
            raise ConfigError(f"config field {name} is {_field(settings, name)!r}; it must be >= 0")
    for name, choices in _CHOICES.items():
        if _field(settings, name) not in choices:
            raise ConfigError(f"config field {name} is {_field(settings, name)!r}; expected one "
                              f"of {list(choices)}")
    if not 0 < settings.train.plateau_factor < 1:
        raise ConfigError(f"config field train.plateau_factor is "
                          f"{settings.train.plateau_factor!r}; it must be in (0, 1)")
    if not 0 < settings.eval.knn_holdout_fraction < 1:
        raise ConfigError(f"config field eval.knn_holdout_fraction is "
                          f"{settings.eval.knn_holdout_fraction!r}; it must be in (0, 1)")
    if settings.probe is not None:
        _validate_probe(settings.probe)
    _validate_index_and_serve(settings.index, settings.serve)
    which = settings.eval.checkpoint
    if which not in ("best", "latest") and not which.isdigit():
        raise ConfigError(f"config field eval.checkpoint is {which!r}; expected 'best', "
                          "'latest' or a step number")
    if settings.eval.kmeans_k_min < 2 or settings.eval.kmeans_k_max < settings.eval.kmeans_k_min:
        raise ConfigError(f"config fields eval.kmeans_k_min/kmeans_k_max are "
                          f"{settings.eval.kmeans_k_min}/{settings.eval.kmeans_k_max}; they must "
                          "satisfy 2 <= k_min <= k_max")


def _validate_probe(probe: ProbeSettings) -> None:
    for name in ("knn_v2_neighbors", "mlp_learning_rate", "mlp_batch_size", "mlp_max_epochs",
                 "mlp_patience", "supervised_epochs", "supervised_photometry_epochs",
                 "supervised_batch_size",
                 "supervised_learning_rate"):
        if not getattr(probe, name) > 0:
            raise ConfigError(f"config field probe.{name} is {getattr(probe, name)!r}; it must "
                              "be > 0")
    checks = {"fractions": all(0 < f <= 1 for f in probe.fractions) and probe.fractions,
              "seeds": bool(probe.seeds), "ridge_alphas": all(a > 0 for a in probe.ridge_alphas)
              and probe.ridge_alphas, "val_fraction": 0 < probe.val_fraction < 1,
              "mlp_dropout": 0 <= probe.mlp_dropout < 1,
              "supervised": set(probe.supervised) <= {"image", "spectrum", "photometry"}}
    expected = {"fractions": "values in (0, 1]", "seeds": "at least one seed",
                "ridge_alphas": "values > 0", "val_fraction": "a value in (0, 1)",
                "mlp_dropout": "a value in [0, 1)",
                "supervised": "a subset of ('image', 'spectrum', 'photometry')"}
    for name, ok in checks.items():
        if not ok:
            raise ConfigError(f"config field probe.{name} is {getattr(probe, name)!r}; expected "
                              f"{expected[name]}")


def _validate_index_and_serve(index: IndexSettings | None, serve: ServeSettings | None) -> None:
    checks = {}
    if index is not None:
        checks.update({f"index.{name}": (getattr(index, name) > 0, "> 0") for name in
                       ("exact_max", "pq_dims_per_code", "recall_queries", "k_factor_max",
                        "train_rows")})
        checks["index.recall_target"] = (0 < index.recall_target <= 1, "in (0, 1]")
    if serve is not None:
        checks["serve.port"] = (0 <= serve.port <= 65535, "in [0, 65535]")
        checks["serve.k"] = (0 < serve.k <= serve.max_k, "in [1, serve.max_k]")
        checks["serve.max_upload_bytes"] = (serve.max_upload_bytes > 0, "> 0")
        checks["serve.duplicate_arcsec"] = (serve.duplicate_arcsec >= 0, ">= 0")
        checks["serve.host"] = (bool(serve.host), "a host name or address")
        checks["serve.allowed_hosts"] = (all(h.split() == [h] for h in serve.allowed_hosts),
                                         "host names without spaces")
    for name, (ok, expected) in checks.items():
        if not ok:
            value = getattr(index if name.startswith("index.") else serve, name.split(".")[1])
            raise ConfigError(f"config field {name} is {value!r}; it must be {expected}")


# ------------------------------------------------------------------------------- resuming

# What may differ between a run's saved config and the one it resumes with (dotted prefixes):
# how long, how it is logged, kept and evaluated, where files are, and which of the two
# equivalent train steps runs. Everything else (data, model, augmentation, batch size,
# optimiser, seed) defines the run and must stay.
CHANGEABLE_ON_RESUME = ("train.epochs", "train.log_every_steps", "train.keep_checkpoints",
                        "train.val_batch_size", "eval.", "probe.", "index.", "serve.",
                        "feature_cache.", "data.num_workers",
                        "data.data_dir", "data.manual_dir", "data.provabgs_path", "data.rebuild",
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
