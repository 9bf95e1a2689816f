"""Upstream file layouts -> readers -> tfds ArrayRecord, checked value by value.

Test files are written here in exactly the upstream layouts: `astroclip_desi.1.1.5.h5` with h5py
(groups "0".."9", images stored as the transpose of (3, 152, 152), spectra (N, 7781, 1) in one
group and (N, 7781) in the others) and the PROVABGS catalogue with astropy's own HDF5 writer.
"""

import dataclasses
import json
import os
import warnings

import h5py
import numpy as np
import pytest
import tensorflow_datasets as tfds

from astroclip_jax import settings
from astroclip_jax.data import astroclip_desi, builders, prepare, provabgs, synthetic
from configs import spender

L = astroclip_desi.SPECTRUM_LENGTH
# Rows per group and, by hand, upstream's int(0.8 * N) train rows.
SIZES = {"0": 5, "1": 3, "2": 2, "3": 1, "4": 2, "5": 2, "6": 2, "7": 2, "8": 2, "9": 4}
TRAIN_ROWS = {5: 4, 3: 2, 2: 1, 1: 0, 4: 3}


def _galaxy(group: str, row: int):
    """Known content of one galaxy: (C, H, W) image, spectrum, redshift, targetid."""
    rng = np.random.default_rng([int(group), row])
    chw = rng.normal(size=(3, 152, 152)).astype(np.float32)
    spectrum = rng.normal(size=L).astype(np.float32)
    return chw, spectrum, np.float32(0.01 * (10 * int(group) + row)), 1000 * int(group) + row


def write_astroclip(path, sizes=SIZES, *, spectra_3d=("0",), mutate=None):
    """The upstream file: images exported as the transpose of (3, 152, 152)."""
    with h5py.File(path, "w") as f:
        for group, n in sizes.items():
            rows = [_galaxy(group, j) for j in range(n)]
            g = f.create_group(group)
            data = {
                "images": np.stack([r[0].T for r in rows]) if n else
                np.zeros((0, 152, 152, 3), np.float32),
                "spectra": np.stack([r[1] for r in rows]) if n else np.zeros((0, L), np.float32),
                "redshifts": np.array([r[2] for r in rows], np.float32),
                "targetids": np.array([r[3] for r in rows], np.int64),
            }
            if group in spectra_3d:
                data["spectra"] = data["spectra"][..., None]
            if mutate:
                mutate(group, data)
            for name, value in data.items():
                if value is not None:
                    g.create_dataset(name, data=value)
    return path


def _expected(split):
    out = {}
    for group, n in SIZES.items():
        cut = TRAIN_ROWS[n]
        for row in (range(cut) if split == "train" else range(cut, n)):
            chw, spectrum, z, tid = _galaxy(group, row)
            out[tid] = (chw.transpose(1, 2, 0), spectrum, z)
    return out


# ----------------------------------------------------------------------------- astroclip reader

def test_reader_unswaps_images_and_splits_per_group(tmp_path):
    path = write_astroclip(tmp_path / "a.h5")
    assert astroclip_desi.inspect(path) == SIZES
    for split in ("train", "test"):
        expected = _expected(split)
        seen = []
        for block in astroclip_desi.iter_blocks(path, split, block_size=2):
            for j, tid in enumerate(block["targetid"]):
                image, spectrum, z = expected[int(tid)]
                np.testing.assert_array_equal(block["image"][j], image)  # (H, W, C) again
                np.testing.assert_array_equal(block["spectrum"][j], spectrum)
                assert block["redshift"][j] == z
                seen.append(int(tid))
        assert sorted(seen) == sorted(expected)
        assert len(seen) == sum(TRAIN_ROWS[n] if split == "train" else n - TRAIN_ROWS[n]
                                for n in SIZES.values())
    # A non-square check that the swap is the right one: stored[x, y] == image[y, x].
    with h5py.File(path) as f:
        stored = f["0"]["images"][1]
    np.testing.assert_array_equal(stored[3, 7], _galaxy("0", 1)[0][:, 7, 3])


def _error(tmp_path, match, mutate=None, sizes=SIZES, split="train", **kwargs):
    path = write_astroclip(tmp_path / "bad.h5", sizes, mutate=mutate)
    with pytest.raises((astroclip_desi.AstroclipFileError, FileNotFoundError), match=match):
        list(astroclip_desi.iter_blocks(path, split, **kwargs))


