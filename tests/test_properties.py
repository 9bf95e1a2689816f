"""The five PROVABGS properties (redshift, log M*, Z_MW, t_age, sSFR) everywhere.

- The synthetic generator's mass-weighted metallicity `log_z_mw` and age `tage_mw`: derived
  without random draws (its images and spectra equal those of the generator before them, loaded
  from git), following the model its docstring writes, and visible in the spectra as the model
  says (the 4000 A break, [NII] / Halpha).
- The Multimodal Universe `desi_provabgs` files, written here step by step as its writer
  (`scripts/desi_provabgs/build_parent_sample.py`) writes them, read back against h5py.
- `astroclip_desi/provabgs_properties`, the settings rule and the default probe targets.
"""

import importlib.util
import os
import subprocess
import warnings

import h5py
import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy import stats

from astroclip_jax import settings
from astroclip_jax import wavelength_grids as grids
from astroclip_jax.data import astroclip_desi, builders, prepare, provabgs, provabgs_mmu
from astroclip_jax.data import synthetic as S
from astroclip_jax.errors import ConfigError, DataError, MissingInput
from configs import spender
from test_data_formats import (CUT, GOOD, NO_MATCH, _config, _expected, write_astroclip,
                               write_provabgs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The last commit whose generator had no stellar-population properties.
BEFORE = "43334f3"
ASTROPY_TABLE = pytest.importorskip("astropy.table")


# ----------------------------------------------------------------------------- synthetic

@pytest.fixture(scope="module")
def generator_before(tmp_path_factory):
    """`astroclip_jax/data/synthetic.py` as it was at BEFORE, imported as its own module."""
    try:
        source = subprocess.run(["git", "-C", ROOT, "show",
                                 f"{BEFORE}:astroclip_jax/data/synthetic.py"],
                                check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"git history with commit {BEFORE} is not available: {err}")
    path = tmp_path_factory.mktemp("before") / "synthetic_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("synthetic_before_properties", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not hasattr(module, "stellar_population")  # truly the generator before
    return module


def test_images_spectra_and_parameters_unchanged(generator_before):
    """The new properties draw nothing: every earlier output is bitwise the same (a slice across
    a parameter-block boundary, so two blocks of draws are compared)."""
    kwargs = dict(seed=4, start=S.BLOCK - 5, image_size=40)
    new, old = S.generate(10, **kwargs), generator_before.generate(10, **kwargs)
    for key in ("image", "spectrum", "ivar", "targetid", "artefact",
                *generator_before.CATALOGUE_KEYS):
        np.testing.assert_array_equal(new[key], old[key], err_msg=key)
    p_new, p_old = S.parameters(600, seed=2), generator_before.parameters(600, seed=2)
    assert set(p_new) - set(p_old) == {"log_z_mw", "tage_mw"}
    for key, value in p_old.items():
        np.testing.assert_array_equal(p_new[key], value, err_msg=key)


def test_age_of_the_universe_is_astropys():
    cosmology = pytest.importorskip("astropy.cosmology")
    z = np.array([0.0, 0.01, 0.1, 0.3, 0.6, 1.0])
    want = cosmology.FlatLambdaCDM(H0=S.H0, Om0=S.OMEGA_M).age(z).to("Gyr").value
    np.testing.assert_allclose(S.age_of_universe_gyr(z), want, rtol=1e-10)


@pytest.fixture(scope="module")
def population():
    return S.parameters(2048, seed=0)


def test_properties_follow_the_written_model(population):
    """tage_mw and log_z_mw recomputed from the generator's own parameters by the docstring's
    formulas (the cosmic age from astropy), with the bounds the model implies."""
    cosmology = pytest.importorskip("astropy.cosmology")
    p = population
    t_universe = cosmology.FlatLambdaCDM(H0=70, Om0=0.3).age(p["redshift"]).to("Gyr").value
    light_young = p["f_young"]
    mass_young = 0.4 * light_young  # M/L 0.4 (young) and 2 + 2 age (old) times the light
    mass_old = (2.0 + 2.0 * p["age"]) * (1.0 - light_young)
    share_young = mass_young / (mass_young + mass_old)
    tage = (1 - share_young) * t_universe * (0.35 + 0.6 * p["age"]) + share_young * 0.3
    np.testing.assert_allclose(p["tage_mw"], tage, rtol=1e-9)
    assert np.all(p["tage_mw"] < t_universe) and np.all(p["tage_mw"] > 0.3)

    names = list(S.EMISSION_LINES)
    n2 = np.log10(p["line_lum"][:, names.index("NII_6584")]
                  / p["line_lum"][:, names.index("Halpha")])
    assert n2.min() >= -1.4 - 1e-9 and n2.max() <= -0.25 + 1e-9  # the generator's clip
    oh = 8.90 + 0.57 * n2  # Pettini & Pagel (2004) N2
    want = np.log10(0.0142) + (oh - 8.69) - (0.1 + 0.3 * p["age"])
    np.testing.assert_allclose(p["log_z_mw"], want, rtol=0, atol=1e-12)
    # Physical: more massive galaxies are older and more metal rich (the drawn relations).
    assert stats.spearmanr(p["log_mstar"], p["log_z_mw"]).statistic > 0.4
    assert stats.spearmanr(p["log_mstar"], p["tage_mw"]).statistic > 0.5


def test_properties_are_in_the_catalogue_as_float32(population):
    out = S.generate(6, seed=0, image_size=24)
    for key in ("log_z_mw", "tage_mw"):
        assert key in S.CATALOGUE_KEYS and out[key].dtype == np.float32
        np.testing.assert_array_equal(out[key], population[key][:6].astype(np.float32))


@pytest.fixture(scope="module")
def rendered():
    return S.generate(96, seed=1, image_size=24)


def _rest_windows(redshift, lo, hi):
    rest = grids.wave("desi")[None, :] / (1.0 + redshift[:, None])
    return (rest >= lo) & (rest < hi)


def test_age_shows_in_the_4000_break(rendered):
    """The same `age` sets the old light's 4000 A break and the mass-weighted age: the narrow
    D4000 (Balogh et al. 1999, f_nu 4000-4100 / 3850-3950 A) of the observed, noisy spectrum
    ranks the galaxies by tage_mw."""
    z = rendered["redshift"].astype(np.float64)
    f_nu = rendered["spectrum"] * grids.wave("desi")[None, :] ** 2

    def mean(lo, hi):
        m = _rest_windows(z, lo, hi)
        return (f_nu * m).sum(1) / m.sum(1)
    d4000 = mean(4000.0, 4100.0) / mean(3850.0, 3950.0)
    assert stats.spearmanr(d4000, rendered["tage_mw"]).statistic > 0.8


def test_metallicity_shows_in_nii_over_halpha(rendered):
    """log_z_mw comes from the gas N2 = log([NII] 6584 / Halpha): measured on the observed,
    noisy spectrum (continuum-subtracted fluxes in +-8 A) of the star-forming galaxies whose
    Halpha is on the DESI grid, it ranks them by log_z_mw."""
    z = rendered["redshift"].astype(np.float64)
    spectrum = rendered["spectrum"].astype(np.float64)

    def line(centre):
        side = _rest_windows(z, centre + 30.0, centre + 60.0)
        continuum = (spectrum * side).sum(1) / np.maximum(side.sum(1), 1)
        return ((spectrum - continuum[:, None]) * _rest_windows(z, centre - 8.0, centre + 8.0)
                ).sum(1)
    star_forming = (rendered["log_ssfr"] > -10.5) & (z < 0.45)
    assert star_forming.sum() >= 40
    n2 = np.log10(np.maximum(line(6585.27), 1e-9) / np.maximum(line(6564.61), 1e-9))
    assert stats.spearmanr(n2[star_forming], rendered["log_z_mw"][star_forming]).statistic > 0.8


# ----------------------------------------------------------------------------- desi_provabgs

# TARGETID, Z_HP, LOGMSTAR, Z_MW, TAGE_MW (Gyr), AVG_SFR (M_sun / yr), HEALPix index.
MMU_ROWS = [(1000, 0.11, 10.5, 0.012, 6.5, 1.2, 1205),
            (0, 0.12, 11.0, 0.019, 9.1, 0.05, 1205),
            (9003, 0.13, 9.5, 0.004, 2.2, 3.4, 2811),
            (77777, 0.3, 10.0, 0.010, 5.0, 0.7, 2811),      # in no AstroCLIP split
            (55555, 0.2, 10.2, 0.0, 4.0, 0.0, 3070)]        # Z_MW = 0, AVG_SFR = 0: no logs


def write_desi_provabgs(output_dir, rows=MMU_ROWS, *, string_ids=False):
    """The Multimodal Universe writer's steps (build_parent_sample.py): the catalogue read with
    astropy's Table.read, cut, Z_MW / TAGE_MW / AVG_SFR added as float64 arrays of the fits, then
    per HEALPix index `<output_dir>/datafiles/healpix=<i>/001-of-001.h5` with one h5py dataset
    per column but RA and DEC, plus object_id (= TARGETID), ra, dec and healpix. The rows'
    HEALPix indices are given (the writer computes them with healpy from RA, DEC)."""
    raw = os.path.join(output_dir, "catalogue.hdf5")
    os.makedirs(output_dir, exist_ok=True)
    n = len(rows)
    cut_row = (424242, 0.2, 0.0, 0.01, 1.0, 1.0, 1205)  # PROVABGS_LOGMSTAR_BF = 0: cut
    every = list(rows) + [cut_row]
    columns = list(zip(*every))
    table = ASTROPY_TABLE.Table({
        "TARGETID": np.array(columns[0], np.int64),
        "RA": np.linspace(10.0, 20.0, n + 1), "DEC": np.linspace(-5.0, 5.0, n + 1),
        "Z_HP": np.array(columns[1], np.float64),
        "PROVABGS_LOGMSTAR_BF": np.array(columns[2], np.float64),
        "MAG_G": np.full(n + 1, 19.0), "MAG_R": np.full(n + 1, 18.5), "MAG_Z": np.full(n + 1, 18.0),
        "PROVABGS_THETA_BF": np.zeros((n + 1, 13), np.float32),
        "PROVABGS_MCMC": np.zeros((n + 1, 100, 13), np.float32),
        "SURVEY": np.array(["sv3"] * (n + 1)),
    })
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        table.write(raw, path="__astropy_table__", serialize_meta=True, overwrite=True)
    data = ASTROPY_TABLE.Table.read(raw)
    keep = ((data["PROVABGS_LOGMSTAR_BF"] > 0) * (data["MAG_G"] > 0) * (data["MAG_R"] > 0)
            * (data["MAG_Z"] > 0))
    data = data[keep]
    fits = {t: r for t, *r in every}
    data["Z_MW"] = np.array([fits[t][2] for t in data["TARGETID"]])
    data["TAGE_MW"] = np.array([fits[t][3] for t in data["TARGETID"]])
    data["AVG_SFR"] = np.array([fits[t][4] for t in data["TARGETID"]])
    healpix = np.array([fits[t][5] for t in data["TARGETID"]])
    keys = data.keys()
    keys.remove("RA")
    keys.remove("DEC")
    for index in np.unique(healpix):
        group = data[healpix == index]
        subdir = os.path.join(output_dir, "datafiles", f"healpix={index}")
        os.makedirs(subdir, exist_ok=True)
        with h5py.File(os.path.join(subdir, "001-of-001.h5"), "w") as f:
            for key in keys:
                f.create_dataset(key, data=group[key])
            ids = group["TARGETID"]
            f.create_dataset("object_id", data=np.array([str(i).encode() for i in ids])
                             if string_ids else ids)
            f.create_dataset("ra", data=group["RA"])
            f.create_dataset("dec", data=group["DEC"])
            f.create_dataset("healpix", data=np.full(group["TARGETID"].shape, index))
    os.remove(raw)
    return output_dir


def _h5py_rows(root):
    """{target: {dataset: value}} as h5py reads the files."""
    out = {}
    for path in sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                       if f.endswith(".h5")):
        with h5py.File(path) as f:
            for j, tid in enumerate(f["object_id"][()]):
                out[int(tid)] = {k: f[k][j] for k in ("Z_HP", "PROVABGS_LOGMSTAR_BF", "Z_MW",
                                                      "TAGE_MW", "AVG_SFR")}
    return out


