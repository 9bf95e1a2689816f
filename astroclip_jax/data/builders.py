"""tfds builders writing ArrayRecord files: `synthetic_desi` and `astroclip_desi`.

Preparing and reading need no TensorFlow: every feature is a `tfds.features.Tensor` stored as
raw bytes (`Encoding.BYTES`: 7x faster to write than the default float lists, same size), and the
files are read back with `tfds.data_source`. Keys only fix the (hashed) record order.

    synthetic_desi/<config>   configs: tiny 256, small 4096, default 16384, large 65536 pairs on
                              the DESI grid; tiny_sdss, small_sdss on the SDSS grid.
                              First 80 % of galaxies (by index) train, the rest test.
    astroclip_desi/<config>   the upstream `astroclip_desi.1.1.5.h5`; "joint" as upstream,
                              "provabgs" adds Z_HP and log M* from the PROVABGS catalogue,
                              "provabgs_properties" also log_z_mw, tage_mw and log_ssfr from
                              the Multimodal Universe desi_provabgs files.

Both write the same Batch-contract fields: image (S, S, 3) flux, spectrum (L,), targetid,
redshift, z_hp, log_mstar (NaN when unknown), has_props. `synthetic_desi` also stores `ivar`
(L,), the inverse variance of the noise in `spectrum` (31 KB per example on the DESI grid; read
only by Spender pretraining: `pipeline.read_records` decodes just the fields asked for), the
artefact flag and the catalogue columns. The AstroCLIP file has no inverse variances.

Each prepared dataset records its recipe in its metadata (`metadata["recipe"]`): the identity of
every source file it was made from (real path, size, modification time, and the sha256 of a
file up to `HASH_LIMIT` bytes) and the options that change its content (`options()`), so that
`prepare` can tell a dataset made from other inputs than the config names now.
"""

import dataclasses
import logging
import os
import time

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from astroclip_jax import errors
from astroclip_jax import files
from astroclip_jax import wavelength_grids as grids
from astroclip_jax.data import astroclip_desi, provabgs, provabgs_mmu, synthetic_votes

TRAIN_FRACTION = 0.8
_BYTES = tfds.features.Encoding.BYTES
HASH_LIMIT = 256 << 20  # source files up to this size are identified by their sha256 too


def file_identity(path: str) -> dict:
    """Real path, size and modification time of a file; its sha256 when it is small."""
    real = os.path.realpath(os.fspath(path))
    stat = os.stat(real)
    out = {"path": real, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
           "modified": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stat.st_mtime))}
    if stat.st_size <= HASH_LIMIT:
        out["sha256"] = files.sha256_file(real)
    return out


def spill_shuffle_buckets_without_tensorflow() -> None:
    """Lets tfds prepare splits larger than its 1 GB in-memory shuffle buffer without TensorFlow.

    Called by `prepare` just before a dataset is written (not on import: reading needs no
    patch, and importing this module should change nothing in tfds).

    Past that size tfds' Shuffler spills its buckets to local temporary files through
    `tf.io.gfile` (its only TensorFlow use on the ArrayRecord path). Without TensorFlow those
    calls go to the Python file API instead; the bytes written and read back are identical.
    """
    import importlib.util
    import types

    from tensorflow_datasets.core import shuffle

    if importlib.util.find_spec("tensorflow") is not None:
        return
    gfile = types.SimpleNamespace(GFile=open, exists=os.path.exists, remove=os.remove)
    shuffle.tf = types.SimpleNamespace(
        io=types.SimpleNamespace(gfile=gfile),
        errors=types.SimpleNamespace(ResourceExhaustedError=MemoryError))


def _tensor(shape, dtype):
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=_BYTES)


def _common_features(image_size: int, spectrum_length: int) -> dict:
    """The fields the pipeline reads (ARCHITECTURE's Batch contract, before preprocessing)."""
    return {
        "image": _tensor((image_size, image_size, 3), np.float32),
        "spectrum": _tensor((spectrum_length,), np.float32),
        "targetid": tfds.features.Scalar(dtype=np.int64),
        "redshift": tfds.features.Scalar(dtype=np.float32),
        "z_hp": tfds.features.Scalar(dtype=np.float32),
        "log_mstar": tfds.features.Scalar(dtype=np.float32),
        "has_props": tfds.features.Scalar(dtype=np.bool_),
    }