def _drop(name, group="3"):
    def mutate(g, data):
        if g == group:
            data[name] = None
    return mutate


def test_reader_errors_name_file_group_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.h5' does not exist"):
        astroclip_desi.inspect(tmp_path / "missing.h5")
    _error(tmp_path, r"bad.h5', group '3': dataset 'targetids' is missing", _drop("targetids"))
    _error(tmp_path, r"group '9' is missing", sizes={g: 2 for g in "012345678"})

    def wrong_image_shape(g, data):
        if g == "2":  # stored (N, 3, 152, 152): not the exported layout
            data["images"] = data["images"].transpose(0, 3, 1, 2)
    _error(tmp_path, r"group '2', dataset 'images': shape \(2, 3, 152, 152\), expected "
                     r"\(2, 152, 152, 3\)", wrong_image_shape)

    def wrong_spectrum_length(g, data):
        if g == "4":
            data["spectra"] = data["spectra"][:, :3921]
    _error(tmp_path, r"group '4', dataset 'spectra': shape \(2, 3921\), expected \(2, 7781\) "
                     r"or \(2, 7781, 1\)", wrong_spectrum_length)

    def float_ids(g, data):
        if g == "5":
            data["targetids"] = data["targetids"].astype(np.float64)
    _error(tmp_path, r"group '5', dataset 'targetids': dtype float64, expected integer",
           float_ids)

    def int_images(g, data):
        if g == "6":
            data["images"] = data["images"].astype(np.int16)
    _error(tmp_path, r"group '6', dataset 'images': dtype int16, expected floating", int_images)
    # Every group with one row: int(0.8) = 0 train rows anywhere.
    _error(tmp_path, r"split 'train' is empty", sizes={g: 1 for g in SIZES})


def test_reader_truncated_file(tmp_path):
    path = write_astroclip(tmp_path / "full.h5")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(astroclip_desi.AstroclipFileError, match="truncated"):
        list(astroclip_desi.iter_blocks(truncated, "train"))


def test_non_finite_raise_or_mask_and_count(tmp_path):
    def poison(g, data):
        if g == "1":
            data["spectra"][1, 100] = np.nan
            data["images"][0, 5, 6, 2] = np.inf  # stored (x=5, y=6): image[6, 5, 2]
    _error(tmp_path, r"bad.h5', group '1', row 0 \(targetid 1000\), field 'image': non-finite "
                     r"value inf at \[6, 5, 2\]", poison)
    path = tmp_path / "bad.h5"
    counts = {}
    blocks = list(astroclip_desi.iter_blocks(path, "train", nan_policy="mask", counts=counts))
    assert counts == {"image": [1, 1], "spectrum": [1, 1]}
    got = {int(t): (b["image"][j], b["spectrum"][j]) for b in blocks
           for j, t in enumerate(b["targetid"])}
    assert got[1000][0][6, 5, 2] == 0.0 and got[1001][1][100] == 0.0
    assert np.isfinite(got[1000][0]).all()


# ----------------------------------------------------------------------------- PROVABGS

def write_provabgs(path, rows, table_path="__astropy_table__"):
    """The catalogue through astropy's own writer (the layout upstream's Table.read expects)."""
    table_mod = pytest.importorskip("astropy.table")
    columns = list(zip(*rows))
    table = table_mod.Table(
        [np.array(columns[0], np.int64)] + [np.array(c, np.float64) for c in columns[1:]]
        + [np.zeros((len(rows), 13), np.float32), np.array(["BGS"] * len(rows))],
        names=list(provabgs.COLUMNS) + ["PROVABGS_THETA_BF", "SURVEY"])
    with warnings.catch_warnings():  # astropy notes that it uses its default path
        warnings.simplefilter("ignore", UserWarning)
        table.write(path, path=table_path, serialize_meta=True, overwrite=True)
    return path


# TARGETID, Z_HP, LOGMSTAR, MAG_G, MAG_R, MAG_Z. Targets of SIZES are 1000 * group + row.
GOOD = [(1000, 0.11, 10.5, 19.0, 18.5, 18.0), (0, 0.12, 11.0, 19.1, 18.6, 18.1),
        (9003, 0.13, 9.5, 19.2, 18.7, 18.2), (4001, 0.14, 10.1, 19.3, 18.8, 18.3)]
