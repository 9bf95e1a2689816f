"""Pairing two sky catalogues by position, one-to-one.

Each left row is paired with its nearest right row on the sky (astropy's
`match_coordinates_sky`, the same nearest-neighbour search as `SkyCoord.match_to_catalog_sky`)
when the separation is below `radius_arcsec` (strictly, as the Multimodal Universe's
`mmu.utils.cross_match_datasets` applies its `matching_radius`). The Multimodal Universe's
cross-match stops there, so two left rows whose nearest neighbour is the same right row both
keep it: one galaxy's image would appear in two pairs. Here the pairing is made one-to-one: of
the left rows claiming one right row, only the closest keeps it (ties: the lower left index),
and the others are dropped (they are not re-paired with their second-nearest neighbour; at a
1" radius between galaxy catalogues that loses next to nothing and keeps the rule simple).

Upstream also drops pairs whose two rows lie in different HEALPix partitions (its reader opens
one partition of each dataset at a time); this function works on whole catalogues and does not.
"""

import dataclasses

import numpy as np

from astroclip_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Match:
    """Row indices of the pairs (sorted by `left`) and their separations in arcsec."""

    left: np.ndarray  # int64 indices into the left catalogue, increasing
    right: np.ndarray  # int64 indices into the right catalogue, each at most once
    separation_arcsec: np.ndarray  # float64

    def __len__(self) -> int:
        return int(self.left.shape[0])


def _coords(ra, dec, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Checked float64 1-D (ra, dec) in degrees; one-line DataError naming `side`."""
    ra, dec = np.asarray(ra), np.asarray(dec)
    if ra.dtype.kind not in "fiu" or dec.dtype.kind not in "fiu":
        raise DataError(f"cross-match {side} ra/dec: expected numbers in degrees, got dtypes "
                        f"{ra.dtype} and {dec.dtype}")
    ra, dec = ra.astype(np.float64), dec.astype(np.float64)
    if ra.ndim != 1 or dec.shape != ra.shape:
        raise DataError(f"cross-match {side} ra/dec: expected two 1-D arrays of one length, "
                        f"got shapes {ra.shape} and {dec.shape}")
    bad = ~(np.isfinite(ra) & np.isfinite(dec))
    if bad.any():
        raise DataError(f"cross-match {side} ra/dec: row {int(np.argmax(bad))} is not finite "
                        f"({int(bad.sum())} such rows)")
    off = np.abs(dec) > 90.0
    if off.any():
        i = int(np.argmax(off))
        raise DataError(f"cross-match {side} dec: row {i} is {float(dec[i])!r}, expected "
                        "degrees in [-90, 90]")
    return ra, dec


def match_one_to_one(ra1, dec1, ra2, dec2, radius_arcsec: float = 1.0) -> Match:
    """Pairs rows of catalogue 1 (left) with rows of catalogue 2 (right), one-to-one.

    Inputs are degrees (ICRS). A left row's candidate is its nearest right row; it is kept when
    the separation is < `radius_arcsec`; of several left rows with the same candidate the closest
    keeps it (equal separations: the lowest left index). Deterministic for given inputs.
    Unlike upstream's `cross_match_datasets`, no right row is used twice.
    """
    try:
        radius = float(radius_arcsec)
    except (TypeError, ValueError):
        raise DataError(f"cross-match radius_arcsec: expected a positive number, got "
                        f"{radius_arcsec!r}") from None
    if not np.isfinite(radius) or radius <= 0:
        raise DataError(f"cross-match radius_arcsec: expected a positive number, got {radius!r}")
    ra1, dec1 = _coords(ra1, dec1, "left")
    ra2, dec2 = _coords(ra2, dec2, "right")
    empty = Match(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    if ra1.size == 0 or ra2.size == 0:
        return empty

    # Imported here: astropy's coordinates package takes ~1 s to import and most callers of the
    # data package never cross-match.
    from astropy import units as u
    from astropy.coordinates import SkyCoord, match_coordinates_sky

    left = SkyCoord(ra=ra1 * u.deg, dec=dec1 * u.deg, frame="icrs")
    right = SkyCoord(ra=ra2 * u.deg, dec=dec2 * u.deg, frame="icrs")
    # A one-row right catalogue is fine for astropy; nthneighbor=1 is the nearest row.
    idx, sep2d, _ = match_coordinates_sky(left, right, nthneighbor=1)
    sep = sep2d.to_value(u.arcsec).astype(np.float64)
    idx = np.asarray(idx, np.int64)
    li = np.nonzero(sep < radius)[0].astype(np.int64)
    if li.size == 0:
        return empty
    ri, si = idx[li], sep[li]
    # Sort by (right, separation, left); the first row of each right group wins.
    order = np.lexsort((li, si, ri))
    ri_sorted = ri[order]
    first = np.ones(order.size, bool)
    first[1:] = ri_sorted[1:] != ri_sorted[:-1]
    keep = order[first]
    keep = keep[np.argsort(li[keep], kind="stable")]
    return Match(li[keep], ri[keep], si[keep])
