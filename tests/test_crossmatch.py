"""crossmatch.match_one_to_one against astropy's nearest-neighbour match and a brute force."""

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord, match_coordinates_sky, search_around_sky

from astroclip_jax.data import crossmatch
from astroclip_jax.errors import DataError

ARCSEC = 1 / 3600


def _sky(n, rng, ra0=150.0, dec0=2.0, width=0.01):
    return ra0 + rng.uniform(0, width, n), dec0 + rng.uniform(0, width, n)


def _reference(ra1, dec1, ra2, dec2, radius):
    """Astropy's nearest neighbour with the radius (strict), then, per right row, the closest
    left row (lowest index on ties), by a plain loop."""
    left = SkyCoord(ra1 * u.deg, dec1 * u.deg)
    right = SkyCoord(ra2 * u.deg, dec2 * u.deg)
    idx, sep, _ = match_coordinates_sky(left, right)
    sep = sep.to_value(u.arcsec)
    best = {}
    for i in range(len(ra1)):
        if sep[i] < radius:
            j = int(idx[i])
            if j not in best or sep[i] < best[j][1]:
                best[j] = (i, sep[i])
    pairs = sorted((i, j, s) for j, (i, s) in best.items())
    return (np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64),
            np.array([p[2] for p in pairs]))


def test_equals_astropy_nearest_neighbour_with_radius_and_one_to_one():
    rng = np.random.default_rng(0)
    ra2, dec2 = _sky(300, rng)
    # left: jittered copies of 200 right rows (some beyond the radius), duplicates and strays
    pick = rng.choice(300, 200, replace=False)
    jitter = rng.normal(0, 0.6 * ARCSEC, (2, 200))
    ra1 = np.concatenate([ra2[pick] + jitter[0], ra2[pick[:40]] + 0.3 * ARCSEC,
                          _sky(30, rng)[0]])
    dec1 = np.concatenate([dec2[pick] + jitter[1], dec2[pick[:40]], _sky(30, rng)[1]])
    m = crossmatch.match_one_to_one(ra1, dec1, ra2, dec2, radius_arcsec=1.0)
    left, right, sep = _reference(ra1, dec1, ra2, dec2, 1.0)
    np.testing.assert_array_equal(m.left, left)
    np.testing.assert_array_equal(m.right, right)
    np.testing.assert_allclose(m.separation_arcsec, sep, rtol=0, atol=1e-9)
    assert m.left.dtype == m.right.dtype == np.int64
    assert len(np.unique(m.right)) == len(m.right)  # one-to-one
    assert (m.separation_arcsec < 1.0).all()
    # the case that matters happened: astropy alone maps some right rows twice
    idx, s, _ = match_coordinates_sky(SkyCoord(ra1 * u.deg, dec1 * u.deg),
                                      SkyCoord(ra2 * u.deg, dec2 * u.deg))
    upstream = np.asarray(idx)[s.to_value(u.arcsec) < 1.0]
    assert len(np.unique(upstream)) < len(upstream)


def test_two_left_rows_on_one_right_row_keep_the_closer():
    ra2, dec2 = np.array([10.0, 20.0]), np.array([0.0, 0.0])
    # left 0 at 0.8", left 1 at 0.3" from right 0: upstream pairs both with right 0
    ra1 = np.array([10.0, 10.0])
    dec1 = np.array([0.8, 0.3]) * ARCSEC
    idx, sep, _ = match_coordinates_sky(SkyCoord(ra1 * u.deg, dec1 * u.deg),
                                        SkyCoord(ra2 * u.deg, dec2 * u.deg))
    assert list(np.asarray(idx)[sep.to_value(u.arcsec) < 1]) == [0, 0]
    m = crossmatch.match_one_to_one(ra1, dec1, ra2, dec2)
    assert m.left.tolist() == [1] and m.right.tolist() == [0]
    np.testing.assert_allclose(m.separation_arcsec, [0.3], rtol=1e-9)


def test_equal_separations_keep_the_lower_left_index_whatever_the_order():
    # mirror images about the equator: the same separation from (10, 0)
    dec1 = np.array([0.4, -0.4, 0.4]) * ARCSEC
    ra1 = np.array([10.0, 10.0, 30.0])
    for order in ([0, 1, 2], [1, 0, 2]):
        m = crossmatch.match_one_to_one(ra1[order], dec1[order], [10.0, 30.0], [0.0, 0.4 * ARCSEC])
        assert m.left.tolist() == [0, 2] and m.right.tolist() == [0, 1]


def test_radius_is_strict_and_empty_inputs_give_an_empty_match():
    m = crossmatch.match_one_to_one([10.0], [0.5 * ARCSEC], [10.0], [0.0], radius_arcsec=0.4)
    assert len(m) == 0 and m.left.dtype == np.int64
    assert len(crossmatch.match_one_to_one([], [], [1.0], [1.0])) == 0
    assert len(crossmatch.match_one_to_one([1.0], [1.0], [], [])) == 0


@pytest.mark.parametrize("args, message", [
    (([1.0, 2.0], [1.0], [1.0], [1.0]), r"left ra/dec: expected two 1-D arrays"),
    (([1.0], [np.nan], [1.0], [1.0]), r"left ra/dec: row 0 is not finite"),
    (([1.0], [1.0], [1.0], [91.0]), r"right dec: row 0 is 91.0"),
    (([1.0], [1.0], ["a"], [1.0]), r"right ra/dec: expected numbers"),
])
def test_bad_coordinates_are_one_line_data_errors(args, message):
    with pytest.raises(DataError, match=message) as err:
        crossmatch.match_one_to_one(*args)
    assert "\n" not in str(err.value)


def test_bad_radius():
    with pytest.raises(DataError, match="radius_arcsec: expected a positive number"):
        crossmatch.match_one_to_one([1.0], [1.0], [1.0], [1.0], radius_arcsec=0)


def test_many_to_one_within_radius_all_found_by_search_around_sky():
    """Every kept pair is among astropy's pairs within the radius (an independent search)."""
    rng = np.random.default_rng(1)
    ra2, dec2 = _sky(100, rng)
    ra1, dec1 = ra2 + rng.normal(0, 0.5 * ARCSEC, 100), dec2 + rng.normal(0, 0.5 * ARCSEC, 100)
    m = crossmatch.match_one_to_one(ra1, dec1, ra2, dec2, radius_arcsec=1.0)
    i1, i2, _, _ = search_around_sky(SkyCoord(ra1 * u.deg, dec1 * u.deg),
                                     SkyCoord(ra2 * u.deg, dec2 * u.deg), 1.0 * u.arcsec)
    assert set(zip(m.left.tolist(), m.right.tolist())) <= set(zip(i1.tolist(), i2.tolist()))
