"""The synthetic dataset's stored inverse variances and the Spender inputs made from them.

- `synthetic_desi` stores `ivar`, and over generated rows the noise in each stored spectrum
  (minus the generator's noiseless spectrum of the same galaxy) has variance 1 / ivar, pixel
  by pixel (chi^2 per pixel: its mean and spread over the pixels);
- Spender pretraining's inputs use the stored ivar: a dataset with other ivars gets spender's
  weights of those (sky lines and ivar <= 1e-6 zeroed, times norm^2, norm the torch median);
  on synthetic data they equal the weights derived from the DESI std, which is what data
  without an ivar (the AstroCLIP file) get.
"""

import dataclasses

import numpy as np
import pytest
import spender
import torch

from astroclip_jax import wavelength_grids
from astroclip_jax.data import builders, pipeline, prepare, spender_inputs, synthetic
from astroclip_jax.data.pretraining_records import SpectraRecords
from test_data_formats import SMOKE, _config, _standin, write_astroclip

N, SIZE = 200, 16  # galaxies, image pixels (the images play no part here)
WAVE = wavelength_grids.desi_wave()
L = WAVE.size


def _prepared(tmp_path_factory, name, num_pairs, generate=None):
    cfg = builders.SyntheticDesiConfig(name=name, num_pairs=num_pairs, image_size=SIZE,
                                       block_size=50)
    data = dataclasses.replace(SMOKE, builder_config=cfg, grid="desi",
                               data_dir=str(tmp_path_factory.mktemp("tfds")))
    with pytest.MonkeyPatch.context() as mp:
        if generate is not None:
            mp.setattr(synthetic, "generate", generate)
        prepare.prepare(data)
    return data


def _all_rows(data, fields):
    parts = [pipeline.read_records(source, range(len(source)), fields)
             for source in (pipeline.data_source(data, s) for s in ("train", "test"))]
    return {k: np.concatenate([p[k] for p in parts]) for k in fields}


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    return _prepared(tmp_path_factory, "ivar", N)


def test_stored_ivar_is_the_variance_of_the_added_noise(synthetic_data):
    rows = _all_rows(synthetic_data, ("targetid", "spectrum", "ivar"))
    direct = synthetic.generate(N, image_size=SIZE, return_noiseless=True)
    order = np.argsort(rows["targetid"])
    np.testing.assert_array_equal(rows["targetid"][order], direct["targetid"])
    ivar = rows["ivar"][order].astype(np.float64)
    np.testing.assert_array_equal(ivar, direct["ivar"])
    noise = rows["spectrum"][order].astype(np.float64) - direct["spectrum_noiseless"]
    # Per pixel chi^2 with N degrees of freedom if ivar = 1 / var: z = (chi^2 - N) / sqrt(2N)
    # has mean 0 and E z^2 = 1, over L independent pixels (bounds: 5 sigma of the means).
    z = (np.sum(noise ** 2 * ivar, axis=0) - N) / np.sqrt(2 * N)
    assert abs(z.mean()) < 5 / np.sqrt(L)  # the pooled variance, to 5 sqrt(2 / (N L)) = 0.6 %
    # Var(z^2) = 2 + 12 / N (chi^2 kurtosis): a pixel whose ivar is off by a factor s adds
    # N (s - 1)^2 / 2 to its z^2, so 20 % of the pixels off by +-10 % add 0.2 (bound 0.08).
    assert abs(np.mean(z ** 2) - 1) < 5 * np.sqrt((2 + 12 / N) / L)


def _other_ivar(n, seed=0, *, start=0, grid="desi", image_size=152):
    """The stand-in with positive spectra at z = 0.1 and per-galaxy ivars unlike the DESI std,
    some at or below spender's 1e-6 floor."""
    out = _standin(n, seed, start=start, grid=grid, image_size=image_size)
    rng = np.random.default_rng([seed, start])
    out["spectrum"] = rng.uniform(1.0, 3.0, (n, L)).astype(np.float32)
    out["ivar"] = rng.uniform(0.1, 10.0, (n, L)).astype(np.float32)
    out["ivar"][:, ::13] = 0.0
    out["ivar"][:, 5::17] = 1e-6
    out["redshift"] = np.full(n, 0.1, np.float32)
    return out


def test_spender_inputs_use_the_stored_ivar(tmp_path_factory):
    data = _prepared(tmp_path_factory, "other_ivar", 10, generate=_other_ivar)
    records = SpectraRecords(data, "train")
    assert records.has_ivar
    got = records.batch(np.arange(len(records)))
    raw = pipeline.read_records(records._source, range(len(records)), ("spectrum", "ivar"))
    w = torch.from_numpy(raw["ivar"].copy())
    w[w <= 1e-6] = 0  # spender's DESI.prepare_spectra, then its sky-line mask
    w[:, spender.instrument.get_skyline_mask(torch.from_numpy(WAVE))] = 0
    window = (WAVE / 1.1 > 5300) & (WAVE / 1.1 < 5850)
    for i in range(len(records)):
        norm = float(torch.median(torch.from_numpy(raw["spectrum"][i])[(w[i] > 0).numpy() & window]))
        np.testing.assert_allclose(got["spectrum"][i], raw["spectrum"][i] / norm, rtol=1e-6)
        np.testing.assert_allclose(got["weights"][i], w[i].numpy() * norm ** 2, rtol=1e-6)


def test_spender_inputs_on_synthetic_data_equal_the_derived_ones(synthetic_data, tmp_path):
    derived = spender_inputs.weights(None, "desi")
    records = SpectraRecords(synthetic_data, "train")
    assert records.has_ivar
    raw = pipeline.read_records(records._source, range(16), ("spectrum", "redshift"))
    want = spender_inputs.normalise(raw["spectrum"], derived, raw["redshift"], WAVE)
    got = records.batch(np.arange(16))
    np.testing.assert_array_equal(got["spectrum"], want[0])
    np.testing.assert_array_equal(got["weights"], want[1])
    # The AstroCLIP file has no ivar: its records get those derived weights.
    manual = tmp_path / "manual"
    manual.mkdir()
    write_astroclip(manual / "astroclip_desi.1.1.5.h5")
    astroclip = _config(builder_config="joint", data_dir=str(tmp_path / "tfds"),
                        manual_dir=str(manual))
    prepare.prepare(astroclip)
    records = SpectraRecords(astroclip, "train")
    assert not records.has_ivar
    raw = pipeline.read_records(records._source, range(len(records)), ("spectrum", "redshift"))
    got = records.batch(np.arange(len(records)))
    want = spender_inputs.normalise(raw["spectrum"], derived, raw["redshift"], WAVE)
    np.testing.assert_array_equal(got["weights"], want[1])
    assert (got["weights"] > 0).any()
