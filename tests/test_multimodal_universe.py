"""Multimodal Universe readers (data/multimodal_universe.py) and the mmu_pairs builder, on small
files in the upstream layout (tests/mmu_files.py), compared with h5py's own reads."""

import os

import h5py
import numpy as np
import pytest

from astroclip_jax import wavelength_grids as grids
from astroclip_jax.data import builders, crossmatch, mmu_builder
from astroclip_jax.data import multimodal_universe as mmu
from astroclip_jax.errors import DataError, MissingInput
import mmu_files

ARCSEC = 1 / 3600


def _h5(path, key):
    with h5py.File(path, "r") as f:
        return f[key][()]


def _same(a, b):
    """Equal values (NaN-aware for floats) and the identical dtype, byte order included."""
    assert a.dtype == b.dtype and a.dtype.str == b.dtype.str, (a.dtype.str, b.dtype.str)
    assert a.shape == b.shape
    if a.dtype.kind == "f":
        np.testing.assert_array_equal(a, b)
    else:
        assert (a == b).all()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmu")
    rng = np.random.default_rng(3)
    ra, dec = 150 + rng.uniform(0, 0.02, 9), 2 + rng.uniform(0, 0.02, 9)
    out = {"root": str(root), "ra": ra, "dec": dec}
    out["desi"] = [mmu_files.write_desi(root, 12, [905, 901, 903, 907, 902], ra[:5], dec[:5],
                                        rng.uniform(0.01, 0.5, 5), seed=1),
                   mmu_files.write_desi(root, 123, [911, 912, 910, 913], ra[5:], dec[5:],
                                        rng.uniform(0.01, 0.5, 4), seed=2)]
    # DESI rows are sorted by TARGETID, so the positions move with them: read them back
    jitter = lambda n: rng.normal(0, 0.2 * ARCSEC, n)  # noqa: E731
    d_ra = np.concatenate([_h5(p, "ra") for p in out["desi"]]).astype(np.float64)
    d_dec = np.concatenate([_h5(p, "dec") for p in out["desi"]]).astype(np.float64)
    # Legacy Survey: 7 of the 9 DESI galaxies (one partition each way), plus 2 strays
    keep = np.array([0, 1, 2, 4, 5, 6, 8])
    ls_ra = np.concatenate([d_ra[keep] + jitter(7), [151.0, 152.0]])
    ls_dec = np.concatenate([d_dec[keep] + jitter(7), [3.0, 3.0]])
    out["ssl"] = [mmu_files.write_ssl(root, 12, [40, 41, 42, 43], ls_ra[:4], ls_dec[:4], seed=3),
                  mmu_files.write_ssl(root, 123, [50, 51, 52, 53, 54], ls_ra[4:], ls_dec[4:],
                                      seed=4)]
    out["dr10"] = [mmu_files.write_dr10(root, 12, "1500p020", [7, 3, 9, 11], ls_ra[:4],
                                        ls_dec[:4], seed=5),
                   mmu_files.write_dr10(root, 123, "1501p021", [1, 2, 3, 4, 5], ls_ra[4:],
                                        ls_dec[4:], seed=6)]
    return out


def test_partitions_are_found_by_their_exact_folder_names(tmp_path):
    for name in ("healpix=12", "healpix=123", "healpix=12_old", "xhealpix=12", "healpix=1a"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "001-of-001.hdf5").write_bytes(b"")
    (tmp_path / "healpix=7").write_bytes(b"")  # a file, not a folder
    found = mmu.partitions(tmp_path)
    assert [(p.healpix, os.path.basename(os.path.dirname(p.path))) for p in found] == [
        (12, "healpix=12"), (123, "healpix=123")]
    assert os.path.dirname(mmu.partition_file(tmp_path, 12)).endswith(os.sep + "healpix=12")
    assert os.path.dirname(mmu.partition_file(tmp_path, 123)).endswith(os.sep + "healpix=123")
    with pytest.raises(MissingInput, match=r"expected one file in healpix=1/, found 0"):
        mmu.partition_file(tmp_path, 1)
    with pytest.raises(MissingInput, match=r"has no healpix=<i>/\*.hdf5 files"):
        mmu.partitions(tmp_path / "healpix=12_old")


def test_desi_reader_returns_what_h5py_reads(files):
    path = files["desi"][0]
    d = mmu.read_desi(path, extra=("Z", "ZWARN", "SURVEY", "EBV", "TARGETID", "healpix"))
    with h5py.File(path, "r") as f:
        for key, value in d.items():
            _same(value, f[key][()])
    assert d["object_id"].dtype.str == ">i8"  # TARGETID as the FITS catalogue had it
    assert d["spectrum_flux"].dtype.str == "<f4" and d["spectrum_mask"].dtype == np.bool_
    assert d["SURVEY"].dtype.kind == "S"
    assert (np.diff(d["object_id"]) > 0).all()  # the writer's join sorts by TARGETID
    mmu.check_wavelength(path, d["spectrum_lambda"], grids.wave("desi"))
    # rows in any order, repeated: what h5py's full read gives at those rows
    rows = np.array([3, 0, 3, 1])
    part = mmu.read_desi(path, rows)
    for key, value in part.items():
        _same(value, _h5(path, key)[rows])