CUT = [(1001, 0.2, 0.0, 19.0, 18.0, 17.0),      # log M* = 0
       (2000, 0.2, -1.0, 19.0, 18.0, 17.0),     # log M* < 0
       (2001, 0.2, 10.0, -99.0, 18.0, 17.0),    # MAG_G < 0
       (3000, 0.2, 10.0, 19.0, np.nan, 17.0),   # MAG_R NaN
       (5000, 0.2, 10.0, 19.0, 18.0, 0.0)]      # MAG_Z = 0
NO_MATCH = [(77777, 0.3, 10.0, 19.0, 18.0, 17.0), (88888, 0.3, 10.0, 19.0, 18.0, 17.0)]


def test_astropy_layout_is_what_we_read(tmp_path):
    path = write_provabgs(tmp_path / provabgs.FILENAME, GOOD + CUT + NO_MATCH)
    with h5py.File(path) as f:  # the layout astropy wrote, which the reader must handle
        assert f["__astropy_table__"].dtype.kind == "V"
        assert "__astropy_table__.__table_column_meta__" in f
    catalog = provabgs.read_catalog(path)
    assert catalog.n_rows == 11 and catalog.n_cut == 5
    assert catalog.targetid.tolist() == [0, 1000, 4001, 9003, 77777, 88888]


def test_join_values_and_counts(tmp_path):
    path = write_provabgs(tmp_path / provabgs.FILENAME, GOOD + CUT + NO_MATCH)
    targets = np.array([1000, 1001, 2000, 2001, 3000, 4001, 5000, 9003, 6000])
    joined = provabgs.join(provabgs.read_catalog(path), targets)
    assert joined.counts == {"matched": 3, "unmatched": 6, "cut": 5}
    assert joined.has_props.tolist() == [True, False, False, False, False, True, False, True,
                                         False]
    np.testing.assert_array_equal(joined.z_hp[[0, 5, 7]], np.float32([0.11, 0.14, 0.13]))
    np.testing.assert_array_equal(joined.log_mstar[[0, 5, 7]], np.float32([10.5, 10.1, 9.5]))
    assert np.isnan(joined.z_hp[~joined.has_props]).all()
    assert np.isnan(joined.log_mstar[~joined.has_props]).all()
    with pytest.raises(ValueError, match="matches none of the 2 targets"):
        provabgs.join(provabgs.read_catalog(path), np.array([1, 2]))


def test_provabgs_errors_and_other_paths(tmp_path):
    other = write_provabgs(tmp_path / "named.hdf5", GOOD, table_path="provabgs/table")
    assert provabgs.read_catalog(other).targetid.tolist() == [0, 1000, 4001, 9003]
    dup = write_provabgs(tmp_path / "dup.hdf5", GOOD + [GOOD[0]])
    with pytest.raises(ValueError, match=r"TARGETID 1000 appears in rows \[0, 4\]"):
        provabgs.read_catalog(dup)
    with h5py.File(tmp_path / "nocol.hdf5", "w") as f:
        f["__astropy_table__"] = np.zeros(3, dtype=[("TARGETID", "<i8"), ("Z_HP", "<f8")])
    with pytest.raises(ValueError, match="missing column.*PROVABGS_LOGMSTAR_BF"):
        provabgs.read_catalog(tmp_path / "nocol.hdf5")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        provabgs.read_catalog(tmp_path / "nothing.hdf5")


# ----------------------------------------------------------------------------- tfds builders

SMOKE = settings.resolve(spender.get_config("smoke")).data


def _config(**kwargs):
    return dataclasses.replace(SMOKE, **{
        **dict(name="astroclip_desi", builder_config="provabgs", data_dir=None,
               manual_dir=None, provabgs_path=None, nan_policy="raise", grid="desi"),
        **kwargs})


