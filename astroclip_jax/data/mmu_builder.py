"""tfds builder `mmu_pairs`: image-spectrum pairs from Multimodal Universe DESI and Legacy
Survey folders, cross-matched by sky position (ArrayRecord, no TensorFlow).

    mmu_pairs/<bands>_<size>[_<join>]   e.g. grz_152 (ssl_legacysurvey cutouts, Stein et al.'s
                               sample), grz_160 (dr10_south_21 cutouts, g, r, z of DES-G/R/I/Z);
                               <join> as astroclip_desi's configs: "provabgs" (z_hp, log_mstar,
                               has_props from the PROVABGS catalogue), "provabgs_properties"
                               (also log_z_mw, tage_mw, log_ssfr from the Multimodal Universe
                               desi_provabgs files), "properties" (those three only).

Sources (preparation arguments, `data.mmu_desi_dir` and `data.mmu_legacysurvey_dir`): the DESI
configuration folder (`.../dr1_main`, holding `healpix=<i>/001-of-001.hdf5`) and the Legacy
Survey one (`.../dr10_south_21` or `.../north`, `.../south`). Every DESI row is paired with the
Legacy Survey cutout nearest on the sky within `data.crossmatch_radius_arcsec` (upstream: 1"),
one-to-one (`crossmatch.match_one_to_one`, DESI on the left). The match is over whole folders,
not partition by partition: upstream's `cross_match_datasets` drops pairs whose two rows fall in
different HEALPix pixels; here they are kept.

Each example has the fields of `builders._common_features` — image (S, S, 3) float32 flux in
the bands of the config name, in that order, H x W x band (upstream stores band x H x W);
spectrum (7781,) float32 DESI flux; targetid (DESI TARGETID); redshift (DESI Z); z_hp,
log_mstar and has_props from the PROVABGS catalogue (`data/provabgs.py`, joined by TARGETID;
NaN / False for a target without a row after the cuts, and for every target without a
"provabgs" join) — plus, with a "properties" join only, log_z_mw, tage_mw and log_ssfr
(`data/provabgs_mmu.py`, NaN where the files lack the target) — plus `ivar` (7781,) (the DESI
inverse variance, 0 where `spectrum_mask` is set) and catalogue scalars as float32:
`desi_<column>` for DESI's Z, ZERR, EBV, FLUX_*, ...; `desi_zwarn_ok` (ZWARN == 0, what the MMU
loader calls ZWARN); `ls_<column>` for the Legacy Survey's; ra, dec (DESI, float64) and
`separation_arcsec`.

Splits: pairs in the order (DESI HEALPix pixel, DESI row), the first 80 % train, the rest test:
whole sky regions rather than random galaxies end up in test, as the other builders' "first
80 %" does for files. The spectra's `spectrum_lambda` must be the DESI grid
(`wavelength_grids.desi_wave`, within 0.01 A) or preparation stops naming the file and row.

The PROVABGS sources (preparation arguments `provabgs_path` and `provabgs_properties_path`,
from `data.provabgs_path` / `data.provabgs_properties_path`; default: the catalogue
`BGS_ANY_full.provabgs.sv3.v0.hdf5` and `desi_provabgs/` in the manual dir) are joined by the
DESI TARGETID (the pairs' `targetid`) and recorded in the recipe with the folders' files, so a
changed catalogue is noticed by `prepare.check_recipe`. Which fields exist is decided by the
config name alone, never by which paths were given: a dataset's feature set is its config's.
"""

import dataclasses
import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from astroclip_jax import errors
from astroclip_jax import wavelength_grids as grids
from astroclip_jax.data import builders, crossmatch, provabgs, provabgs_mmu
from astroclip_jax.data import multimodal_universe as mmu

NAME = "mmu_pairs"
# <bands>_<image size>[_<join>]: three one-letter bands, and which PROVABGS sources are joined
CONFIG_NAME = re.compile(r"([a-z]{3})_(\d+)(?:_(provabgs_properties|provabgs|properties))?")
JOINS = {None: (False, False), "provabgs": (True, False), "properties": (False, True),
         "provabgs_properties": (True, True)}  # suffix: (join_provabgs, join_properties)