def test_legacy_survey_readers_return_what_h5py_reads(files):
    for path in (files["dr10"][0], files["ssl"][0]):
        ls = mmu.read_legacysurvey(path, extra=("healpix",))
        with h5py.File(path, "r") as f:
            for key, value in ls.items():
                _same(value, f[key][()])
        assert set(ls) >= {"image_array", "image_band", "image_psf_fwhm", "image_scale"}
    dr10 = mmu.read_legacysurvey(files["dr10"][0])
    assert dr10["image_array"].dtype.str == ">f4" and dr10["image_mask"].shape == (4, 160, 160)
    assert dr10["object_id"].dtype.kind == "S" and dr10["object_id"][0] == b"1500p020-7"
    assert mmu.band_names(dr10["image_band"][0]) == ("des-g", "des-r", "des-i", "des-z")
    ssl = mmu.read_legacysurvey(files["ssl"][0])
    assert "image_ivar" not in ssl and "image_mask" not in ssl
    assert ssl["object_id"].dtype == np.int64 and ssl["image_array"].shape == (4, 3, 152, 152)
    assert mmu.layout(files["dr10"][0]) == "dr10_south_21"
    assert mmu.layout(files["ssl"][0]) == "ssl_legacysurvey"


def test_bands_pick_planes_by_image_band_name(files):
    path = files["dr10"][1]
    rows = np.array([4, 1])
    ls = mmu.read_legacysurvey(path, rows, bands=("z", "g", "des-r"))
    with h5py.File(path, "r") as f:
        for key in ("image_array", "image_ivar", "image_psf_fwhm", "image_scale", "image_band"):
            _same(ls[key], f[key][()][rows][:, [3, 0, 1]])
        _same(ls["image_mask"], f["image_mask"][()][rows])  # one plane for every band
    with pytest.raises(DataError, match=r"band 'u' is not \(once\) in image_band") as err:
        mmu.read_legacysurvey(files["ssl"][0], bands=("g", "u", "z"))
    assert files["ssl"][0] in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"band 'i'"):
        mmu.read_legacysurvey(files["ssl"][0], bands=("g", "i", "z"))


def test_bad_files_are_one_line_errors_naming_file_and_key(tmp_path, files):
    bad = mmu_files.write_desi(tmp_path, 5, [1, 2], [1.0, 2.0], [1.0, 2.0], [0.1, 0.2])
    with h5py.File(bad, "a") as f:
        del f["spectrum_ivar"]
    with pytest.raises(DataError, match=r"no dataset 'spectrum_ivar'") as err:
        mmu.read_desi(bad)
    assert bad in str(err.value) and "\n" not in str(err.value)
    with h5py.File(bad, "a") as f:
        f["spectrum_ivar"] = np.ones((2, 100), np.float32)
    with pytest.raises(DataError, match=r"dataset 'spectrum_ivar' has shape \(2, 100\)"):
        mmu.read_desi(bad)
    with h5py.File(bad, "a") as f:
        f["Z3"] = np.ones(3)
    with pytest.raises(DataError, match=r"dataset 'Z3' has shape \(3,\); expected 2 rows"):
        mmu.read_columns(bad, ["Z3"])
    with pytest.raises(DataError, match=r"row 9 out of range"):
        mmu.read_desi(files["desi"][0], [0, 9])
    shifted = grids.wave("desi")[None, :] + 0.1
    with pytest.raises(DataError, match=r"spectrum_lambda of row 0 differs from the DESI grid"):
        mmu.check_wavelength("x.hdf5", shifted, grids.wave("desi"))


