"""Observed-frame wavelength grids of the spectrographs (Angstrom)."""

import numpy as np

DESI_LENGTH = 7781
SDSS_LENGTH = 3921


def desi_wave() -> np.ndarray:
    """DESI grid used by AstroCLIP: 0.8 A pixels from 3600 to 9824 A (7781 pixels)."""
    return np.linspace(3600.0, 9824.0, DESI_LENGTH)


def sdss_wave() -> np.ndarray:
    """SDSS log-linear grid, 10**arange(3.578, 3.97, 1e-4): 3921 pixels."""
    return 10 ** np.arange(3.578, 3.97, 1e-4)


GRIDS = {"desi": desi_wave, "sdss": sdss_wave}


def wave(name: str) -> np.ndarray:
    """The grid called `name` ("desi" or "sdss")."""
    if name not in GRIDS:
        raise ValueError(f"unknown wavelength grid {name!r}; expected one of {sorted(GRIDS)}")
    return GRIDS[name]()
