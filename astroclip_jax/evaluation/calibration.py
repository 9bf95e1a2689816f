"""Calibration of predicted posteriors from their CDFs: PIT values, a KS test against the uniform
distribution and the coverage of central intervals with binomial bounds.

Everything here takes PIT values (the predicted marginal CDF at each row's true value), so any
posterior, a trained flow, an ensemble mixture or a deliberately wrong one built from them, is
scored by the same functions. For a continuous CDF F the true value lies in the central interval
[F^-1((1 - c) / 2), F^-1((1 + c) / 2)] exactly when its PIT lies in [(1 - c) / 2, (1 + c) / 2],
so coverage needs no quantile search.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats


def ks_uniform_pvalue(pit: np.ndarray) -> float:
    """p-value of the two-sided KS test of the PIT values against U(0, 1) (scipy)."""
    return float(stats.kstest(np.asarray(pit, np.float64), "uniform").pvalue)


def coverage(pit: np.ndarray, level: float) -> float:
    """Fraction of rows whose true value lies in the central `level` interval."""
    pit = np.asarray(pit, np.float64)
    lo, hi = (1 - level) / 2, (1 + level) / 2
    return float(np.mean((pit >= lo) & (pit <= hi)))


def binomial_bounds(n: int, level: float, confidence: float = 0.99) -> tuple[float, float]:
    """Central `confidence` range of the empirical coverage of n calibrated rows
    (Binomial(n, level) / n)."""
    lo, hi = stats.binom.interval(confidence, n, level)
    return float(lo / n), float(hi / n)


@dataclasses.dataclass(frozen=True)
class Calibration:
    ks_p: float
    coverage: dict[float, float]
    bounds: dict[float, tuple[float, float]]

    def calibrated(self, alpha: float = 0.01) -> bool:
        """KS does not reject at `alpha` and every coverage lies in its binomial bounds."""
        return self.ks_p >= alpha and all(
            self.bounds[c][0] <= v <= self.bounds[c][1] for c, v in self.coverage.items())


def calibration(pit: np.ndarray, levels=(0.68, 0.95), confidence: float = 0.99) -> Calibration:
    pit = np.asarray(pit, np.float64).ravel()
    return Calibration(ks_p=ks_uniform_pvalue(pit),
                       coverage={c: coverage(pit, c) for c in levels},
                       bounds={c: binomial_bounds(pit.size, c, confidence) for c in levels})