# ---------------------------------------------------------------------------------------------
# Synthetic galaxies
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SyntheticDesiConfig(tfds.core.BuilderConfig):
    """How many pairs, on which wavelength grid, from which generator seed."""
    num_pairs: int = 16384
    grid: str = "desi"
    image_size: int = 152
    seed: int = 0
    block_size: int = 128  # galaxies generated per call (memory: ~40 MB per 128 at 152 px)


# Galaxy Zoo DECaLS votes (data/synthetic_votes.py): each question's total and answer fractions,
# under the published catalogue's column names.
_SYNTHETIC_VOTES = tuple(synthetic_votes.feature_names())
_SYNTHETIC_EXTRA = ("log_ssfr", "bulge_fraction", "r_eff_kpc", "axis_ratio", "position_angle",
                    "mag_g", "mag_r", "mag_z", "log_z_mw", "tage_mw") + _SYNTHETIC_VOTES


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common base: this file as the builder's code path, and the recipe a dataset records.

    tfds otherwise derives the path through `importlib_resources` (an optional backport not
    installed here) for a package that is not a zip; it only looks for a checksums file there.
    """

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def options(self) -> dict:
        """What, besides the source files, decides the content of the dataset."""
        return {}

    def source_files(self, manual_dir: str | None) -> dict:
        """{role: path} of the files a build would read now (path None: not found there)."""
        del manual_dir
        return {}

    def recipe(self, sources: dict) -> dict:
        """The record of what the dataset is made from: `sources` {role: path} identified."""
        return {"sources": {role: None if path is None else file_identity(path)
                            for role, path in sources.items()},
                "options": self.options()}


class SyntheticDesi(_Builder):
    """Synthetic image-spectrum pairs from `astroclip_jax.data.synthetic.generate`."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Adds `ivar` (L,): the inverse variance of each spectrum's noise.",
                     "1.2.0": "Adds the mass-weighted stellar metallicity `log_z_mw` (log10 Z) "
                              "and age `tage_mw` (Gyr), and Galaxy Zoo DECaLS votes "
                              "(`<question>_total-votes`, `<question>_<answer>_fraction`); "
                              "images and spectra unchanged."}
    BUILDER_CONFIGS = [
        SyntheticDesiConfig(name="tiny", num_pairs=256, description="256 pairs, DESI grid"),
        SyntheticDesiConfig(name="small", num_pairs=4096, description="4096 pairs, DESI grid"),
        SyntheticDesiConfig(name="default", num_pairs=16384, description="16384 pairs, DESI"),
        SyntheticDesiConfig(name="large", num_pairs=65536, description="65536 pairs, DESI"),
        SyntheticDesiConfig(name="tiny_sdss", num_pairs=256, grid="sdss",
                            description="256 pairs, SDSS grid"),
        SyntheticDesiConfig(name="small_sdss", num_pairs=4096, grid="sdss",
                            description="4096 pairs, SDSS grid"),
    ]
    DEFAULT_CONFIG_NAME = "small"

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        length = grids.wave(cfg.grid).size
        features = _common_features(cfg.image_size, length)
        features["ivar"] = _tensor((length,), np.float32)
        features["artefact"] = tfds.features.Scalar(dtype=np.int8)
        for name in _SYNTHETIC_EXTRA:
            features[name] = tfds.features.Scalar(dtype=np.float32)
        return self.dataset_info_from_configs(
            description="Synthetic galaxies: g, r, z flux images and spectra of the same "
                        "galaxy, with its physical properties (every galaxy has them).",
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(grid=cfg.grid, seed=cfg.seed),
        )

    def options(self) -> dict:
        cfg = self.builder_config  # block_size only sets how many galaxies one call makes
        return {f"builder_config.{name}": getattr(cfg, name)
                for name in ("num_pairs", "grid", "image_size", "seed")}

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        self.info.metadata["recipe"] = self.recipe({})
        n = self.builder_config.num_pairs
        n_train = int(TRAIN_FRACTION * n)
        return {"train": self._generate_examples(0, n_train),
                "test": self._generate_examples(n_train, n)}

    def _generate_examples(self, start: int, stop: int):
        from astroclip_jax.data import synthetic  # pylint: disable=import-outside-toplevel
        cfg = self.builder_config
        blocks = range(start, stop, cfg.block_size)
        for lo in tqdm.tqdm(blocks, desc=f"synthetic_desi/{cfg.name} [{start}, {stop})",
                            unit="block", leave=False):
            hi = min(lo + cfg.block_size, stop)
            batch = synthetic.generate(hi - lo, seed=cfg.seed, start=lo, grid=cfg.grid,
                                       image_size=cfg.image_size)
            for j in range(hi - lo):
                example = {
                    "image": batch["image"][j],
                    "spectrum": batch["spectrum"][j],
                    "ivar": batch["ivar"][j],
                    "targetid": batch["targetid"][j],
                    "redshift": batch["redshift"][j],
                    "z_hp": batch["redshift"][j],
                    "log_mstar": batch["log_mstar"][j],
                    "has_props": True,
                    "artefact": batch["artefact"][j],
                }
                for name in _SYNTHETIC_EXTRA:
                    example[name] = batch[name][j]
                yield lo + j, example