# Catalogue scalars stored with each pair (those the MMU Hugging Face loaders publish).
DESI_COLUMNS = ("Z", "ZERR", "EBV", "FLUX_G", "FLUX_R", "FLUX_Z", "FLUX_IVAR_G", "FLUX_IVAR_R",
                "FLUX_IVAR_Z", "FIBERFLUX_G", "FIBERFLUX_R", "FIBERFLUX_Z", "FIBERTOTFLUX_G",
                "FIBERTOTFLUX_R", "FIBERTOTFLUX_Z")
LS_COLUMNS = {"dr10_south_21": ("EBV", "FLUX_G", "FLUX_R", "FLUX_I", "FLUX_Z", "FLUX_W1",
                                "FLUX_W2", "FLUX_W3", "FLUX_W4", "SHAPE_R", "SHAPE_E1",
                                "SHAPE_E2"),
              "ssl_legacysurvey": ("ebv", "flux_g", "flux_r", "flux_z", "fiberflux_g",
                                   "fiberflux_r", "fiberflux_z", "psfdepth_g", "psfdepth_r",
                                   "psfdepth_z", "z_spec")}
BLOCK = 64  # pairs read at once (memory: 64 x 4 x 160^2 x 4 B = 26 MB of cutouts)


@dataclasses.dataclass
class MmuPairsConfig(tfds.core.BuilderConfig):
    """Which bands, in which order, the Legacy Survey cutout size (which writer's layout), and
    which PROVABGS sources are joined (as `builders.AstroclipDesiConfig`)."""
    bands: tuple[str, ...] = ("g", "r", "z")
    image_size: int = 152
    join_provabgs: bool = False  # z_hp, log_mstar, has_props from data/provabgs.py
    join_properties: bool = False  # log_z_mw, tage_mw, log_ssfr from data/provabgs_mmu.py

    @property
    def layout(self) -> str:
        return next(name for name, (size, _) in mmu.LAYOUTS.items() if size == self.image_size)


def parse_config(name: str) -> MmuPairsConfig:
    """`<bands>_<size>[_<join>]` ("grz_152", "riz_160", "grz_152_provabgs_properties") as a
    config; ConfigError otherwise."""
    m = CONFIG_NAME.fullmatch(str(name))
    sizes = {size: bands for size, bands in mmu.LAYOUTS.values()}
    if m is None or int(m.group(2)) not in sizes or not set(m.group(1)) <= set(
            sizes[int(m.group(2))]) or len(set(m.group(1))) != 3:
        raise errors.ConfigError(
            f"config field data.builder_config is {name!r}; expected for {NAME} '<3 bands>_"
            f"<size>[_<join>]': size 152 (ssl_legacysurvey, bands from g, r, z) or 160 "
            f"(dr10_south_21, bands from g, r, i, z), join one of {sorted(filter(None, JOINS))}"
            f", e.g. 'grz_152' or 'grz_152_provabgs'")
    join_provabgs, join_properties = JOINS[m.group(3)]
    joined = {(False, False): "", (True, False): ", PROVABGS z_hp and log M*",
              (False, True): ", log Z_MW, TAGE_MW, log sSFR (desi_provabgs)",
              (True, True): ", PROVABGS z_hp, log M*, log Z_MW, TAGE_MW, log sSFR"}
    return MmuPairsConfig(name=str(name), bands=tuple(m.group(1)), image_size=int(m.group(2)),
                          join_provabgs=join_provabgs, join_properties=join_properties,
                          description=f"bands {m.group(1)}, {m.group(2)} px cutouts"
                                      f"{joined[join_provabgs, join_properties]}")


