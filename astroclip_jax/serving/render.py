"""Pictures for the page: a cutout as the figures draw it (PNG), a spectrum as a small SVG plot."""

from __future__ import annotations

import base64
import io

import numpy as np


SPECTRUM_POINTS = 300  # bins drawn: enough for lines, small enough for a 240-px plot
_W, _H, _PAD = 240, 90, 14


def png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB image, row 0 at the bottom as in the figures (`origin="lower"`)."""
    import matplotlib.image

    out = io.BytesIO()
    matplotlib.image.imsave(out, np.clip(rgb, 0.0, 1.0), format="png", origin="lower")
    return out.getvalue()


def data_uri(content: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(content).decode('ascii')}"


def spectrum_svg(wave: np.ndarray, flux: np.ndarray, colour: str = "#1f4e9c") -> str:
    """A small SVG line plot of a (normalised) spectrum, binned to `SPECTRUM_POINTS` means,
    with its wavelength range written under it."""
    wave, flux = np.asarray(wave, np.float64), np.asarray(flux, np.float64)
    bins = max(1, len(flux) // SPECTRUM_POINTS)
    m = len(flux) // bins
    x = wave[:m * bins].reshape(m, bins).mean(axis=1)
    y = flux[:m * bins].reshape(m, bins).mean(axis=1)
    lo, hi = np.percentile(y, [0.5, 99.5])
    hi = hi if hi > lo else lo + 1.0
    px = _PAD + (x - x[0]) / max(x[-1] - x[0], 1e-9) * (_W - 2 * _PAD)
    py = (_H - _PAD) - (np.clip(y, lo, hi) - lo) / (hi - lo) * (_H - 2 * _PAD)
    points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px, py))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" '
            f'width="{_W}" height="{_H}" role="img" aria-label="spectrum">'
            f'<rect width="{_W}" height="{_H}" fill="white"/>'
            f'<polyline fill="none" stroke="{colour}" stroke-width="1" points="{points}"/>'
            f'<g font-family="sans-serif" font-size="11" fill="#222">'
            f'<text x="{_PAD}" y="{_H - 2}">{wave[0]:.0f} \u00c5</text>'
            f'<text x="{_W - _PAD}" y="{_H - 2}" text-anchor="end">{wave[-1]:.0f} \u00c5</text>'
            f'<text x="{_W / 2}" y="{_H - 2}" text-anchor="middle">observed wavelength</text>'
            f'</g></svg>')
