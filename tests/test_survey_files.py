"""Surveys of one modality: the reader against NumPy slicing of what was written in
ssl-legacysurvey's layout (a directory of HDF5 chunks, `images` channels first, catalogue
columns beside them), and image-only / spectrum-only embedding against the notebook Embedder
on the same raw cutouts and spectra."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest

import cli_runs
from astroclip_jax import settings as settings_lib
from astroclip_jax import wavelength_grids
from astroclip_jax.data import pipeline
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
