"""Checks at prepare time: repeated targetids, a changed source, rebuilds, the lock, leftovers.

Source files are written in the upstream layout by `test_data_formats.write_astroclip` (targetid
of group g, row r: 1000 g + r; rows per group `SIZES`, the first int(0.8 N) of each train).
"""

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from astroclip_jax import errors
from astroclip_jax.data import astroclip_desi, builders, pipeline, prepare
from test_data_formats import (GOOD, SIZES, TRAIN_ROWS, _config, _galaxy, _synthetic_config,
                               write_astroclip, write_provabgs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _repeat(*copies):
    """A mutation writing targetid `tid` into (group, row) for each (group, row, tid)."""
    def mutate(group, data):
        for g, row, tid in copies:
            if g == group:
                data["targetids"][row] = tid
    return mutate


def _data(tmp_path, mutate=None, builder_config="joint", **kwargs):
    """Data settings for astroclip_desi from a fresh source file in <tmp>/manual."""
    manual = tmp_path / "manual"
    manual.mkdir(exist_ok=True)
    write_astroclip(manual / astroclip_desi.FILENAME, mutate=mutate)
    return _config(builder_config=builder_config, data_dir=str(tmp_path / "tfds"),
                   manual_dir=str(manual), **kwargs)


def _records(data, split):
    source = pipeline.data_source(data, split)
    return {int(source[i]["targetid"]): source[i] for i in range(len(source))}


def _rows(split):
    """(group, row) of `split` by upstream's rule."""
    return [(g, r) for g, n in SIZES.items()
            for r in (range(TRAIN_ROWS[n]) if split == "train" else range(TRAIN_ROWS[n], n))]


# ----------------------------------------------------------------------------- duplicates

@pytest.mark.parametrize("copies,message", [
    # within group "0": row 3 repeats row 1
    ([("0", 3, 1)], r"targetid 1 appears 2 times \(group '0' row 1, group '0' row 3\); "
                    r"1 targetid\(s\) repeat in 1 extra row\(s\)"),
    # across groups and splits: group 5's test row and group 9's train row repeat group 0 row 0;
    # group 7 row 1 repeats group 1 row 0
    ([("5", 1, 0), ("9", 0, 0), ("7", 1, 1000)],
     r"targetid 0 appears 3 times \(group '0' row 0, group '5' row 1, group '9' row 0\); "
     r"2 targetid\(s\) repeat in 3 extra row\(s\) in all.*data.duplicate_policy='drop'"),
])
def test_repeated_targetids_are_an_error_naming_every_place(tmp_path, copies, message):
    path = write_astroclip(tmp_path / "bad.h5", mutate=_repeat(*copies))
    named = re.escape(f"AstroCLIP file {str(path)!r}: ") + message
    for split in ("train", "test"):  # whichever split the repeat sits in
        with pytest.raises(astroclip_desi.AstroclipFileError, match=named):
            list(astroclip_desi.iter_blocks(path, split))
    with pytest.raises(astroclip_desi.AstroclipFileError, match=named):
        astroclip_desi.read_targetids(path, "test")
    # Through prepare: nothing is written, and the error is a one-line UserError.
    data = _data(tmp_path, _repeat(*copies))
    source = str(tmp_path / "manual" / astroclip_desi.FILENAME)
    with pytest.raises(errors.UserError, match=re.escape(f"{source!r}: ") + message) as err:
        prepare.prepare(data)
    assert "\n" not in str(err.value)
    assert not os.path.exists(prepare.make_builder(data).data_dir)


def test_drop_keeps_the_first_occurrence_and_reports_the_rest(tmp_path, caplog):
    # 1000 (group 1 row 0) reappears in group 1 row 2 (test) and group 9 row 1 (train);
    # 4001 (group 4 row 1, test) reappears in group 7 row 0 (train).
    copies = [("1", 2, 1000), ("9", 1, 1000), ("7", 0, 4001)]
    dropped = {("1", 2), ("9", 1), ("7", 0)}
    write_provabgs(tmp_path / "catalog.hdf5", GOOD)
    data = _data(tmp_path, _repeat(*copies), builder_config="provabgs", duplicate_policy="drop",
                 provabgs_path=str(tmp_path / "catalog.hdf5"))
    with caplog.at_level("WARNING"):
        builder = prepare.prepare(data)
    assert "dropped 3 row(s) whose targetid appeared before (2 targetid(s)" in caplog.text
    report = prepare.make_builder(data).info.metadata["duplicates"]  # as stored on disk
    assert report == {"policy": "drop", "dropped_rows": 3, "duplicated_targetids": 2,
                      "examples": {"1000": [["1", 0], ["1", 2], ["9", 1]],
                                   "4001": [["4", 1], ["7", 0]]}}
    # Each target once over both splits; the kept rows are the first occurrences.
    props = {r[0]: r for r in GOOD}
    seen = set()
    for split in ("train", "test"):
        records = _records(data, split)
        expected = {1000 * int(g) + r: (g, r) for g, r in _rows(split) if (g, r) not in dropped}
        assert sorted(records) == sorted(expected)
        assert not seen & set(records)
        seen |= set(records)
        for tid, (g, r) in expected.items():
            np.testing.assert_array_equal(records[tid]["spectrum"], _galaxy(g, r)[1])
            assert records[tid]["has_props"] == (tid in props)
    assert builder.info.metadata["provabgs_counts"]["matched"] == 4  # each catalogue row once
    assert len(seen) == sum(SIZES.values()) - 3


def test_a_split_left_empty_by_dropping_is_an_error(tmp_path):
    """Two rows per group (row 0 train, row 1 test), every test row a repeat of its train row."""
    sizes = {g: 2 for g in astroclip_desi.GROUPS}
    path = write_astroclip(tmp_path / "repeats.h5", sizes,
                           mutate=_repeat(*[(g, 1, 1000 * int(g)) for g in sizes]))
    train = list(astroclip_desi.iter_blocks(path, "train", duplicate_policy="drop"))
    assert [int(t) for b in train for t in b["targetid"]] == [1000 * int(g) for g in sizes]
    with pytest.raises(astroclip_desi.AstroclipFileError,
                       match=r"repeats.h5': split 'test' is empty once the 10 repeated targetid "
                             r"row\(s\) are dropped"):
        list(astroclip_desi.iter_blocks(path, "test", duplicate_policy="drop"))


def test_unknown_duplicate_policy_is_a_config_error(tmp_path):
    with pytest.raises(errors.ConfigError, match=r"config field data.duplicate_policy is "
                                                 r"'ignore'; expected one of \['raise', 'drop'\]"):
        prepare.prepare(_data(tmp_path, duplicate_policy="ignore"))


# ----------------------------------------------------------------------------- changed sources

REBUILD = (r"Rebuild it with --mode=prepare --config.data.rebuild=True \(the prepared dataset "
           r"stays until the new one is complete\)")


def _changed(data, match):
    with pytest.raises(prepare.SourceChanged, match=match) as err:
        prepare.prepare(data)
    assert "\n" not in str(err.value) and isinstance(err.value, errors.UserError)
    assert "was prepared from other inputs than the config gives now" in str(err.value)
    assert "--config.data.rebuild=True" in str(err.value)


def test_a_changed_source_is_reported_with_how_to_rebuild(tmp_path, monkeypatch, caplog):
    data = _data(tmp_path)
    prepare.prepare(data)
    source = tmp_path / "manual" / astroclip_desi.FILENAME
    recorded = prepare.make_builder(data).info.metadata["recipe"]["sources"]["astroclip"]
    assert recorded["path"] == str(source) and recorded["size"] == os.path.getsize(source)
    prepare.prepare(data)  # unchanged: accepted

    os.utime(source, ns=(0, 10 ** 18))  # touched, same content: the sha256 decides
    prepare.prepare(data)

    # Same size, one value changed.
    def nudged(group, values):
        if group == "3":
            values["redshifts"][0] += 1
    write_astroclip(source, mutate=nudged)
    _changed(data, r"AstroCLIP file content sha256 \w{12} -> \w{12}\. " + REBUILD)

    write_astroclip(source, sizes={**SIZES, "9": 5})  # one more galaxy
    _changed(data, r"AstroCLIP file size \d+ -> \d+ bytes, content sha256")

    # A file too large to hash is compared by size and modification time.
    monkeypatch.setattr(builders, "HASH_LIMIT", 0)
    shutil.rmtree(tmp_path / "tfds")
    write_astroclip(source)
    prepare.prepare(data)
    os.utime(source, ns=(0, 10 ** 18))
    _changed(data, r"AstroCLIP file modified [\d-]+ [\d:]+ -> 2001-09-0\d")

    # Deleted after preparing: the prepared dataset is what is read; said, not refused.
    os.remove(source)
    with caplog.at_level("WARNING"):
        prepare.prepare(data)
    assert f"AstroCLIP file {source} is not in the configured place any more" in caplog.text


def test_another_manual_dir_catalogue_or_option_is_reported(tmp_path):
    write_provabgs(tmp_path / "catalog.hdf5", GOOD)
    data = _data(tmp_path, builder_config="provabgs",
                 provabgs_path=str(tmp_path / "catalog.hdf5"))
    prepare.prepare(data)
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy2(tmp_path / "manual" / astroclip_desi.FILENAME, other)  # a copy, same content
    name = astroclip_desi.FILENAME
    _changed(dataclasses.replace(data, manual_dir=str(other)),
             re.escape(f"AstroCLIP file path {tmp_path / 'manual' / name} -> {other / name}. ")
             + REBUILD)
    write_provabgs(tmp_path / "catalog2.hdf5", GOOD[:3])
    _changed(dataclasses.replace(data, provabgs_path=str(tmp_path / "catalog2.hdf5")),
             r"PROVABGS catalogue path \S+/catalog.hdf5 -> \S+/catalog2.hdf5, (size|content)")
    _changed(dataclasses.replace(data, nan_policy="mask"),
             r"other inputs than the config gives now: data.nan_policy 'raise' -> 'mask'\. ")
    _changed(dataclasses.replace(data, nan_policy="mask", duplicate_policy="drop"),
             r"data.nan_policy 'raise' -> 'mask'; data.duplicate_policy 'raise' -> 'drop'")
    prepare.prepare(data)  # the inputs it was made from: accepted again


def test_rebuild_replaces_only_when_complete(tmp_path):
    data = _data(tmp_path)
    prepare.prepare(data)
    source = tmp_path / "manual" / astroclip_desi.FILENAME
    old = _records(data, "train")

    def poisoned(group, values):  # a new version of the file that cannot be prepared
        values["redshifts"][:] += 5
        if group == "8":
            values["redshifts"][0] = np.nan
    write_astroclip(source, mutate=poisoned)
    _changed(data, r"AstroCLIP file content sha256")
    rebuild = dataclasses.replace(data, rebuild=True)
    with pytest.raises(astroclip_desi.AstroclipFileError, match=r"group '8', row 0 \(targetid "
                                                                r"8000\), field 'redshift'"):
        prepare.prepare(rebuild)
    kept = _records(data, "train")  # the old dataset, whole
    assert sorted(kept) == sorted(old)
    assert all(kept[t]["redshift"] == old[t]["redshift"] for t in old)
    home = prepare.dataset_dir(prepare.make_builder(data))
    assert sorted(os.listdir(home)) == [".lock-prepare", "1.1.5"]  # no staging left
    _changed(data, r"AstroCLIP file content sha256")  # still stale: still refused

    def shifted(group, values):
        values["redshifts"][:] += 5
    write_astroclip(source, mutate=shifted)
    prepare.prepare(rebuild)
    new = _records(data, "train")
    assert sorted(new) == sorted(old)
    for g, r in _rows("train"):
        assert new[1000 * int(g) + r]["redshift"] == _galaxy(g, r)[2] + np.float32(5)
    prepare.prepare(data)  # the new recipe matches the file


def test_synthetic_recipe_is_its_builder_config(tmp_path, monkeypatch):
    from astroclip_jax.data import synthetic
    from test_data_formats import _standin

    monkeypatch.setattr(synthetic, "generate", _standin)
    data = _synthetic_config(tmp_path)
    prepare.prepare(data)
    assert prepare.make_builder(data).info.metadata["recipe"] == {
        "sources": {}, "options": {"builder_config.num_pairs": 20, "builder_config.grid": "desi",
                                   "builder_config.image_size": 24, "builder_config.seed": 0}}
    prepare.prepare(data)
    changed = dataclasses.replace(data, builder_config=dataclasses.replace(
        data.builder_config, seed=3))  # same name and version, other content
    _changed(changed, r"other inputs than the config gives now: builder_config.seed 0 -> 3\. ")


# ----------------------------------------------------------------------------- lock, leftovers

HOLD = """
import sys, time
from astroclip_jax import locks
locks.DirectoryLock(sys.argv[1], sys.argv[2], sys.argv[3]).acquire()
print("held", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def _held_elsewhere(home):
    """The prepare lock of `home` held by another process (killed at the end): its pid."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, home, "prepare of astroclip_desi",
                               prepare.LOCK_NAME], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_prepare_stops_naming_the_holder(tmp_path):
    data = _data(tmp_path)
    home = prepare.dataset_dir(prepare.make_builder(data))
    with _held_elsewhere(home) as pid:
        with pytest.raises(errors.Busy, match=rf"{home} is in use by prepare of astroclip_desi "
                                              rf"\(host \S+, pid {pid}, since "):
            prepare.prepare(data)
        assert not os.path.exists(prepare.make_builder(data).data_dir)
    prepare.prepare(data)  # the dead holder's lock is free
    # While another process rebuilds it, a prepared dataset is still read (and not tidied).
    with _held_elsewhere(home):
        os.mkdir(os.path.join(home, ".staging-busy"))
        assert prepare.prepare(data).info.splits["train"].num_examples == 15
        with pytest.raises(errors.Busy, match="is in use by prepare of astroclip_desi"):
            prepare.prepare(dataclasses.replace(data, rebuild=True))
        assert os.path.isdir(os.path.join(home, ".staging-busy"))


