"""Synthetic Galaxy Zoo DECaLS volunteer votes for the synthetic galaxies (pure NumPy).

Each galaxy is shown to N volunteers. A volunteer walks the GZD-5 decision tree
(`galaxy_zoo.schema()`: a question is asked only of the volunteers who gave its parent answer;
smooth-or-featured and merging are asked of everyone) and picks each answer with the galaxy's
answer probabilities below, independently of the other volunteers. The catalogue then holds,
as the published one does, per question the number of volunteers asked (`<q>_total-votes`) and
per answer the fraction of them who gave it (`<q>_<a>_fraction`; NaN when nobody was asked).

The answer probabilities, from the generator's catalogue values (`synthetic.generate`): bulge
fraction B (r-band B/T), axis ratio q, half-light radius theta in arcsec (`r_eff_arcsec`:
r_eff_kpc at the galaxy's angular-diameter distance, `synthetic.r_eff_arcsec`), log sSFR s,
log M* m, the artefact flag; sig(x) is the
logistic function and softmax(l) the probabilities exp(l_k) / sum exp(l):

    smooth-or-featured  artifact a = 0.9 with an artefact in the cutout, else 0.02;
                        featured f = sig(6 (0.45 - B) + 2 ln(theta / 1.5"))  (disky and large
                        looks featured; small, faint discs look smooth, as real volunteers see);
                        (smooth, featured-or-disk, artifact) = ((1 - a)(1 - f), (1 - a) f, a)
    disk-edge-on        yes = sig((0.32 - q) / 0.04)  (a thin disc, intrinsic 0.2, near edge-on)
    has-spiral-arms     yes = sig(3 (s + 10) + 2 (0.3 - B))  (young light in a disc)
    bar                 softmax(-1 + 2 (m - 10.5), -0.3 + (m - 10.5), 0)  (strong, weak, no:
                        bars are commoner in massive discs)
    bulge-size          softmax(-(B - c_k)^2 / (2 0.1^2)), c = (0.75, 0.5, 0.3, 0.12, 0)
                        (dominant, large, moderate, small, none)
    how-rounded         softmax((q - 0.7) / 0.06, 0, (0.45 - q) / 0.06)  (round, in-between,
                        cigar-shaped)
    edge-on-bulge       softmax(-2, (0.2 - B) / 0.08, (B - 0.2) / 0.08)  (boxy, none, rounded)
    spiral-winding      softmax((B - 0.15) / 0.1 + (m - 10.3) / 0.3, 0,
                                (0.15 - B) / 0.1 - (m - 10.3) / 0.3)  (tight, medium, loose:
                        tighter towards bigger bulges and masses, the Hubble sequence)
    spiral-arm-count    softmax(ln(0.06, 0.5, 0.16, 0.06, 0.04, 0.18)
                                + (0, 0, 0, 0, 0, -2 ln(theta / 1.5")))  (1, 2, 3, 4, more than
                        4, can't tell: more "can't tell" for small galaxies)
    merging             softmax(2.5, 0.3 + 2.5 [bright star in the cutout], -1.5, -2)  (none,
                        minor disturbance, major disturbance, merger: a bright neighbour
                        looks like a disturbance)

Volunteers per galaxy: with probability 0.75 the galaxy was retired, N = 40 + Poisson(3);
otherwise N = Poisson(5) (GZD-5's active-learning galaxies with a few votes), at most N_MAX.

Galaxy i's votes come from their own generator, seeded by (seed, VOTES_KEY, i): the streams of
the parameters and of the noise are untouched, so images and spectra are the same with or
without the votes, and any slice of galaxies gets the same votes however it is cut.
"""

from __future__ import annotations

import numpy as np

from astroclip_jax.data import galaxy_zoo

VOTES_KEY = 3  # synthetic.py uses 1 (parameters) and 2 (noise)
N_MAX = 64
RETIRED_RATE = 0.75
RETIRED_BASE, RETIRED_EXTRA, FEW_VOTES = 40, 3.0, 5.0
THETA_0 = 1.5  # arcsec
ARM_COUNT_BASE = (0.06, 0.5, 0.16, 0.06, 0.04, 0.18)
BULGE_SIZE_CENTRES = (0.75, 0.5, 0.3, 0.12, 0.0)
ARTEFACT_ARTIFACT_RATE, CLEAN_ARTIFACT_RATE = 0.9, 0.02
INPUTS = ("bulge_fraction", "axis_ratio", "r_eff_arcsec", "log_ssfr", "log_mstar", "artefact")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(*logits):
    z = np.stack(np.broadcast_arrays(*logits), axis=-1)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _binary(p_first):
    return np.stack([p_first, 1.0 - p_first], axis=-1)


