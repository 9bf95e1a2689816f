"""HATS catalogues made with hats-import from a few hundred rows; lsdb's cross-match (plus the
one-to-one rule) equals crossmatch.match_one_to_one on the same rows."""

import numpy as np
import pytest

pytest.importorskip("lsdb")
pytest.importorskip("hats_import")
pd = pytest.importorskip("pandas")

from astroclip_jax.data import crossmatch, hats_catalogs  # noqa: E402
from astroclip_jax.errors import DataError, MissingInput  # noqa: E402

ARCSEC = 1 / 3600


@pytest.fixture(scope="module")
def catalogues(tmp_path_factory):
    root = tmp_path_factory.mktemp("hats")
    rng = np.random.default_rng(7)
    n = 300
    ra2 = 150 + rng.uniform(0, 0.5, n)
    dec2 = 2 + rng.uniform(0, 0.5, n)
    pick = rng.choice(n, 200, replace=False)
    ra1 = np.concatenate([ra2[pick] + rng.normal(0, 0.6 * ARCSEC, 200),
                          ra2[pick[:30]] + 0.3 * ARCSEC])  # second claimants of 30 right rows
    dec1 = np.concatenate([dec2[pick] + rng.normal(0, 0.6 * ARCSEC, 200), dec2[pick[:30]]])
    paths = {}
    for name, ra, dec in (("desi", ra1, dec1), ("legacysurvey", ra2, dec2)):
        src = root / f"{name}.parquet"
        pd.DataFrame({"row": np.arange(ra.size, dtype=np.int64), "ra": ra, "dec": dec}
                     ).to_parquet(src)
        paths[name] = hats_catalogs.import_catalog([src], root, name)
    return {"paths": paths, "left": (ra1, dec1), "right": (ra2, dec2)}


def test_lsdb_match_equals_the_in_memory_one_to_one_match(catalogues):
    got = hats_catalogs.match(catalogues["paths"]["desi"], catalogues["paths"]["legacysurvey"],
                              left_id="row", right_id="row", radius_arcsec=1.0)
    want = crossmatch.match_one_to_one(*catalogues["left"], *catalogues["right"], 1.0)
    np.testing.assert_array_equal(got["left"], want.left)
    np.testing.assert_array_equal(got["right"], want.right)
    # lsdb measures chords on the unit sphere, astropy great circles: equal to ~1e-9 arcsec
    np.testing.assert_allclose(got["separation_arcsec"], want.separation_arcsec, rtol=0,
                               atol=1e-6)
    assert len(want) > 150


def test_the_catalogue_reads_back_every_row(catalogues):
    frame = hats_catalogs.read(catalogues["paths"]["legacysurvey"]).compute()
    assert sorted(frame["row"].tolist()) == list(range(300))
    np.testing.assert_array_equal(frame.sort_values("row")["ra"].to_numpy(),
                                  catalogues["right"][0])


def test_bad_inputs(tmp_path, catalogues):
    with pytest.raises(MissingInput, match=r"HATS catalogue .*nowhere does not exist"):
        hats_catalogs.read(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"no column 'object_id'"):
        hats_catalogs.match(catalogues["paths"]["desi"], catalogues["paths"]["legacysurvey"],
                            left_id="row", right_id="object_id")