def test_leftovers_of_killed_prepares_are_removed(tmp_path):
    data = _data(tmp_path)
    prepare.prepare(data)
    builder = prepare.make_builder(data)
    home, root = prepare.dataset_dir(builder), str(tmp_path / "tfds")
    for name in ("incomplete.AB12CD_1.1.5", ".staging-x1y2", "1.1.5.old-k3j4"):  # folders
        os.makedirs(os.path.join(home, name, "sub"))
    for name in ("incomplete.0123456789abcdef0123456789abcdef.dataset_info.json",
                 "features.json.incomplete"):  # files
        open(os.path.join(home, name), "w").close()
    os.makedirs(os.path.join(root, ".staging-old", "astroclip_desi", "joint", "1.1.5"))
    unrelated = os.path.join(root, ".staging-other", "synthetic_desi", "tiny")
    os.makedirs(unrelated)
    before = _records(data, "test")
    prepare.prepare(data)
    assert sorted(os.listdir(home)) == [".lock-prepare", "1.1.5"]
    assert sorted(os.listdir(root)) == [".staging-other", "astroclip_desi", "downloads"]
    assert os.path.isdir(unrelated)  # another dataset's: not ours to remove
    assert sorted(_records(data, "test")) == sorted(before)

    # A swap killed between its two renames: the old dataset waits under its `.old-` name.
    os.rename(builder.data_dir, builder.data_dir + ".old-zz9")
    prepare.prepare(data)
    assert sorted(os.listdir(home)) == [".lock-prepare", "1.1.5"]
    assert sorted(_records(data, "test")) == sorted(before)
    os.rename(builder.data_dir, builder.data_dir + ".old-zz8")  # and checked once restored
    write_astroclip(tmp_path / "manual" / astroclip_desi.FILENAME, sizes={**SIZES, "9": 5})
    _changed(data, r"AstroCLIP file size")
    assert sorted(os.listdir(home)) == [".lock-prepare", "1.1.5"]