def answer_probabilities(cat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{question: (n, K) probabilities of its answers, in the schema's order} (the model above)
    from catalogue columns `INPUTS`."""
    b = np.asarray(cat["bulge_fraction"], np.float64)
    q = np.asarray(cat["axis_ratio"], np.float64)
    s = np.asarray(cat["log_ssfr"], np.float64)
    m = np.asarray(cat["log_mstar"], np.float64)
    art = np.asarray(cat["artefact"])
    log_theta = np.log(np.asarray(cat["r_eff_arcsec"], np.float64) / THETA_0)
    a = np.where(art != 0, ARTEFACT_ARTIFACT_RATE, CLEAN_ARTIFACT_RATE)
    f = _sigmoid(6.0 * (0.45 - b) + 2.0 * log_theta)
    zero = np.zeros_like(b)
    return {
        "smooth-or-featured": np.stack([(1 - a) * (1 - f), (1 - a) * f, a], axis=-1),
        "disk-edge-on": _binary(_sigmoid((0.32 - q) / 0.04)),
        "has-spiral-arms": _binary(_sigmoid(3.0 * (s + 10.0) + 2.0 * (0.3 - b))),
        "bar": _softmax(-1.0 + 2.0 * (m - 10.5), -0.3 + (m - 10.5), zero),
        "bulge-size": _softmax(*[-(b - c) ** 2 / (2 * 0.1**2) for c in BULGE_SIZE_CENTRES]),
        "how-rounded": _softmax((q - 0.7) / 0.06, zero, (0.45 - q) / 0.06),
        "edge-on-bulge": _softmax(zero - 2.0, (0.2 - b) / 0.08, (b - 0.2) / 0.08),
        "spiral-winding": _softmax((b - 0.15) / 0.1 + (m - 10.3) / 0.3, zero,
                                   (0.15 - b) / 0.1 - (m - 10.3) / 0.3),
        "spiral-arm-count": _softmax(*[np.log(w) + zero for w in ARM_COUNT_BASE[:-1]],
                                     np.log(ARM_COUNT_BASE[-1]) - 2.0 * log_theta),
        "merging": _softmax(zero + 2.5, 0.3 + 2.5 * (art == 2), zero - 1.5, zero - 2.0),
    }


def _draws(seed: int, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(volunteers (n,), uniforms (n, N_MAX, questions)) from each galaxy's own generator."""
    k = len(galaxy_zoo.schema())
    n_vol = np.empty(len(index), np.int64)
    u = np.empty((len(index), N_MAX, k))
    for j, i in enumerate(index):
        rng = np.random.default_rng([seed, VOTES_KEY, int(i)])
        if rng.random() < RETIRED_RATE:
            n_vol[j] = RETIRED_BASE + rng.poisson(RETIRED_EXTRA)
        else:
            n_vol[j] = rng.poisson(FEW_VOTES)
        u[j] = rng.random((N_MAX, k))
    return np.minimum(n_vol, N_MAX), u


def vote_counts(cat: dict[str, np.ndarray], seed: int, index) -> dict[str, np.ndarray]:
    """{`<q>_total-votes`: (n,) int, `<q>_<a>`: (n,) int votes} of galaxies `index`."""
    probs = answer_probabilities(cat)
    n_vol, u = _draws(seed, np.asarray(index))
    present = np.arange(N_MAX)[None, :] < n_vol[:, None]  # (n, V) volunteers who came
    chosen = {}  # "<q>_<a>" -> (n, V) bool: this volunteer gave that answer
    out = {}
    for k, question in enumerate(galaxy_zoo.schema()):
        asked = present if question.asked_after is None else chosen[question.asked_after]
        cdf = np.cumsum(probs[question.name], axis=-1)  # (n, K)
        # Inverse CDF per volunteer; the last answer takes any rounding remainder.
        pick = np.minimum((u[:, :, k, None] >= cdf[:, None, :-1]).sum(-1),
                          len(question.answers) - 1)
        out[galaxy_zoo.total_column(question.name)] = asked.sum(1)
        for a, answer in enumerate(question.answers):
            gave = asked & (pick == a)
            chosen[f"{question.name}_{answer}"] = gave
            out[galaxy_zoo.answer_column(question.name, answer)] = gave.sum(1)
    return out


def feature_names() -> list[str]:
    """The columns `vote_columns` adds: per question its total, then its answers' fractions."""
    out = []
    for q in galaxy_zoo.schema():
        out.append(galaxy_zoo.total_column(q.name))
        out += galaxy_zoo.label_columns(q.name, "fraction")
    return out


def vote_columns(cat: dict[str, np.ndarray], seed: int, index) -> dict[str, np.ndarray]:
    """The published columns of the votes, float32 (as the dataset stores every catalogue
    value): `<q>_total-votes` and `<q>_<a>_fraction` (NaN when nobody was asked)."""
    counts = vote_counts(cat, seed, index)
    out = {}
    for q in galaxy_zoo.schema():
        total = counts[galaxy_zoo.total_column(q.name)]
        out[galaxy_zoo.total_column(q.name)] = total.astype(np.float32)  # exact below 2^24
        for a in q.answers:
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = counts[galaxy_zoo.answer_column(q.name, a)] / total
            out[galaxy_zoo.answer_column(q.name, a, "fraction")] = np.where(
                total > 0, frac, np.nan).astype(np.float32)
    return out
