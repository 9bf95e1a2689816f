"""Surveys of one modality: the reader against NumPy slicing of what was written in
ssl-legacysurvey's layout (a directory of HDF5 chunks, `images` channels first, catalogue
columns beside them), and image-only / spectrum-only embedding against the notebook Embedder
on the same raw cutouts and spectra."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess

import numpy as np
import pytest

import cli_runs
from astroclip_jax import settings as settings_lib
from astroclip_jax import wavelength_grids
from astroclip_jax.data import pipeline, preprocess
from astroclip_jax.data.survey_files import SurveyFiles, write_survey_file
from astroclip_jax.errors import DataError, MissingInput
from astroclip_jax.evaluation import embed, restore
from configs import spender


def _catalogue(rng, n):
    return {"ra": rng.uniform(0, 360, n), "dec": rng.uniform(-30, 80, n),
            "z_phot_median": rng.uniform(0, 1, n).astype(np.float32),
            "flux": rng.uniform(0, 10, (n, 3)).astype(np.float32),
            "brickid": rng.integers(0, 10 ** 6, n).astype(np.int32)}


def _write_chunks(folder, images, catalogue, sizes, channels_first=True):
    os.makedirs(folder, exist_ok=True)
    start = 0
    for i, size in enumerate(sizes):
        part = {k: v[start:start + size] for k, v in catalogue.items()}
        write_survey_file(os.path.join(folder, f"images_{i:03d}.h5"), images[start:start + size],
                          channels_first=channels_first, **part)
        start += size
    return folder


def test_reader_reads_the_ssl_legacysurvey_layout_in_row_ranges(tmp_path):
    rng = np.random.default_rng(0)
    n = 9
    images = rng.normal(size=(n, 8, 6, 3)).astype(np.float32)  # H != W: the transpose shows
    catalogue = _catalogue(rng, n)
    folder = _write_chunks(str(tmp_path / "south"), images, catalogue, (5, 4))
    with open(os.path.join(folder, "README.txt"), "w") as f:
        f.write("not a data file")  # ignored: only .h5/.hdf5 files are chunks
    survey = SurveyFiles(folder)
    assert survey.modality == "image" and survey.n == n and len(survey.files) == 2
    assert set(survey.columns) == {"ra", "dec", "z_phot_median", "brickid", "flux_0",
                                   "flux_1", "flux_2"}
    rows = survey.read(3, 8)  # across the two files
    np.testing.assert_array_equal(rows["image"], images[3:8])
    np.testing.assert_array_equal(rows["targetid"], np.arange(3, 8))  # upstream's `inds`
    np.testing.assert_array_equal(rows["ra"], catalogue["ra"][3:8])
    np.testing.assert_array_equal(rows["flux_2"], catalogue["flux"][3:8, 2])
    assert rows["z_phot_median"].dtype == np.float32
    # Channels last (AstroCLIP's layout) reads the same; a targetid column is used when there.
    last = _write_chunks(str(tmp_path / "last"), images,
                         {**catalogue, "targetid": np.arange(n) + 2 ** 40}, (9,),
                         channels_first=False)
    rows = SurveyFiles(last).read(3, 8)
    np.testing.assert_array_equal(rows["image"], images[3:8])
    np.testing.assert_array_equal(rows["targetid"], np.arange(3, 8) + 2 ** 40)


def test_unreadable_surveys_are_named_in_one_line(tmp_path):
    with pytest.raises(MissingInput, match="survey file .*nope.h5 does not exist"):
        SurveyFiles(str(tmp_path / "nope.h5"))
    path = write_survey_file(str(tmp_path / "odd.h5"), ra=np.zeros(3))
    with pytest.raises(DataError, match=r"odd.h5 has neither 'images' .* it has \['ra'\]"):
        SurveyFiles(path)
    path = write_survey_file(str(tmp_path / "short.h5"), spectra=np.zeros((2, 100)))
    settings = settings_lib.resolve(spender.get_config("smoke"))
    with pytest.raises(DataError, match="spectra have 100 pixels, the run's spectrum tower reads"):
        embed.survey_rows(settings.data, path, settings.model.spectrum_length)


def _raw_test_split():
    data = dataclasses.replace(settings_lib.resolve(spender.get_config("smoke")).data,
                               data_dir=cli_runs.DATA_DIR)
    source = pipeline.data_source(data, "test")
    return pipeline.read_records(source, np.arange(len(source)))


def test_an_image_only_survey_embeds_from_the_command_line(smoke_run, tmp_path):
    raw = _raw_test_split()
    rng = np.random.default_rng(1)
    catalogue = _catalogue(rng, len(raw["image"]))
    folder = _write_chunks(str(tmp_path / "south"), raw["image"], catalogue, (30, 22))
    workdir = str(tmp_path / "run")
    shutil.copytree(smoke_run, workdir)
    # The README's command line.
    proc = cli_runs.run("embed", workdir, f"--config.eval.survey_file={folder}",
                        "--config.eval.embed_inputs=False", "--config.eval.embed_chunk_rows=20")
    table = embed.embeddings_path(workdir, embed.survey_table_name(SurveyFiles(folder)))
    assert os.path.basename(table).startswith("survey-south-")
    assert table in proc.stdout
    arrays, meta, _ = embed.read_embeddings(table)
    assert meta["modality"] == "image" and meta["n"] == 52 and meta["files"] == 2
    assert not [k for k in arrays if "spectrum" in k]
    np.testing.assert_array_equal(arrays["targetid"], np.arange(52))
    np.testing.assert_array_equal(arrays["z_phot_median"], catalogue["z_phot_median"])
    np.testing.assert_array_equal(arrays["dec"], catalogue["dec"])
    embedder = restore.load_embedder(smoke_run, "best")
    # float32 on differently batched calls, as in test_embed.
    np.testing.assert_allclose(arrays["image_embedding"], embedder.embed_images(raw["image"]),
                               rtol=0, atol=1e-5)


def test_a_spectrum_only_survey_embeds_its_spectra(smoke_run, tmp_path):
    raw = _raw_test_split()
    n = len(raw["spectrum"])
    path = write_survey_file(str(tmp_path / "desi_spectra.h5"), spectra=raw["spectrum"],
                             wave=wavelength_grids.wave("desi"), targetid=raw["targetid"],
                             z=raw["redshift"])
    workdir = str(tmp_path / "run")
    shutil.copytree(smoke_run, workdir)
    config = spender.get_config("smoke")
    config.data.data_dir = cli_runs.DATA_DIR
    config.eval.survey_file = path
    config.eval.embed_chunk_rows = 32
    directory, manifest, _ = embed.ensure_embeddings(settings_lib.resolve(config), workdir,
                                                     log=lambda line: None)
    assert manifest["meta"]["modality"] == "spectrum" and manifest["n"] == n
    arrays, _, _ = embed.read_embeddings(directory)
    assert "image_embedding" not in arrays and "spectrum_inputs" in arrays
    np.testing.assert_array_equal(arrays["targetid"], raw["targetid"])
    np.testing.assert_array_equal(arrays["z"], raw["redshift"])
    embedder = restore.load_embedder(smoke_run, "best")
    np.testing.assert_allclose(arrays["spectrum_embedding"],
                               embedder.embed_spectra(raw["spectrum"]), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ poisoned survey input

def _smoke_data(**fields):
    data = settings_lib.resolve(spender.get_config("smoke")).data
    return dataclasses.replace(data, data_dir=cli_runs.DATA_DIR, **fields)


def _id_survey(tmp_path, parts):
    """A survey of 40x40 cutouts (row r all r) in files holding the targetids `parts`."""
    folder, start = str(tmp_path / "ids"), 0
    os.makedirs(folder, exist_ok=True)
    for i, ids in enumerate(parts):
        images = np.arange(start, start + len(ids), dtype=np.float32)[:, None, None, None] \
            * np.ones((1, 40, 40, 3), np.float32)
        write_survey_file(os.path.join(folder, f"part_{i}.h5"), images,
                          targetid=np.asarray(ids, np.float64))
        start += len(ids)
    return folder


def test_repeated_or_invalid_targetids_follow_the_duplicate_policy(tmp_path):
    parts = [[5, 7, np.nan, 11], [5, -1, 8, 7, 2.5, 9, 11]]
    folder = _id_survey(tmp_path, parts)
    with pytest.raises(DataError, match=r"survey file .*part_0.h5, row 2: targetid nan; expected a "
                                        r"non-negative integer \(3 such row"):
        SurveyFiles(folder).targetid_drops("raise")
    ids = np.concatenate(parts)
    # NumPy's own reading: the valid ids, each at its first row.
    valid = np.isfinite(ids) & (ids >= 0) & (ids == np.floor(ids))
    _, first = np.unique(ids[valid], return_index=True)
    keep = np.sort(np.flatnonzero(valid)[first])
    np.testing.assert_array_equal(SurveyFiles(folder).targetid_drops("drop"),
                                  np.setdiff1d(np.arange(len(ids)), keep))
    rows = embed.survey_rows(_smoke_data(duplicate_policy="drop"), folder, 7781, 32)
    got = rows.read(0, rows.n)
    np.testing.assert_array_equal(got["index"], keep)
    np.testing.assert_array_equal(got["targetid"], ids[keep].astype(np.int64))
    assert rows.meta["dropped"] == {"duplicate_policy": len(ids) - len(keep)}
    # Repeats alone: named with the places of the first one.
    folder = _id_survey(tmp_path / "repeats", [[5, 7], [9, 5]])
    with pytest.raises(DataError, match=r"targetid 5 appears more than once \(.*part_0.h5 row 0, "
                                        r".*part_1.h5 row 1\); 1 repeated row"):
        embed.survey_rows(_smoke_data(), folder, 7781, 32)


def test_files_that_disagree_are_named_in_one_line(tmp_path):
    folder = str(tmp_path / "mixed")
    os.makedirs(folder)
    write_survey_file(os.path.join(folder, "a.h5"), np.zeros((2, 40, 40, 3)), targetid=[1, 2])
    write_survey_file(os.path.join(folder, "b.h5"), np.zeros((2, 40, 40, 3)))
    with pytest.raises(DataError, match=r"survey file .*b.h5 has no 'targetid' but .*a.h5 has"):
        SurveyFiles(folder)
    write_survey_file(os.path.join(folder, "b.h5"), np.zeros((2, 48, 48, 3)), targetid=[3, 4])
    with pytest.raises(DataError, match=r"b.h5: images rows have shape \(3, 48, 48\), .*a.h5's "
                                        r"have \(3, 40, 40\)"):
        SurveyFiles(folder)
    empty = write_survey_file(str(tmp_path / "empty.h5"), np.zeros((0, 40, 40, 3)))
    with pytest.raises(DataError, match=r"survey .*empty.h5 has no rows"):
        SurveyFiles(empty)
    words = write_survey_file(str(tmp_path / "words.h5"), spectra=np.array([[b"a", b"b"]]))
    with pytest.raises(DataError, match=r"words.h5: 'spectrum' is |S1; expected numbers"):
        SurveyFiles(words)


def test_non_finite_rows_follow_the_nan_policy(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 1, (10, 40, 40, 3)).astype(np.float32)
    images[3, 5, 6, 1] = np.nan
    images[7, 0, 0, 0] = np.inf
    path = write_survey_file(str(tmp_path / "nan.h5"), images, targetid=np.arange(10) + 100)
    rows = embed.survey_rows(_smoke_data(), path, 7781, 32)
    with pytest.raises(DataError, match=r"survey file .*nan.h5, row 3 \(targetid 103\): image "
                                        r"has non-finite flux \(2 such row\(s\) in survey rows "
                                        r"0..9\).*data.nan_policy='mask'"):
        rows.read(0, 10)
    data = _smoke_data(nan_policy="mask")
    got = embed.survey_rows(data, path, 7781, 32).read(0, 10)
    keep = np.array([0, 1, 2, 4, 5, 6, 8, 9])
    np.testing.assert_array_equal(got["index"], keep)
    np.testing.assert_array_equal(got["targetid"], keep + 100)
    np.testing.assert_array_equal(got["image"], preprocess.preprocess_images(images[keep], data))


def test_cutouts_smaller_than_the_crop_are_one_line_and_leave_nothing(smoke_run, tmp_path):
    path = write_survey_file(str(tmp_path / "small.h5"), np.ones((4, 24, 24, 3), np.float32))
    workdir = str(tmp_path / "run")
    shutil.copytree(smoke_run, workdir, ignore=shutil.ignore_patterns("embeddings"))
    proc = subprocess.run(cli_runs.command("embed", workdir, f"--config.eval.survey_file={path}"),
                          cwd=cli_runs.ROOT, env=cli_runs.env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: survey {path}: cutouts are 24x24 pixels, smaller than the 32x32 the run's model "
        "crops (data.image_crop 32, model image size 32)")
    assert not os.path.exists(os.path.join(workdir, "embeddings"))


def test_a_poisoned_survey_embeds_its_good_rows_under_its_own_name(smoke_run, tmp_path):
    raw = _raw_test_split()
    images, n = raw["image"].copy(), len(raw["image"])
    images[[4, 30]] = np.nan  # two rows left out (nan_policy "mask")
    ids = raw["targetid"].copy()
    ids[40] = ids[10]  # a repeat, left out (duplicate_policy "drop")
    folder = _write_chunks(str(tmp_path / "a" / "south"), images, {"targetid": ids}, (30, 22))
    workdir = str(tmp_path / "run")
    shutil.copytree(smoke_run, workdir, ignore=shutil.ignore_patterns("embeddings"))
    config = spender.get_config("smoke")
    config.data.data_dir = cli_runs.DATA_DIR
    config.eval.survey_file, config.eval.embed_chunk_rows = folder, 16
    config.data.duplicate_policy = "drop"
    # nan_policy "raise": one line naming the first bad row, and no empty table left behind.
    with pytest.raises(DataError, match=r"survey file .*images_000.h5, row 4 \(targetid "
                                        rf"{ids[4]}\): image has non-finite flux"):
        embed.ensure_embeddings(settings_lib.resolve(config), workdir, log=lambda line: None)
    assert not os.path.exists(os.path.join(workdir, "embeddings"))
    config.data.nan_policy = "mask"
    settings = settings_lib.resolve(config)
    lines = []
    directory, manifest, _ = embed.ensure_embeddings(settings, workdir, log=lines.append)
    keep = np.setdiff1d(np.arange(n), [4, 30, 40])
    arrays, meta, _ = embed.read_embeddings(directory)
    assert manifest["n"] == meta["n"] == len(keep) and meta["survey_rows"] == n
    assert meta["dropped"] == {"duplicate_policy": 1, "nan_policy": 2}
    assert any("left out 2 row(s) with non-finite" in line for line in lines)
    np.testing.assert_array_equal(arrays["index"], keep)
    np.testing.assert_array_equal(arrays["targetid"], ids[keep])
    embedder = restore.load_embedder(smoke_run, "best")
    np.testing.assert_allclose(arrays["image_embedding"], embedder.embed_images(images[keep]),
                               rtol=0, atol=1e-5)
    # The same survey again: its own table, reused. Another survey also called "south": another.
    lines.clear()
    assert embed.ensure_embeddings(settings, workdir, log=lines.append)[0] == directory
    assert not any("wrote" in line for line in lines)
    other = _write_chunks(str(tmp_path / "b" / "south"), raw["image"], {}, (52,))
    config.eval.survey_file = other
    second, _, _ = embed.ensure_embeddings(settings_lib.resolve(config), workdir,
                                           log=lambda line: None)
    assert second != directory and os.path.basename(second).startswith("survey-south-")
    assert embed.read_embeddings(directory)[1]["n"] == len(keep)  # the first one untouched