KILLED = """
import pathlib, sys, time
import test_data_formats as formats
from astroclip_jax.data import prepare, synthetic
def generate(n, seed=0, *, start=0, **kwargs):
    if start >= 6:
        print("writing", flush=True)
        time.sleep(120)
    return formats._standin(n, seed, start=start, **kwargs)
synthetic.generate = generate
prepare.prepare(formats._synthetic_config(pathlib.Path(sys.argv[1])))
"""


def test_a_prepare_killed_mid_build_leaves_nothing_the_next_one_keeps(tmp_path, monkeypatch):
    from astroclip_jax.data import synthetic
    from test_data_formats import _standin

    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT}/tests", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "writing\n" in iter(proc.stdout.readline, "")  # tfds prints its own lines too
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    data = _synthetic_config(tmp_path)
    home = prepare.dataset_dir(prepare.make_builder(data))
    left = [n for n in os.listdir(home) if n.startswith("incomplete.")]
    assert len(left) == 1  # tfds' half-written version directory
    monkeypatch.setattr(synthetic, "generate", _standin)
    start = time.monotonic()
    prepare.prepare(data)  # takes the dead process's lock over at once
    assert time.monotonic() - start < 60
    assert sorted(os.listdir(home)) == [".lock-prepare", str(builders.SyntheticDesi.VERSION)]
    assert len(_records(data, "train")) == 16


def test_a_downloaded_source_is_checked_where_it_was_downloaded(tmp_path, monkeypatch):
    downloads = tmp_path / "tfds" / "downloads"
    downloads.mkdir(parents=True)
    fetched = write_astroclip(downloads / "users.flatironinstitute.org_astroclip_desi.h5")
    monkeypatch.setattr(builders.AstroclipDesi, "_find_file", lambda self, dl: str(fetched))
    data = _config(builder_config="joint", data_dir=str(tmp_path / "tfds"))  # no manual file
    prepare.prepare(data)
    prepare.prepare(data)
    write_astroclip(fetched, sizes={**SIZES, "9": 5})
    _changed(data, r"AstroCLIP file size \d+ -> \d+ bytes, content sha256 \w+ -> \w+\. ")