def test_reader_returns_what_h5py_reads(tmp_path):
    root = write_desi_provabgs(str(tmp_path / "mmu"))
    files = provabgs_mmu.find_files(root)
    assert [os.path.relpath(f, root) for f in files] == [
        f"datafiles/healpix={i}/001-of-001.h5" for i in (1205, 2811, 3070)]
    with h5py.File(files[0]) as f:  # the writer's layout, which the reader must handle
        assert {"TARGETID", "object_id", "PROVABGS_MCMC", "SURVEY", "healpix"} <= set(f)
        assert "RA" not in f and f["Z_MW"].dtype == np.float64
    props = provabgs_mmu.read_properties(root)
    truth = _h5py_rows(root)
    assert props.targetid.tolist() == sorted(truth) == [0, 1000, 9003, 55555, 77777]  # cut gone
    for j, tid in enumerate(props.targetid):
        row = truth[int(tid)]
        assert props.z_hp[j] == np.float32(row["Z_HP"])
        assert props.log_mstar[j] == np.float32(row["PROVABGS_LOGMSTAR_BF"])
        assert props.z_mw[j] == np.float32(row["Z_MW"])
        assert props.tage_mw[j] == np.float32(row["TAGE_MW"])
        if row["Z_MW"] > 0:
            assert props.log_z_mw[j] == np.float32(np.log10(row["Z_MW"]))
            # sSFR = SFR / M* (not upstream's SFR / Z_MW): log sSFR + log M* = log SFR.
            ssfr = row["AVG_SFR"] / 10.0 ** row["PROVABGS_LOGMSTAR_BF"]
            assert props.log_ssfr[j] == pytest.approx(np.log10(ssfr), abs=1e-5)
        else:
            assert np.isnan(props.log_z_mw[j]) and np.isnan(props.log_ssfr[j])
    assert props.invalid == {"Z_MW": 1, "AVG_SFR": 1}
    # The same rows from the datafiles folder itself, one file, or string object ids.
    same = provabgs_mmu.read_properties(os.path.join(root, "datafiles"))
    np.testing.assert_array_equal(same.log_ssfr, props.log_ssfr)
    assert provabgs_mmu.read_properties(files[1]).targetid.tolist() == [9003, 77777]
    text = provabgs_mmu.read_properties(write_desi_provabgs(str(tmp_path / "s"),
                                                            string_ids=True))
    np.testing.assert_array_equal(text.targetid, props.targetid)


