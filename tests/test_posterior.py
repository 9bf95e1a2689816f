"""Posterior estimation (evaluation/posterior.py, calibration.py) against a toy whose conditional
density is known: y | x ~ N(sin x, (0.1 + 0.2 |x|)^2)."""

import dataclasses

import jax
import numpy as np
import pytest
from scipy import stats

from astroclip_jax import settings as settings_lib
from astroclip_jax.evaluation import calibration as calib
from astroclip_jax.evaluation import posterior as post

SETTINGS = settings_lib.PosteriorSettings(
    enabled=True, ensemble=4, epochs=20, batch_size=128, learning_rate=2e-3,
    min_learning_rate=1e-6, knots=8, bound=3.0, blocks=(2, 3), hidden=(16, 32), layers=3,
    val_fraction=0.2, joint=False, feature_sets=("image",), show=3)
QUIET = lambda *a: None  # noqa: E731


def toy(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, (n, 1))
    scale = 0.1 + 0.2 * np.abs(x[:, 0])
    return x, np.sin(x[:, 0]) + scale * rng.normal(size=n), scale


@pytest.fixture(scope="module")
def trained():
    """One ensemble on 8,000 labelled rows, 3,000 held out; standardised here as the entry
    point does."""
    x, y, scale = toy(11_000, 0)
    fit, q = slice(0, 8000), slice(8000, None)
    xs, ys = post.Standardiser.fit(x[fit]), post.Standardiser.fit(y[fit, None])
    ens = post.fit_ensemble(jax.random.key(0), xs(x[fit]), ys(y[fit, None]), SETTINGS, QUIET)
    return dict(ens=ens, xs=xs, ys=ys, qx=xs(x[q]), qy=ys(y[q, None]), x=x[q], y=y[q],
                scale=scale[q])


def test_held_out_nll_is_close_to_the_true_density(trained):
    lp = post.member_log_prob(trained["ens"], trained["qx"], trained["qy"]).sum(-1)  # (E, N)
    nll_members = post.nll_original_units(-lp.mean(1), trained["ys"].std)
    nll_mixture = post.nll_original_units(-post.mixture_log_prob(lp).mean(), trained["ys"].std)
    true = -stats.norm.logpdf(trained["y"], np.sin(trained["x"][:, 0]), trained["scale"]).mean()
    assert nll_mixture - true < 0.02, (nll_mixture, true)
    assert nll_mixture > true - 0.05  # no better than the truth, beyond sampling noise
    assert np.mean(nll_members) - true < 0.04, (nll_members, true)


def _mixture_cdf(trained, y_std):
    return post.member_cdf(trained["ens"], trained["qx"], y_std).mean(0)[:, 0]


def test_pit_is_uniform_and_coverage_within_binomial_bounds(trained):
    c = calib.calibration(_mixture_cdf(trained, trained["qy"]))
    assert c.ks_p >= 0.01, c
    for level in (0.68, 0.95):
        lo, hi = c.bounds[level]
        assert lo <= c.coverage[level] <= hi, (level, c)
    assert c.calibrated()


def test_too_narrow_posterior_fails_calibration(trained):
    """The trained mixture squeezed by 2 about its own median: F'(y) = F(m + 2 (y - m))."""
    lo = np.full(len(trained["qy"]), -8.0)
    hi = np.full(len(trained["qy"]), 8.0)
    for _ in range(40):  # bisection for each row's median
        mid = (lo + hi) / 2
        below = _mixture_cdf(trained, mid[:, None]) < 0.5
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    m = ((lo + hi) / 2)[:, None]
    narrow = _mixture_cdf(trained, m + 2 * (trained["qy"] - m))
    c = calib.calibration(narrow)
    assert c.ks_p < 0.01, c
    for level in (0.68, 0.95):
        assert c.coverage[level] < c.bounds[level][0], (level, c)
    assert not c.calibrated()


def test_density_integrates_to_one_1d(trained):
    grid = np.linspace(-10, 10, 4001)
    for i in range(3):
        dens = post.marginal_density_grid(trained["ens"], trained["qx"][i], trained["qy"][i], 0,
                                          grid)
        np.testing.assert_allclose(np.trapezoid(dens, grid, axis=1), 1.0, atol=2e-3)


def test_joint_flow_density_integrates_to_one_2d():
    x, y, _ = toy(600, 1)
    y2 = np.stack([y, np.cos(x[:, 0]) + 0.3 * np.random.default_rng(2).normal(size=600)], 1)
    s = dataclasses.replace(SETTINGS, ensemble=2, epochs=3, joint=True, batch_size=64)
    ens = post.fit_ensemble(jax.random.key(3), x, (y2 - y2.mean(0)) / y2.std(0), s, QUIET)
    g = np.linspace(-8, 8, 241)
    gy = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    for row in x[:2]:
        lp = post.member_log_prob(ens, np.repeat(row[None], len(gy), 0), gy).sum(-1)  # (E, G*G)
        dens = np.exp(lp).reshape(-1, g.size, g.size)
        total = np.trapezoid(np.trapezoid(dens, g, axis=2), g, axis=1)
        np.testing.assert_allclose(total, 1.0, atol=3e-3)


def test_standardisation_jacobian_closed_form():
    """N(mu, s^2) in original units = the standard normal's NLL of (y - mu) / s + log s."""
    rng = np.random.default_rng(4)
    mu, s = 3.0, 0.37
    y = mu + s * rng.normal(size=1000)
    nll_std = -stats.norm.logpdf((y - mu) / s).mean()
    np.testing.assert_allclose(post.nll_original_units(nll_std, [s]),
                               -stats.norm.logpdf(y, mu, s).mean(), rtol=1e-12)
    # joint: the sum of the log scales
    np.testing.assert_allclose(post.nll_original_units(1.0, [2.0, 3.0]), 1.0 + np.log(6.0))


def test_entry_point_units_and_labels_of_held_out_rows_unused():
    """Rescaling the target by 10 shifts every NLL by log 10 (same flows: standardised targets
    are identical); replacing the held-out labels changes the scores but not what was trained
    (best epochs, validation curves)."""
    x, y, _ = toy(1500, 5)
    fit, q = np.arange(1000), np.arange(1000, 1500)
    s = dataclasses.replace(SETTINGS, ensemble=2, epochs=3)
    run = lambda arrays: post.evaluate_posteriors(  # noqa: E731
        arrays, fit, q, {"image": (x[fit], x[q])}, ("y",), s, seed=7, log=QUIET)
    a = run({"y": y})
    b = run({"y": 10 * y + 3})
    y_other = y.copy()
    y_other[q] = np.random.default_rng(6).permutation(y[q]) + 1.0
    c = run({"y": y_other})
    get = lambda r, m: next(e for e in r["entries"] if e["metric"] == m)  # noqa: E731
    for m in ("nll", "nll_mixture"):
        np.testing.assert_allclose(np.array(get(b, m)["values"]) - get(a, m)["values"],
                                   np.log(10), atol=2e-3)
    assert a["details"] == c["details"]
    assert get(a, "nll")["values"] != get(c, "nll")["values"]
    metrics = {e["metric"] for e in a["entries"]}
    assert metrics == {"nll", "nll_mixture", "pit_ks_p", "coverage68", "coverage95"}
    assert all(e["method"] == "flow" and e["n_labelled"] == 1000 for e in a["entries"])
    assert set(a["figures"]) == {"posterior_calibration.png", "posteriors.png"}
