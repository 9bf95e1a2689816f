"""mmu_pairs with the PROVABGS joins (data/mmu_builder.py configs `<bands>_<size>_provabgs`,
`..._provabgs_properties`, `..._properties`): tiny Multimodal Universe folders (tests/mmu_files.py)
and both catalogues in their upstream layouts (astropy's table writer for the raw PROVABGS file,
the Multimodal Universe writer's steps for desi_provabgs), the expected values read back here
with astropy and h5py."""

import os

import h5py
import numpy as np
import pytest

from astroclip_jax import settings
from astroclip_jax.data import builders, mmu_builder, prepare, provabgs, provabgs_mmu
from astroclip_jax.errors import MissingInput
from configs import spender
import mmu_files
from test_data_formats import CUT, GOOD, NO_MATCH, write_provabgs
from test_properties import MMU_ROWS, write_desi_provabgs

ASTROPY_TABLE = pytest.importorskip("astropy.table")
# DESI targets: 1000, 0, 9003, 4001 have a raw PROVABGS row that passes the cuts; 5000 and 2001
# have one that is cut; 55555 is only in desi_provabgs (Z_MW = AVG_SFR = 0 there); 31 is in
# neither. 1000, 0, 9003 are in both.
TARGETS = np.array([1000, 0, 9003, 4001, 5000, 2001, 55555, 31], np.int64)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmu_props")
    rng = np.random.default_rng(11)
    n = TARGETS.size
    ra, dec = 150 + rng.uniform(0, 0.02, n), 2 + rng.uniform(0, 0.02, n)
    mmu_files.write_desi(root, 12, TARGETS[:5], ra[:5], dec[:5], rng.uniform(0.01, 0.5, 5), seed=1)
    mmu_files.write_desi(root, 13, TARGETS[5:], ra[5:], dec[5:], rng.uniform(0.01, 0.5, 3), seed=2)
    jitter = rng.normal(0, 0.1 / 3600, (2, n))  # each DESI target has its cutout within 1"
    mmu_files.write_ssl(root, 12, np.arange(n) + 40, ra + jitter[0], dec + jitter[1], seed=3)
    catalogue = write_provabgs(root / provabgs.FILENAME, GOOD + CUT + NO_MATCH)
    properties = write_desi_provabgs(str(root / "desi_provabgs"), MMU_ROWS)
    return {"root": root, "catalogue": str(catalogue), "properties": properties}


def _data(sources, tmp_path, builder_config, **paths):
    """The `mmu` variant's data settings, resolved (so checked by settings.RULES)."""
    config = spender.get_config("mmu")
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.mmu_desi_dir = os.path.join(sources["root"], "dr1_main")
    config.data.mmu_legacysurvey_dir = os.path.join(sources["root"], "south")
    config.data.builder_config = builder_config
    for key, value in paths.items():
        setattr(config.data, key, value)
    return settings.resolve(config).data


def _raw_truth(path):
    """{TARGETID: (Z_HP, PROVABGS_LOGMSTAR_BF)} of the rows passing the upstream cuts, through
    astropy's reader (what AstroCLIP's own code opens the catalogue with)."""
    table = ASTROPY_TABLE.Table.read(path)
    keep = np.ones(len(table), bool)
    for column in ("PROVABGS_LOGMSTAR_BF", "MAG_G", "MAG_R", "MAG_Z"):
        keep &= np.nan_to_num(np.asarray(table[column], np.float64), nan=-1.0) > 0
    return {int(r["TARGETID"]): (float(r["Z_HP"]), float(r["PROVABGS_LOGMSTAR_BF"]))
            for r in table[keep]}


def _mmu_truth(root):
    """{object_id: {dataset: value}} of every desi_provabgs file, through h5py."""
    out = {}
    for path in sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                       if f.endswith(".h5")):
        with h5py.File(path) as f:
            for j, tid in enumerate(f["object_id"][()]):
                out[int(tid)] = {k: float(f[k][j]) for k in ("PROVABGS_LOGMSTAR_BF", "Z_MW",
                                                             "TAGE_MW", "AVG_SFR")}
    return out


def _records(builder):
    out = {}
    for split in ("train", "test"):
        source = builder.as_data_source(split=split)
        out.update({int(source[i]["targetid"]): source[i] for i in range(len(source))})
    return out


def _check_properties(rec, row):
    if row is None:
        assert all(np.isnan(rec[k]) for k in provabgs_mmu.PROPERTIES)
        return
    assert rec["tage_mw"] == np.float32(row["TAGE_MW"])
    if row["Z_MW"] > 0:
        assert rec["log_z_mw"] == np.float32(np.log10(row["Z_MW"]))
        # sSFR = SFR / M*: log10 SFR - log10 M*
        assert rec["log_ssfr"] == pytest.approx(
            np.log10(row["AVG_SFR"]) - row["PROVABGS_LOGMSTAR_BF"], abs=1e-5)
    else:  # no log of 0
        assert np.isnan(rec["log_z_mw"]) and np.isnan(rec["log_ssfr"])