def test_join_nan_where_unmatched(tmp_path):
    props = provabgs_mmu.read_properties(write_desi_provabgs(str(tmp_path / "mmu")))
    targets = np.array([9003, 5, 1000, 55555])
    joined = provabgs_mmu.join(props, targets)
    assert joined.matched.tolist() == [True, False, True, True]
    position = {int(t): j for j, t in enumerate(props.targetid)}
    for name in provabgs_mmu.PROPERTIES:
        values = joined.values[name]
        assert values.dtype == np.float32 and np.isnan(values[1])
        assert values[0] == getattr(props, name)[position[9003]]
    assert np.isnan(joined.values["log_ssfr"][3])  # matched, but AVG_SFR = 0
    assert joined.counts["matched"] == 3 and joined.counts["unmatched"] == 1
    with pytest.raises(DataError, match="matches none of the 2 targets"):
        provabgs_mmu.join(props, np.array([1, 2]))


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(MissingInput, match="does not exist"):
        provabgs_mmu.read_properties(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        provabgs_mmu.read_properties(str(tmp_path / "empty"))
    root = write_desi_provabgs(str(tmp_path / "mmu"))
    path = provabgs_mmu.find_files(root)[0]
    with h5py.File(path, "a") as f:
        del f["TAGE_MW"]
    with pytest.raises(DataError, match=r"001-of-001.h5.*missing dataset\(s\) \['TAGE_MW'\]"):
        provabgs_mmu.read_properties(root)
    twice = write_desi_provabgs(str(tmp_path / "twice"), MMU_ROWS + [(0, 0.1, 10.0, 0.01, 5.0,
                                                                      1.0, 9999)])
    with pytest.raises(DataError, match="object_id 0 appears more than once"):
        provabgs_mmu.read_properties(twice)
    truncated = tmp_path / "truncated.h5"
    whole = open(provabgs_mmu.find_files(twice)[0], "rb").read()
    truncated.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(DataError, match="truncated"):
        provabgs_mmu.read_properties(str(truncated))


# ----------------------------------------------------------------------------- the builder

def test_astroclip_builder_adds_the_properties(tmp_path):
    """astroclip_desi/provabgs_properties: z and log M* from the raw catalogue, log_z_mw,
    tage_mw and log_ssfr from desi_provabgs (NaN without a row there); the columns reach the
    embeddings table (`embed_rows`), and an edited desi_provabgs file is a changed source."""
    from astroclip_jax.evaluation import embed_rows  # the table's columns come from here

    manual = tmp_path / "manual"
    manual.mkdir()
    write_astroclip(manual / astroclip_desi.FILENAME)
    write_provabgs(manual / provabgs.FILENAME, GOOD + CUT + NO_MATCH)
    root = write_desi_provabgs(str(tmp_path / "mmu"))
    data = _config(builder_config="provabgs_properties", data_dir=str(tmp_path / "tfds"),
                   manual_dir=str(manual), provabgs_properties_path=root)
    builder = prepare.prepare(data)
    counts = builder.info.metadata["provabgs_properties_counts"]
    assert counts["matched"] == 3 and counts["unmatched"] == 22  # 1000, 0, 9003 of 25 targets
    assert builder.info.metadata["provabgs_counts"]["matched"] == 4  # 4001 too
    truth = _h5py_rows(root)
    raw = {r[0]: r for r in GOOD}
    for split in ("train", "test"):
        source = tfds.data_source("astroclip_desi/provabgs_properties", split=split,
                                  data_dir=data.data_dir, download=False)
        assert set(provabgs_mmu.PROPERTIES) <= set(embed_rows._scalar_extras(source))
        records = {int(source[i]["targetid"]): source[i] for i in range(len(source))}
        assert sorted(records) == sorted(_expected(split))
        for tid, rec in records.items():
            assert rec["has_props"] == (tid in raw)  # the raw catalogue decides
            if tid in raw:
                assert rec["log_mstar"] == np.float32(raw[tid][2])
            if tid in truth:
                row = truth[tid]
                assert rec["tage_mw"] == np.float32(row["TAGE_MW"])
                assert rec["log_z_mw"] == np.float32(np.log10(row["Z_MW"]))
                assert rec["log_ssfr"] == pytest.approx(
                    np.log10(row["AVG_SFR"]) - row["PROVABGS_LOGMSTAR_BF"], abs=1e-5)
            else:
                assert all(np.isnan(rec[k]) for k in provabgs_mmu.PROPERTIES), tid
    plain = builders.builder("astroclip_desi", "provabgs", data_dir=data.data_dir)
    assert not set(provabgs_mmu.PROPERTIES) & set(plain.info.features)  # "provabgs" unchanged
    with h5py.File(provabgs_mmu.find_files(root)[0], "a") as f:
        f["TAGE_MW"][0] = 1.0
    with pytest.raises(prepare.SourceChanged, match="provabgs_properties:datafiles/healpix=1205"):
        prepare.prepare(data)


def test_builder_without_the_files_says_where_to_put_them(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    write_astroclip(manual / astroclip_desi.FILENAME)
    write_provabgs(manual / provabgs.FILENAME, GOOD)
    data = _config(builder_config="provabgs_properties", data_dir=str(tmp_path / "tfds"),
                   manual_dir=str(manual))
    with pytest.raises(MissingInput, match="data.provabgs_properties_path"):
        prepare.prepare(data)
    write_desi_provabgs(str(manual / provabgs_mmu.DIRNAME))  # the manual dir's default place
    builder = prepare.prepare(data)
    assert builder.info.metadata["provabgs_properties_counts"]["matched"] == 3


# ----------------------------------------------------------------------------- config, version

def test_settings_rule_for_the_properties_path():
    config = spender.get_config("")
    config.data.provabgs_properties_path = "/somewhere/desi_provabgs"
    with pytest.raises(ConfigError, match="config field data.provabgs_properties_path is "
                                          "'/somewhere/desi_provabgs'; expected None unless"):
        settings.resolve(config)
    config = spender.get_config("desi")
    config.data.builder_config = "provabgs_properties"
    config.data.provabgs_properties_path = "/somewhere/desi_provabgs"
    assert settings.resolve(config).data.provabgs_properties_path == "/somewhere/desi_provabgs"


def test_default_run_probes_the_five_properties_of_the_synthetic_set(tmp_path):
    """The default targets are the five PROVABGS properties plus the morphology ones, each a
    float32 column of synthetic_desi 1.2.0 (so of its embeddings table) with a display name."""
    from astroclip_jax.evaluation import probe

    targets = settings.resolve(spender.get_config("")).probe.regression_targets
    assert targets == ("z_hp", "log_mstar", "log_z_mw", "tage_mw", "log_ssfr",
                       "bulge_fraction", "r_eff_kpc")
    builder = builders.builder("synthetic_desi", "tiny", data_dir=str(tmp_path))
    assert str(builder.info.version) == "1.2.0" and "1.2.0" in builder.info.release_notes
    features = builder.info.features
    for name in targets:
        assert features[name].shape == () and features[name].np_dtype == np.float32, name
        assert name in probe.LABELS, name
    astroclip = spender.get_config("desi").probe.regression_targets
    assert set(astroclip) == {"z_hp", "log_mstar"}  # the MMU ones only with its files