def test_astroclip_builder_round_trip_with_provabgs(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    write_astroclip(manual / astroclip_desi.FILENAME)
    write_provabgs(manual / provabgs.FILENAME, GOOD + CUT + NO_MATCH)
    builder = prepare.prepare(_config(data_dir=str(tmp_path / "tfds"), manual_dir=str(manual)))
    # 25 targets: 4 with a surviving row; 5 rows cut.
    assert builder.info.metadata["provabgs_counts"] == {"matched": 4, "unmatched": 21, "cut": 5}
    props = {r[0]: r for r in GOOD}
    for split in ("train", "test"):
        source = tfds.data_source("astroclip_desi/provabgs", split=split,
                                  data_dir=str(tmp_path / "tfds"), download=False)
        expected = _expected(split)
        records = {int(source[i]["targetid"]): source[i] for i in range(len(source))}
        assert sorted(records) == sorted(expected)
        for tid, (image, spectrum, z) in expected.items():
            rec = records[tid]
            np.testing.assert_array_equal(rec["image"], image)
            np.testing.assert_array_equal(rec["spectrum"], spectrum)
            assert rec["redshift"] == z
            assert rec["has_props"] == (tid in props)
            if tid in props:
                assert rec["z_hp"] == np.float32(props[tid][1])
                assert rec["log_mstar"] == np.float32(props[tid][2])
            else:
                assert np.isnan(rec["z_hp"]) and np.isnan(rec["log_mstar"])


def test_failed_build_leaves_nothing(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()

    def poison(g, data):
        if g == "7":
            data["redshifts"][0] = np.nan
    write_astroclip(manual / astroclip_desi.FILENAME, mutate=poison)
    config = _config(builder_config="joint", data_dir=str(tmp_path / "tfds"),
                     manual_dir=str(manual))
    with pytest.raises(astroclip_desi.AstroclipFileError, match="group '7', row 0.*'redshift'"):
        prepare.prepare(config)
    assert not os.path.exists(tmp_path / "tfds" / "astroclip_desi" / "joint" / "1.1.5")
    leftovers = list((tmp_path / "tfds" / "astroclip_desi" / "joint").glob("*"))
    assert [p.name for p in leftovers] == [".lock-" + prepare.LOCK_NAME]  # the free lock only
    with pytest.raises(FileNotFoundError, match="provabgs"):  # join asked for, no catalogue
        prepare.prepare(_config(data_dir=str(tmp_path / "tfds"), manual_dir=str(manual)))


def _standin(n, seed=0, *, start=0, grid="desi", image_size=152):
    """A fast stand-in with the generator's API: galaxy i depends only on (seed, i)."""
    out = {k: [] for k in ("image", "spectrum")}
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i])
        out["image"].append(rng.normal(size=(image_size, image_size, 3)).astype(np.float32))
        out["spectrum"].append(rng.normal(size=L).astype(np.float32))
    index = np.arange(start, start + n)
    out = {k: np.stack(v) for k, v in out.items()}
    out["ivar"] = np.ones_like(out["spectrum"])
    out["targetid"] = (7_000_000 + index).astype(np.int64)
    for k in builders._SYNTHETIC_EXTRA + ("redshift", "log_mstar"):
        out[k] = (0.001 * index + len(k)).astype(np.float32)
    out["artefact"] = (index % 3).astype(np.int8)
    return out


def _synthetic_config(tmp_path, num_pairs=20, image_size=24):
    cfg = builders.SyntheticDesiConfig(name=f"test{num_pairs}", num_pairs=num_pairs,
                                       image_size=image_size, block_size=6)
    return _config(name="synthetic_desi", builder_config=cfg, data_dir=str(tmp_path / "tfds"))


def _records(config, split):
    name = getattr(config.builder_config, "name", config.builder_config)
    source = tfds.data_source(f"synthetic_desi/{name}", split=split,
                              data_dir=config.data_dir, download=False)
    return {int(source[i]["targetid"]): source[i] for i in range(len(source))}


def test_prepare_mode_writes_the_summary_and_reuses_the_dataset(tmp_path, monkeypatch):
    """`--mode=prepare` on the smoke config (synthetic tiny: 256 pairs) from the stand-in."""
    monkeypatch.setattr(synthetic, "generate", _standin)
    config = spender.get_config("smoke")
    config.data.data_dir = str(tmp_path / "tfds")
    prepare.run(settings.resolve(config), str(tmp_path / "work"))
    with open(tmp_path / "work" / "prepare.json") as f:
        written = json.load(f)
    assert written["dataset"] == "synthetic_desi/tiny/1.2.0"  # 1.2.0: log_z_mw, tage_mw
    assert written["splits"]["train"]["examples"] == 204  # int(0.8 * 256)
    assert written["splits"]["test"]["examples"] == 52
    assert written["metadata"]["grid"] == "desi"
    records = _records(dataclasses.replace(SMOKE, data_dir=config.data.data_dir), "test")
    assert sorted(records) == [7_000_000 + i for i in range(204, 256)]
    # Prepared already: a second run reads it back instead of generating again.
    monkeypatch.setattr(synthetic, "generate", None)
    prepare.run(settings.resolve(config), str(tmp_path / "again"))
    with open(tmp_path / "again" / "prepare.json") as f:
        assert json.load(f)["splits"] == written["splits"]