def test_pairs_carry_the_catalogue_values_of_their_targets(sources, tmp_path):
    data = _data(sources, tmp_path, "grz_152_provabgs_properties",
                 provabgs_path=sources["catalogue"],
                 provabgs_properties_path=sources["properties"])
    builder = prepare.prepare(data)
    raw, mmu = _raw_truth(sources["catalogue"]), _mmu_truth(sources["properties"])
    assert sorted(raw) == [0, 1000, 4001, 9003, 77777, 88888]  # the writer's rows, cut
    records = _records(builder)
    assert sorted(records) == sorted(TARGETS.tolist())  # every DESI target found its cutout
    for tid, rec in records.items():
        assert bool(rec["has_props"]) == (tid in raw), tid
        if tid in raw:
            assert rec["z_hp"] == np.float32(raw[tid][0])
            assert rec["log_mstar"] == np.float32(raw[tid][1])
        else:
            assert np.isnan(rec["z_hp"]) and np.isnan(rec["log_mstar"])
        _check_properties(rec, mmu.get(tid))
    matched_raw = sum(t in raw for t in records)
    assert builder.info.metadata["provabgs_counts"]["matched"] == matched_raw == 4
    assert builder.info.metadata["provabgs_properties_counts"]["matched"] == 4  # + 55555
    # What the training and evaluation modes read: the pipeline's Batch fields, and the three
    # properties among the embeddings table's columns.
    from astroclip_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    from astroclip_jax.evaluation import embed_rows  # pylint: disable=import-outside-toplevel
    train = pipeline.data_source(data, "train")
    batch = pipeline.read_records(train, np.arange(len(train)))
    assert batch["has_props"].tolist() == [int(t) in raw for t in batch["targetid"]]
    assert set(provabgs_mmu.PROPERTIES) <= set(embed_rows._scalar_extras(train))
    # The catalogues are sources of the recipe: unchanged, the dataset is reused; a changed
    # one is noticed.
    assert prepare.prepare(data).info.metadata["recipe"]["sources"] == (
        builder.info.metadata["recipe"]["sources"])
    recorded = builder.info.metadata["recipe"]["sources"]
    assert recorded["provabgs"]["path"] == os.path.realpath(sources["catalogue"])
    assert any(k.startswith("provabgs_properties:datafiles/healpix=") for k in recorded)
    changed = [list(r) for r in GOOD]
    changed[0][2] = 11.5
    write_provabgs(tmp_path / "edited.hdf5", [tuple(r) for r in changed] + CUT + NO_MATCH)
    os.replace(tmp_path / "edited.hdf5", sources["catalogue"])
    try:
        with pytest.raises(prepare.SourceChanged, match="PROVABGS catalogue size|PROVABGS "
                                                        "catalogue content"):
            prepare.prepare(data)
    finally:  # the module's fixture stays as written
        write_provabgs(sources["catalogue"], GOOD + CUT + NO_MATCH)


def test_properties_alone_and_the_manual_dir_default(sources, tmp_path):
    """`_properties` without the raw catalogue: the three columns, z_hp NaN, has_props False;
    the files found in desi_provabgs/ of the manual dir when no path is set."""
    manual = tmp_path / "manual"
    manual.mkdir()
    write_desi_provabgs(str(manual / provabgs_mmu.DIRNAME), MMU_ROWS)
    data = _data(sources, tmp_path, "grz_152_properties", manual_dir=str(manual))
    builder = prepare.prepare(data)
    assert any(k.startswith("provabgs_properties:") and v["path"].startswith(
        os.path.realpath(manual)) for k, v in builder.info.metadata["recipe"]["sources"].items())
    prepare.check_recipe(builder, data)  # the manual dir's files are the ones recorded
    records = _records(builder)
    mmu = _mmu_truth(str(manual / provabgs_mmu.DIRNAME))
    assert sorted(records) == sorted(TARGETS.tolist())
    for tid, rec in records.items():
        assert not rec["has_props"] and np.isnan(rec["z_hp"]) and np.isnan(rec["log_mstar"])
        _check_properties(rec, mmu.get(tid))


def test_the_feature_set_is_the_config_names(tmp_path):
    def features(name):
        return set(builders.builder(mmu_builder.NAME, name, data_dir=str(tmp_path)).info.features)

    plain, raw, both = (features(n) for n in ("grz_152", "grz_152_provabgs",
                                              "grz_152_provabgs_properties"))
    assert plain == raw and {"z_hp", "log_mstar", "has_props"} <= plain
    assert both - plain == set(provabgs_mmu.PROPERTIES) == features("riz_160_properties") - (
        features("riz_160"))
    for bad in ("grz_152_provabg", "grz_152_properties_provabgs", "grz_152_"):
        with pytest.raises(Exception, match="data.builder_config is"):
            mmu_builder.parse_config(bad)


def test_a_missing_catalogue_is_one_line_naming_it(sources, tmp_path):
    gone = str(tmp_path / "nowhere.hdf5")
    cases = [
        (dict(provabgs_path=gone), "grz_152_provabgs", gone),
        (dict(provabgs_path=sources["catalogue"], provabgs_properties_path=gone),
         "grz_152_provabgs_properties", gone),
        ({}, "grz_152_provabgs", "data.provabgs_path"),  # no path, nothing in the manual dir
        ({}, "grz_152_properties", "data.provabgs_properties_path"),
    ]
    for paths, config, named in cases:
        data = _data(sources, tmp_path / config, config, **paths)
        with pytest.raises(MissingInput) as err:
            prepare.prepare(data)
        message = str(err.value)
        assert named in message and "\n" not in message, message


def test_the_properties_path_is_refused_where_no_config_reads_it(sources, tmp_path):
    with pytest.raises(settings.ConfigError, match="config field data.provabgs_properties_path"):
        _data(sources, tmp_path, "grz_152_provabgs", provabgs_properties_path="/x")