# ---------------------------------------------------------------------------------------------
# AstroCLIP's cross-matched DESI Legacy Survey x DESI EDR file
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class AstroclipDesiConfig(tfds.core.BuilderConfig):
    """Whether to join the PROVABGS catalogue (and the Multimodal Universe desi_provabgs files)."""
    join_provabgs: bool = False
    join_properties: bool = False  # log_z_mw, tage_mw, log_ssfr from data/provabgs_mmu.py


class AstroclipDesi(_Builder):
    """AstroCLIP's `astroclip_desi.1.1.5.h5`, split per group as upstream (first 80 % train).

    Extra constructor arguments (used when preparing): `provabgs_path` (default: the catalogue
    in the manual dir), `provabgs_properties_path` (the desi_provabgs files of config
    "provabgs_properties"; default: `desi_provabgs/` in the manual dir), `nan_policy` ("raise"
    or "mask") and `duplicate_policy` ("raise" or "drop": repeated targetids are an error, or
    all but the first occurrence are dropped and counted in `metadata["duplicates"]`).
    """

    VERSION = tfds.core.Version("1.1.5")
    RELEASE_NOTES = {"1.1.5": "The upstream file version."}
    BUILDER_CONFIGS = [
        AstroclipDesiConfig(name="joint", description="Images, spectra, redshifts, targetids."),
        AstroclipDesiConfig(name="provabgs", join_provabgs=True,
                            description="As joint, plus PROVABGS Z_HP and log stellar mass."),
        AstroclipDesiConfig(name="provabgs_properties", join_provabgs=True, join_properties=True,
                            description="As provabgs, plus log Z_MW, TAGE_MW and log sSFR from "
                                        "the Multimodal Universe desi_provabgs files."),
    ]
    DEFAULT_CONFIG_NAME = "joint"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Place `{astroclip_desi.FILENAME}` (about 60 GB, from {astroclip_desi.URL}) in the manual
    directory (`data.manual_dir`, default <data_dir>/downloads/manual/). For the "provabgs"
    config also place `{provabgs.FILENAME}` there (DESI EDR VAC,
    https://data.desi.lbl.gov/public/edr/vac/edr/provabgs/v1.0/) or pass `provabgs_path`.
    For "provabgs_properties" also place the Multimodal Universe desi_provabgs files
    (`healpix=*/001-of-001.h5`) in `{provabgs_mmu.DIRNAME}/` there or pass
    `provabgs_properties_path`.
    """

    def __init__(self, *, provabgs_path: str | None = None, nan_policy: str = "raise",
                 duplicate_policy: str = "raise", provabgs_properties_path: str | None = None,
                 **kwargs):
        astroclip_desi.check_nan_policy(nan_policy)
        astroclip_desi.check_duplicate_policy(duplicate_policy)
        self._provabgs_path = provabgs_path
        self._properties_path = provabgs_properties_path
        self._nan_policy = nan_policy
        self._duplicate_policy = duplicate_policy
        super().__init__(**kwargs)

    def options(self) -> dict:
        return {"data.nan_policy": self._nan_policy,
                "data.duplicate_policy": self._duplicate_policy}

    def source_files(self, manual_dir: str | None) -> dict:
        def in_manual_dir(filename):
            path = os.path.join(os.fspath(manual_dir), filename) if manual_dir else None
            return path if path and os.path.isfile(path) else None
        out = {"astroclip": in_manual_dir(astroclip_desi.FILENAME)}
        if self.builder_config.join_provabgs:
            out["provabgs"] = (os.fspath(self._provabgs_path) if self._provabgs_path is not None
                               else in_manual_dir(provabgs.FILENAME))
        if self.builder_config.join_properties:
            root = (os.fspath(self._properties_path) if self._properties_path is not None
                    else os.path.join(os.fspath(manual_dir), provabgs_mmu.DIRNAME)
                    if manual_dir else None)
            out.update(_properties_sources(root))
        return out

    def _info(self) -> tfds.core.DatasetInfo:
        features = _common_features(astroclip_desi.IMAGE_SHAPE[0], astroclip_desi.SPECTRUM_LENGTH)
        if self.builder_config.join_properties:  # NaN where the desi_provabgs files lack a target
            for name in provabgs_mmu.PROPERTIES:
                features[name] = tfds.features.Scalar(dtype=np.float32)
        return self.dataset_info_from_configs(
            description="DESI Legacy Survey g, r, z cutouts cross-matched with DESI EDR spectra "
                        "(AstroCLIP v1), optionally with PROVABGS properties.",
            features=tfds.features.FeaturesDict(features),
            homepage="https://github.com/PolymathicAI/AstroCLIP",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        path = self._find_file(dl_manager)
        sources = {"astroclip": path}
        sizes = astroclip_desi.inspect(path)
        for split in astroclip_desi.SPLITS:
            astroclip_desi.check_split_not_empty(path, sizes, split)
        duplicates = astroclip_desi.find_duplicates(path, self._duplicate_policy)
        if duplicates.rows:
            logging.warning("AstroCLIP file %s: dropped %d row(s) whose targetid appeared "
                            "before (%d targetid(s); the first occurrence kept), e.g. %s", path,
                            duplicates.rows, duplicates.targetids, duplicates.examples)
        self.info.metadata["duplicates"] = {"policy": self._duplicate_policy,
                                            **duplicates.report()}
        props = {}
        if self.builder_config.join_provabgs:
            sources["provabgs"] = self._find_provabgs(dl_manager)
            catalog = provabgs.read_catalog(sources["provabgs"])
            # One join over both splits: "matches no target" is a property of the whole file.
            ids = {s: astroclip_desi.read_targetids(path, s,
                                                    duplicate_policy=self._duplicate_policy)
                   for s in astroclip_desi.SPLITS}
            everything = provabgs.join(catalog, np.concatenate(list(ids.values())))
            offset = 0
            for split in astroclip_desi.SPLITS:
                n = len(ids[split])
                props[split] = {"targetid": ids[split],
                                "z_hp": everything.z_hp[offset:offset + n],
                                "log_mstar": everything.log_mstar[offset:offset + n],
                                "has_props": everything.has_props[offset:offset + n]}
                offset += n
            self.info.metadata["provabgs_counts"] = everything.counts
            if self.builder_config.join_properties:  # Z_MW, TAGE_MW, sSFR (data/provabgs_mmu.py)
                root = self._find_properties(dl_manager)
                sources.update(_properties_sources(root))
                joined = provabgs_mmu.join(provabgs_mmu.read_properties(root),
                                           np.concatenate(list(ids.values())))
                offset = 0
                for split in astroclip_desi.SPLITS:
                    n = len(ids[split])
                    props[split].update({name: values[offset:offset + n]
                                         for name, values in joined.values.items()})
                    offset += n
                self.info.metadata["provabgs_properties_counts"] = joined.counts
        self.info.metadata["recipe"] = self.recipe(sources)
        self.info.metadata["nan_counts"] = {}
        return {split: self._generate_examples(path, split, props.get(split))
                for split in astroclip_desi.SPLITS}

    def _generate_examples(self, path: str, split: str, props):
        counts = self.info.metadata["nan_counts"].setdefault(split, {})
        offset = 0
        for block in astroclip_desi.iter_blocks(path, split, nan_policy=self._nan_policy,
                                                counts=counts,
                                                duplicate_policy=self._duplicate_policy):
            for j in range(len(block["row"])):
                k = offset + j
                if props and props["targetid"][k] != block["targetid"][j]:  # join misaligned
                    raise RuntimeError(f"PROVABGS join out of step at {split} example {k}")
                example = {
                    "image": block["image"][j],
                    "spectrum": block["spectrum"][j],
                    "targetid": block["targetid"][j],
                    "redshift": block["redshift"][j],
                    "z_hp": props["z_hp"][k] if props else np.float32(np.nan),
                    "log_mstar": props["log_mstar"][k] if props else np.float32(np.nan),
                    "has_props": bool(props["has_props"][k]) if props else False,
                }
                if self.builder_config.join_properties:
                    example.update({name: props[name][k] for name in provabgs_mmu.PROPERTIES})
                yield f"{block['group']}_{int(block['row'][j])}", example
            offset += len(block["row"])

    def _find_file(self, dl_manager) -> str:
        manual = _manual_file(dl_manager, astroclip_desi.FILENAME)
        if manual is not None:
            return manual
        try:
            return os.fspath(dl_manager.download(astroclip_desi.URL))
        except Exception as err:  # network errors come in many types
            raise errors.MissingInput(_one_line(
                f"{astroclip_desi.FILENAME} is not in the manual dir and downloading "
                f"{astroclip_desi.URL} failed ({err}). {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
            ) from err

    def _find_provabgs(self, dl_manager) -> str:
        return self._given_or_manual(
            dl_manager, self._provabgs_path, provabgs.FILENAME,
            f"config 'provabgs' needs {provabgs.FILENAME}: set data.provabgs_path or put it "
            f"in the manual dir.")

    def _find_properties(self, dl_manager) -> str:
        return self._given_or_manual(
            dl_manager, self._properties_path, provabgs_mmu.DIRNAME,
            f"config 'provabgs_properties' needs the Multimodal Universe desi_provabgs "
            f"files: set data.provabgs_properties_path or put them in "
            f"{provabgs_mmu.DIRNAME}/ in the manual dir.")

    def _given_or_manual(self, dl_manager, given, name: str, missing: str) -> str:
        """The path a config field gives, else `name` in the manual dir, else one line."""
        if given is not None:
            return os.fspath(given)
        manual = _manual_file(dl_manager, name)
        if manual is None:
            raise errors.MissingInput(_one_line(
                f"{missing} {self.MANUAL_DOWNLOAD_INSTRUCTIONS}"))
        return manual


def _properties_sources(root: str | None) -> dict:
    """{role: path} of the desi_provabgs files at `root`, one role per file
    ("provabgs_properties:<path under root>"), so that the recipe identifies each file."""
    if root is None or not os.path.exists(root):
        return {"provabgs_properties": None}
    if os.path.isfile(root):
        return {"provabgs_properties": root}
    return {f"provabgs_properties:{os.path.relpath(f, root)}": f
            for f in provabgs_mmu.find_files(root)}


def _one_line(message: str) -> str:
    """A message as one line (errors reach the user as `error: <one line>`)."""
    return " ".join(message.split())


def _manual_file(dl_manager, filename: str) -> str | None:
    """`filename` inside the manual dir, or None (tfds raises when the dir is missing/empty)."""
    try:
        path = dl_manager.manual_dir / filename
    except AssertionError:
        return None
    return os.fspath(path) if path.exists() else None


def builder(name: str, config, *, data_dir: str | None = None,
            file_format: str = "array_record", **kwargs):
    """The builder for `name` ("synthetic_desi" or "astroclip_desi"), writing `file_format`.

    `kwargs` (provabgs_path, provabgs_properties_path, nan_policy, duplicate_policy) only apply
    to astroclip_desi.
    """
    # By name, at call time: mmu_builder derives from this module's _Builder, so a static
    # import either way would be a circle (tests/test_import_direction.py).
    import importlib  # pylint: disable=import-outside-toplevel

    mmu_builder = importlib.import_module("astroclip_jax.data.mmu_builder")
    classes = {"synthetic_desi": SyntheticDesi, "astroclip_desi": AstroclipDesi,
               mmu_builder.NAME: mmu_builder.MmuPairs}
    if name not in classes:
        raise errors.ConfigError(f"unknown dataset {name!r}; expected one of {sorted(classes)}")
    if name == "synthetic_desi":
        kwargs = {}  # the synthetic set has no preparation arguments
    if name == mmu_builder.NAME and isinstance(config, str):  # any "<bands>_<size>"
        parsed = mmu_builder.parse_config(config)  # ConfigError for a name of no layout
        if config not in mmu_builder.MmuPairs.builder_configs:  # tfds refuses a listed name
            config = parsed
    return classes[name](config=config, data_dir=data_dir, file_format=file_format, **kwargs)