def test_synthetic_round_trip_standin_and_safe_rebuild(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "generate", _standin)
    config = _synthetic_config(tmp_path)
    prepare.prepare(config)
    splits = prepare.summary(prepare.make_builder(config))["splits"]
    assert splits["train"]["examples"] == 16 and splits["test"]["examples"] == 4
    expected = _standin(20, image_size=24)
    for split, rows in (("train", range(0, 16)), ("test", range(16, 20))):
        records = _records(config, split)
        assert sorted(records) == [7_000_000 + i for i in rows]  # first 80 % train
        for i in rows:
            rec = records[7_000_000 + i]
            np.testing.assert_array_equal(rec["image"], expected["image"][i])
            np.testing.assert_array_equal(rec["spectrum"], expected["spectrum"][i])
            assert rec["z_hp"] == rec["redshift"] == expected["redshift"][i]
            assert rec["log_mstar"] == expected["log_mstar"][i] and rec["has_props"]
            assert rec["artefact"] == expected["artefact"][i]
            assert rec["mag_r"] == expected["mag_r"][i]

    # A forced rebuild that fails half way must leave the prepared dataset as it was.
    def broken(n, seed=0, *, start=0, **kwargs):
        if start >= 12:
            raise RuntimeError("generator died")
        return _standin(n, seed, start=start, **kwargs)
    monkeypatch.setattr(synthetic, "generate", broken)
    with pytest.raises(RuntimeError, match="generator died"):
        prepare.prepare(config, force=True)
    records = _records(config, "train")
    assert len(records) == 16
    np.testing.assert_array_equal(records[7_000_003]["image"], expected["image"][3])
    assert not [p for p in os.listdir(config.data_dir) if p.startswith(".staging")]

    # A successful forced rebuild (new seed-free content from a shifted stand-in) replaces it.
    monkeypatch.setattr(synthetic, "generate",
                        lambda n, seed=0, **kw: _standin(n, seed + 1, **kw))
    prepare.prepare(config, force=True)
    rebuilt = _records(config, "train")
    np.testing.assert_array_equal(rebuilt[7_000_003]["image"],
                                  _standin(1, 1, start=3, image_size=24)["image"][0])


def test_synthetic_round_trip_real_generator(tmp_path):
    """The real generator through tfds: records equal one direct call, keyed on targetid."""
    config = _synthetic_config(tmp_path, num_pairs=5, image_size=152)
    builder = prepare.prepare(config)
    direct = synthetic.generate(5, seed=0)
    by_id = {int(t): i for i, t in enumerate(direct["targetid"])}
    seen = 0
    for split in ("train", "test"):
        for tid, rec in _records(config, split).items():
            i = by_id[tid]
            np.testing.assert_array_equal(rec["image"], direct["image"][i])
            np.testing.assert_array_equal(rec["spectrum"], direct["spectrum"][i])
            np.testing.assert_array_equal(rec["ivar"], direct["ivar"][i])
            assert rec["redshift"] == direct["redshift"][i]
            seen += 1
    assert seen == 5
    info = prepare.summary(builder)
    assert info["splits"]["train"]["examples"] == 4 and info["splits"]["test"]["examples"] == 1


def test_synthetic_split_larger_than_the_shuffle_buffer(tmp_path, monkeypatch):
    """Past tfds' in-memory shuffle buffer (1 GB) buckets spill to disk: that must work
    without TensorFlow and give back exactly what was generated."""
    from tensorflow_datasets.core import shuffle

    monkeypatch.setattr(synthetic, "generate", _standin)
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 10_000)  # a few records, then spill
    config = _synthetic_config(tmp_path)
    prepare.prepare(config)
    expected = _standin(20, image_size=24)
    records = _records(config, "train")
    assert sorted(records) == [7_000_000 + i for i in range(16)]
    for i in range(16):
        np.testing.assert_array_equal(records[7_000_000 + i]["image"], expected["image"][i])
        np.testing.assert_array_equal(records[7_000_000 + i]["spectrum"], expected["spectrum"][i])