@pytest.mark.parametrize("damage", ["truncated", "not_hdf5", "missing"])
def test_unreadable_files_are_one_line_errors_naming_the_file(tmp_path, files, damage):
    whole = open(files["desi"][0], "rb").read()
    path = str(tmp_path / "partition.hdf5")
    if damage == "truncated":  # opens, but the data chunks are gone
        open(path, "wb").write(whole[: len(whole) // 2])
    elif damage == "not_hdf5":
        open(path, "wb").write(b"<html>404 Not Found</html>")
    expected = MissingInput if damage == "missing" else DataError
    for read in (mmu.read_desi, mmu.read_catalog, mmu.columns, mmu.read_positions):
        with pytest.raises(expected) as err:
            read(path)
        assert path in str(err.value) and "\n" not in str(err.value), str(err.value)


def _build(tmp_path, files, ls_key, config):
    b = builders.builder(mmu_builder.NAME, config, data_dir=str(tmp_path / "tfds"),
                         desi_dir=os.path.join(files["root"], "dr1_main"),
                         legacysurvey_dir=os.path.join(files["root"], ls_key))
    builders.spill_shuffle_buckets_without_tensorflow()
    b.download_and_prepare()
    return b


@pytest.mark.parametrize("ls_key, config, plane", [("south", "grz_152", [0, 1, 2]),
                                                   ("dr10_south_21", "zrg_160", [3, 1, 0])])
def test_builder_pairs_equal_the_source_rows(tmp_path, files, ls_key, config, plane):
    b = _build(tmp_path, files, ls_key, config)
    # the expected pairs: astropy nearest neighbour + the one-to-one rule, over whole folders
    desi = [p.path for p in mmu.partitions(os.path.join(files["root"], "dr1_main"))]
    ls = [p.path for p in mmu.partitions(os.path.join(files["root"], ls_key))]
    d_pos = [mmu.read_positions(p) for p in desi]
    l_pos = [mmu.read_positions(p) for p in ls]
    d_where = [(p, i) for p, pos in zip(desi, d_pos) for i in range(len(pos["ra"]))]
    l_where = [(p, i) for p, pos in zip(ls, l_pos) for i in range(len(pos["ra"]))]
    m = crossmatch.match_one_to_one(np.concatenate([p["ra"] for p in d_pos]),
                                    np.concatenate([p["dec"] for p in d_pos]),
                                    np.concatenate([p["ra"] for p in l_pos]),
                                    np.concatenate([p["dec"] for p in l_pos]))
    assert len(m) == 7  # the 7 galaxies written to both
    seen = 0
    for split in ("train", "test"):
        source = b.as_data_source(split=split)
        for k in range(len(source)):
            ex = source[k]
            tid = int(ex["targetid"])
            j = [i for i, (p, r) in enumerate(d_where) if _h5(p, "object_id")[r] == tid]
            assert len(j) == 1
            pos = int(np.nonzero(m.left == j[0])[0][0])
            dpath, drow = d_where[m.left[pos]]
            lpath, lrow = l_where[m.right[pos]]
            image = _h5(lpath, "image_array")[lrow][plane]
            np.testing.assert_array_equal(ex["image"], np.moveaxis(image, 0, -1))
            assert ex["image"].dtype == np.float32 and ex["image"].shape[-1] == 3
            np.testing.assert_array_equal(ex["spectrum"], _h5(dpath, "spectrum_flux")[drow])
            ivar = np.where(_h5(dpath, "spectrum_mask")[drow], 0, _h5(dpath, "spectrum_ivar")[drow])
            np.testing.assert_array_equal(ex["ivar"], ivar)
            assert ex["redshift"] == np.float32(_h5(dpath, "Z")[drow])
            assert ex["desi_EBV"] == _h5(dpath, "EBV")[drow]
            assert bool(ex["desi_zwarn_ok"]) == (_h5(dpath, "ZWARN")[drow] == 0)
            assert np.isnan(ex["log_mstar"]) and not ex["has_props"]
            assert ex["ra"] == _h5(dpath, "ra")[drow] and ex["dec"] == _h5(dpath, "dec")[drow]
            assert ex["separation_arcsec"] == pytest.approx(m.separation_arcsec[pos], abs=1e-12)
            seen += 1
    assert seen == 7
    assert b.info.metadata["crossmatch"]["pairs"] == 7


def test_builder_with_no_pair_is_a_data_error(tmp_path, files):
    far = tmp_path / "far"
    mmu_files.write_ssl(far, 3, [1, 2], [10.0, 11.0], [-5.0, -5.0])
    b = builders.builder(mmu_builder.NAME, "grz_152", data_dir=str(tmp_path / "tfds"),
                         desi_dir=os.path.join(files["root"], "dr1_main"),
                         legacysurvey_dir=str(far / "south"))
    with pytest.raises(DataError, match=r"no DESI row of .*dr1_main \(9 rows\) lies within 1.0\""):
        b.download_and_prepare()


def test_config_names(files):
    assert mmu_builder.parse_config("riz_160").bands == ("r", "i", "z")
    for bad in ("gri_152", "grz_150", "gg_160", "grz"):
        with pytest.raises(Exception, match=r"data.builder_config is"):
            mmu_builder.parse_config(bad)


def test_the_mmu_config_prepares_and_the_pipeline_reads(tmp_path, files):
    from astroclip_jax import settings
    from astroclip_jax.data import pipeline, prepare
    from configs import spender

    config = spender.get_config("mmu")
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.mmu_desi_dir = os.path.join(files["root"], "dr1_main")
    config.data.mmu_legacysurvey_dir = os.path.join(files["root"], "dr10_south_21")
    config.data.builder_config = "zrg_160"
    config.data.bands = ("z", "r", "g")
    data = settings.resolve(config).data
    prepare.prepare(data)
    train, test = pipeline.data_source(data, "train"), pipeline.data_source(data, "test")
    assert len(train) + len(test) == 7
    batch = pipeline.read_records(train, np.arange(len(train)))
    assert batch["image"].shape == (len(train), 160, 160, 3)
    assert batch["spectrum"].shape == (len(train), grids.wave("desi").size)
    config.data.bands = ("g", "r", "z")  # not the planes the prepared config names
    with pytest.raises(settings.ConfigError, match=r"config field data.bands"):
        settings.resolve(config)