class MmuPairs(builders._Builder):  # pylint: disable=protected-access
    """DESI spectra x Legacy Survey cutouts from Multimodal Universe folders."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [parse_config("grz_152"), parse_config("grz_160")]
    DEFAULT_CONFIG_NAME = "grz_152"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Only the PROVABGS joins read the manual directory (`data.manual_dir`): for configs
    `<bands>_<size>_provabgs[_properties]` place `{provabgs.FILENAME}` there (DESI EDR VAC) or
    set `data.provabgs_path`; for `..._properties` place the Multimodal Universe desi_provabgs
    files (`healpix=*/001-of-001.h5`) in `{provabgs_mmu.DIRNAME}/` there or set
    `data.provabgs_properties_path`.
    """

    def __init__(self, *, desi_dir: str | None = None, legacysurvey_dir: str | None = None,
                 radius_arcsec: float = 1.0, provabgs_path: str | None = None,
                 provabgs_properties_path: str | None = None, **kwargs):
        self._desi_dir = desi_dir
        self._ls_dir = legacysurvey_dir
        self._radius = float(radius_arcsec)
        self._provabgs_path = provabgs_path
        self._properties_path = provabgs_properties_path
        super().__init__(**kwargs)

    def options(self) -> dict:
        return {"data.crossmatch_radius_arcsec": self._radius}

    def source_files(self, manual_dir: str | None) -> dict:
        out = {}
        for role, root in (("mmu_desi", self._desi_dir), ("mmu_legacysurvey", self._ls_dir)):
            if root is None or not os.path.isdir(root):
                out[role] = None
                continue
            for p in mmu.partitions(root):
                out[f"{role}:{os.path.relpath(p.path, root)}"] = p.path
        catalogue, properties = self._property_paths(manual_dir)
        if self.builder_config.join_provabgs:
            out["provabgs"] = catalogue if catalogue and os.path.isfile(catalogue) else None
        if self.builder_config.join_properties:  # one role per file, as astroclip_desi
            out.update(builders._properties_sources(properties))  # pylint: disable=W0212
        return out

    def _property_paths(self, manual_dir: str | None) -> tuple[str | None, str | None]:
        """The PROVABGS catalogue and desi_provabgs paths a build reads: the given ones, else
        their default places in the manual dir (None: neither)."""
        def default(name):
            return os.path.join(os.fspath(manual_dir), name) if manual_dir else None
        catalogue = (os.fspath(self._provabgs_path) if self._provabgs_path is not None
                     else default(provabgs.FILENAME))
        properties = (os.fspath(self._properties_path) if self._properties_path is not None
                      else default(provabgs_mmu.DIRNAME))
        return catalogue, properties

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        length = grids.wave("desi").size
        features = builders._common_features(cfg.image_size, length)  # pylint: disable=W0212
        features["ivar"] = builders._tensor((length,), np.float32)  # pylint: disable=W0212
        for c in DESI_COLUMNS:
            features[f"desi_{c}"] = tfds.features.Scalar(dtype=np.float32)
        features["desi_zwarn_ok"] = tfds.features.Scalar(dtype=np.bool_)
        for c in LS_COLUMNS[cfg.layout]:
            features[f"ls_{c}"] = tfds.features.Scalar(dtype=np.float32)
        for c in ("ra", "dec", "separation_arcsec"):  # raw bytes: a Scalar float64 is stored
            features[c] = builders._tensor((), np.float64)  # as float32 (tf.Example lists)
        if cfg.join_properties:  # NaN where the desi_provabgs files lack a target
            for name in provabgs_mmu.PROPERTIES:
                features[name] = tfds.features.Scalar(dtype=np.float32)
        return self.dataset_info_from_configs(
            description="Multimodal Universe DESI spectra cross-matched with Legacy Survey "
                        "cutouts (one-to-one, by sky position).",
            features=tfds.features.FeaturesDict(features),
            homepage="https://github.com/MultimodalUniverse/MultimodalUniverse",
            metadata=tfds.core.MetadataDict(grid="desi"),
        )

    def _roots(self) -> tuple[str, str]:
        for field, root in (("data.mmu_desi_dir", self._desi_dir),
                            ("data.mmu_legacysurvey_dir", self._ls_dir)):
            if root is None:
                raise errors.MissingInput(f"{NAME} needs {field}: the Multimodal Universe "
                                          "configuration folder holding healpix=<i>/ files")
        return os.fspath(self._desi_dir), os.fspath(self._ls_dir)

    def _split_generators(self, dl_manager):
        desi_root, ls_root = self._roots()
        manual_dir = _manual_dir(dl_manager)
        catalogue, properties = self._property_paths(manual_dir)
        cfg = self.builder_config
        # Before the cross-match: a missing source is one line naming it and its config field.
        for needed, path, given, field, what, it in (
                (cfg.join_provabgs, catalogue, self._provabgs_path, "data.provabgs_path",
                 f"the PROVABGS catalogue ({provabgs.FILENAME})", "it"),
                (cfg.join_properties, properties, self._properties_path,
                 "data.provabgs_properties_path",
                 f"the Multimodal Universe desi_provabgs files ({provabgs_mmu.DIRNAME}/)",
                 "them")):
            if not needed or (path is not None and os.path.exists(path)):
                continue
            where = (f"{field} is {path!r}, which does not exist" if given is not None else
                     f"set {field} or put {it} in the manual dir "
                     f"({manual_dir or 'none, or empty'})")
            raise errors.MissingInput(f"{NAME}/{cfg.name} needs {what}: {where}")
        pairs = match_folders(desi_root, ls_root, self._radius)
        # One join over all pairs (both splits): "matches no target" is a property of the file.
        props = {}
        if cfg.join_provabgs:
            joined = provabgs.join(provabgs.read_catalog(catalogue), pairs.targetid)
            props.update(z_hp=joined.z_hp, log_mstar=joined.log_mstar,
                         has_props=joined.has_props)
            self.info.metadata["provabgs_counts"] = joined.counts
        if cfg.join_properties:
            joined = provabgs_mmu.join(provabgs_mmu.read_properties(properties), pairs.targetid)
            props.update(joined.values)
            self.info.metadata["provabgs_properties_counts"] = joined.counts
        self.info.metadata["recipe"] = self.recipe(self.source_files(manual_dir))
        self.info.metadata["crossmatch"] = pairs.counts
        n = len(pairs.desi_file)
        n_train = int(builders.TRAIN_FRACTION * n)
        return {"train": self._generate_examples(pairs, props, 0, n_train),
                "test": self._generate_examples(pairs, props, n_train, n)}

    def _generate_examples(self, pairs: "Pairs", props: dict, start: int, stop: int):
        cfg = self.builder_config
        grid = grids.wave("desi")
        ls_cols = LS_COLUMNS[cfg.layout]
        for lo in range(start, stop, BLOCK):
            hi = min(lo + BLOCK, stop)
            for (dfile, lfile), where in _groups(pairs, lo, hi):
                d = mmu.read_desi(dfile, pairs.desi_row[where], extra=(*DESI_COLUMNS, "ZWARN"))
                mmu.check_wavelength(dfile, d["spectrum_lambda"], grid)
                ls = mmu.read_legacysurvey(lfile, pairs.ls_row[where], bands=cfg.bands,
                                           extra=ls_cols)
                if ls["image_array"].shape[-1] != cfg.image_size:
                    raise errors.DataError(
                        f"{lfile}: cutouts are {ls['image_array'].shape[-1]} px; the builder "
                        f"config {cfg.name} is for {cfg.image_size} px")
                image = np.moveaxis(ls["image_array"], 1, -1).astype(np.float32)
                ivar = np.where(d["spectrum_mask"], 0.0, d["spectrum_ivar"]).astype(np.float32)
                for j, k in enumerate(where):
                    if int(d["object_id"][j]) != pairs.targetid[k]:  # the join is by pair index
                        raise RuntimeError(f"{dfile} row {pairs.desi_row[k]}: object_id "
                                           f"{d['object_id'][j]} is not the matched target "
                                           f"{pairs.targetid[k]} (file changed while reading?)")
                    example = {
                        "image": image[j],
                        "spectrum": d["spectrum_flux"][j].astype(np.float32),
                        "ivar": ivar[j],
                        "targetid": np.int64(d["object_id"][j]),
                        "redshift": np.float32(d["Z"][j]),
                        "z_hp": np.float32(props["z_hp"][k] if cfg.join_provabgs else np.nan),
                        "log_mstar": np.float32(props["log_mstar"][k] if cfg.join_provabgs
                                                else np.nan),
                        "has_props": bool(cfg.join_provabgs and props["has_props"][k]),
                        "desi_zwarn_ok": bool(d["ZWARN"][j] == 0),
                        "ra": np.float64(d["ra"][j]),
                        "dec": np.float64(d["dec"][j]),
                        "separation_arcsec": np.float64(pairs.separation_arcsec[k]),
                    }
                    for c in DESI_COLUMNS:
                        example[f"desi_{c}"] = np.float32(d[c][j])
                    for c in ls_cols:
                        example[f"ls_{c}"] = np.float32(ls[c][j])
                    if cfg.join_properties:
                        for name in provabgs_mmu.PROPERTIES:
                            example[name] = np.float32(props[name][k])
                    yield int(k), example


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Matched rows: the DESI and Legacy Survey file and row of each pair, in pair order."""
    desi_file: np.ndarray  # object (paths)
    desi_row: np.ndarray  # int64
    targetid: np.ndarray  # int64: the DESI object_id (TARGETID) of each pair
    ls_file: np.ndarray
    ls_row: np.ndarray
    separation_arcsec: np.ndarray
    counts: dict


def _catalogue(root: str) -> tuple[np.ndarray, ...]:
    """(file path, row, ra, dec, object_id) of every row of every partition file under `root`
    (object_id as read: int64 for DESI, strings for dr10_south_21)."""
    paths, rows, ras, decs, ids = [], [], [], [], []
    for p in mmu.partitions(root):
        pos = mmu.read_positions(p.path)
        n = pos["ra"].shape[0]
        paths.append(np.full(n, p.path, object))
        rows.append(np.arange(n, dtype=np.int64))
        ras.append(np.asarray(pos["ra"], np.float64))
        decs.append(np.asarray(pos["dec"], np.float64))
        ids.append(pos["object_id"])
    return (np.concatenate(paths), np.concatenate(rows), np.concatenate(ras),
            np.concatenate(decs), np.concatenate(ids))


def match_folders(desi_root: str, ls_root: str, radius_arcsec: float = 1.0) -> Pairs:
    """The one-to-one sky match of every DESI row with the Legacy Survey rows, in the order of
    the DESI rows (partition, row). No pair at all is a DataError naming both folders."""
    dpath, drow, dra, ddec, dids = _catalogue(desi_root)
    lpath, lrow, lra, ldec, _ = _catalogue(ls_root)
    m = crossmatch.match_one_to_one(dra, ddec, lra, ldec, radius_arcsec=radius_arcsec)
    if len(m) == 0:
        raise errors.DataError(
            f"no DESI row of {desi_root} ({dra.size} rows) lies within {radius_arcsec}\" of a "
            f"Legacy Survey row of {ls_root} ({lra.size} rows): nothing to pair")
    counts = {"desi_rows": int(dra.size), "legacysurvey_rows": int(lra.size),
              "pairs": len(m), "radius_arcsec": float(radius_arcsec)}
    logging.info("%s: %s", NAME, counts)
    if dids.dtype.kind not in "iu":
        raise errors.DataError(f"{desi_root}: object_id is {dids.dtype}; expected the DESI "
                               "TARGETID (integers)")
    return Pairs(dpath[m.left], drow[m.left], dids[m.left].astype(np.int64), lpath[m.right],
                 lrow[m.right], m.separation_arcsec, counts)


def _groups(pairs: Pairs, lo: int, hi: int):
    """Pairs lo..hi grouped by (DESI file, Legacy Survey file), each group's pair indices in
    order: one read per file pair."""
    keys = {}
    for k in range(lo, hi):
        keys.setdefault((pairs.desi_file[k], pairs.ls_file[k]), []).append(k)
    return [(key, np.asarray(ks, np.int64)) for key, ks in keys.items()]


def _manual_dir(dl_manager) -> str | None:
    """The manual dir of this preparation, or None (tfds asserts when it is not set)."""
    try:
        return os.fspath(dl_manager.manual_dir)
    except AssertionError:
        return None
