"""Galaxy Zoo DECaLS: the schema against zoobot's source, the published catalogue read back,
the vote cut, the cross-match to cutouts, and the synthetic votes against their written model."""

from __future__ import annotations

import ast
import json
import os
import subprocess

import numpy as np
import pytest

from astroclip_jax.data import galaxy_zoo as G
from astroclip_jax.data import synthetic as S
from astroclip_jax.data import synthetic_votes as V
from astroclip_jax.errors import DataError, MissingInput

# A clone of github.com/mwalmsley/zoobot (a git directory); the schema's provenance is checked
# against it where it exists.
ZOOBOT_GIT = os.environ.get("ZOOBOT_GIT", "/work/.mirror/mwalmsley+zoobot/repo")


# ------------------------------------------------------------------------------- the schema

def _zoobot_source(source: dict) -> str:
    if not os.path.isdir(ZOOBOT_GIT):
        pytest.skip(f"no zoobot clone at {ZOOBOT_GIT} (set ZOOBOT_GIT)")
    spec = f"{source['commit']}:{source['path']}"
    blob = subprocess.run(["git", f"--git-dir={ZOOBOT_GIT}", "rev-parse", spec],
                          capture_output=True, text=True)
    if blob.returncode != 0:
        pytest.skip(f"zoobot clone at {ZOOBOT_GIT} lacks {spec}")
    assert blob.stdout.strip() == source["git_blob"]  # the provenance names this very file
    return subprocess.run(["git", f"--git-dir={ZOOBOT_GIT}", "show", spec], check=True,
                          capture_output=True, text=True).stdout


def _assigned(text: str, name: str):
    """The literal assigned to `name` at the top level of a Python file (never imported)."""
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not assigned in the file")


def test_schema_answers_are_zoobots():
    provenance = json.load(open(G.SCHEMA_FILE))["answers_source"]
    pairs = _assigned(_zoobot_source(provenance), provenance["variable"])
    ours = {q.name: ["_" + a for a in q.answers] for q in G.schema()}
    assert list(ours.items()) == list(pairs.items())  # questions, answers and their order


def test_schema_tree_is_zoobots():
    provenance = json.load(open(G.SCHEMA_FILE))["asked_after_source"]
    deps = _assigned(_zoobot_source(provenance), provenance["variable"])
    dr5 = {q.removesuffix("-dr5"): None if parent is None else parent.replace("-dr5", "")
           for q, parent in deps.items() if q.endswith("-dr5")}
    assert {q.name: q.asked_after for q in G.schema()} == dr5


def test_schema_is_a_tree_in_asking_order():
    """Each parent answer exists and its question comes first (votes are drawn in this order)."""
    seen = set()
    for q in G.schema():
        assert q.asked_after is None or q.asked_after in seen, q
        seen |= {f"{q.name}_{a}" for a in q.answers}
    assert len(G.schema()) == 10


# ------------------------------------------------------------------------------- the catalogue

def _published_table(n_rows: int, seed: int = 0):
    """A small table in the published column layout (ids, photometry, per question total,
    votes, fraction, debiased; empty where nobody was asked), and its totals of question 1."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    cols = {"iauname": [f"J{h:06.2f}+00{m:02d}00.0" for h, m in zip(
                rng.uniform(0, 240000, n_rows), rng.integers(0, 60, n_rows))],
            "ra": rng.uniform(0, 360, n_rows), "dec": rng.uniform(-10, 30, n_rows),
            "redshift": rng.uniform(0.02, 0.15, n_rows),
            "upload_group": ["pre_active"] * n_rows}
    first = rng.choice([0, 1, 2, 3, 5, 40, 44], size=n_rows)
    for q in G.schema():
        total = first if q.asked_after is None else rng.integers(0, 3, n_rows) * first // 2
        votes = rng.multinomial(1, np.ones(len(q.answers)) / len(q.answers),
                                size=(n_rows, 60)).sum(1)[:, :len(q.answers)]
        votes = np.minimum(votes, total[:, None])
        cols[G.total_column(q.name)] = total
        for a, answer in enumerate(q.answers):
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = np.where(total > 0, votes[:, a] / total, np.nan)
            cols[G.answer_column(q.name, answer)] = votes[:, a]
            cols[G.answer_column(q.name, answer, "fraction")] = frac
            cols[G.answer_column(q.name, answer, "debiased")] = frac * 0.9
    return pd.DataFrame(cols), first


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_reader_reads_published_layout(tmp_path, suffix):
    import pandas as pd

    table, first = _published_table(40)
    path = str(tmp_path / f"gz_decals_volunteers_5{suffix}")
    if suffix == ".csv":
        table.to_csv(path, index=False)  # NaN -> empty cells, as published
        back = pd.read_csv(path, dtype={"iauname": str})
    else:
        table.to_parquet(path, index=False)
        back = pd.read_parquet(path)
    got = G.read_catalogue(path)
    keep = np.flatnonzero(first >= 3)
    assert keep.size and keep.size < len(first)  # the cut removes some and keeps some
    np.testing.assert_array_equal(got["row"], keep)
    np.testing.assert_array_equal(got["iauname"], back["iauname"].to_numpy()[keep].astype(str))
    for name in G.catalogue_columns(debiased=True)[1:]:
        np.testing.assert_array_equal(got[name], back[name].to_numpy(np.float64)[keep],
                                      err_msg=name)
    assert np.isnan(got["disk-edge-on_yes_fraction"]).any()  # empty cells stay missing
    loose = G.read_catalogue(path, min_votes=1)
    np.testing.assert_array_equal(loose["row"], np.flatnonzero(first >= 1))


def test_reader_without_debiased_columns(tmp_path):
    table, _ = _published_table(12, seed=1)
    table = table[[c for c in table.columns if not c.endswith("_debiased")]]
    path = str(tmp_path / "gz.csv")
    table.to_csv(path, index=False)
    got = G.read_catalogue(path, min_votes=0)
    assert "bar_no_fraction" in got and "bar_no_debiased" not in got
    assert G.has_votes(got) and not G.has_votes(got, "debiased")
    assert not G.has_votes({k: v for k, v in got.items() if k != "merging_total-votes"})


def test_vote_cut_counts_missing_totals_as_zero():
    cat = {"smooth-or-featured_total-votes": np.array([np.nan, 0, 2, 3, 40.0]),
           "x": np.arange(5)}
    np.testing.assert_array_equal(G.vote_cut(cat, 3)["x"], [3, 4])


def test_reader_bad_input_is_one_line(tmp_path):
    with pytest.raises(MissingInput, match="does not exist"):
        G.read_catalogue(str(tmp_path / "nope.csv"))
    table, _ = _published_table(6, seed=2)
    path = str(tmp_path / "short.csv")
    table.drop(columns=["bar_weak_fraction"]).to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        G.read_catalogue(path)
    assert "bar_weak_fraction" in str(err.value) and path in str(err.value)
    assert "\n" not in str(err.value)
    table["merging_merger"] = "many"
    table.to_csv(path, index=False)
    with pytest.raises(DataError, match="'merging_merger' is not numeric"):
        G.read_catalogue(path)


def test_match_to_cutouts_equals_astropy():
    """Within 0.5" (AstroCLIP's radius), one-to-one; astropy's nearest neighbours agree where
    no two galaxies compete for one cutout."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord, match_coordinates_sky

    rng = np.random.default_rng(4)
    n = 60
    ra, dec = rng.uniform(10, 20, n), rng.uniform(-5, 5, n)
    offset = rng.uniform(0.0, 0.9, n) / 3600.0  # some inside 0.5", some outside
    cut_ra = ra + offset / np.cos(np.radians(dec))
    cut_dec = dec.copy()
    order = rng.permutation(n)
    cat = {"ra": ra, "dec": dec}
    m = G.match_to_cutouts(cat, cut_ra[order], cut_dec[order])
    idx, sep, _ = match_coordinates_sky(SkyCoord(ra * u.deg, dec * u.deg),
                                        SkyCoord(cut_ra[order] * u.deg, cut_dec[order] * u.deg))
    inside = np.flatnonzero(sep.arcsec < G.MATCH_RADIUS_ARCSEC)
    assert 0 < inside.size < n
    np.testing.assert_array_equal(np.sort(m.catalogue_rows), inside)
    by_row = dict(zip(m.catalogue_rows.tolist(), m.cutout_rows.tolist()))
    assert [by_row[i] for i in inside] == idx[inside].tolist()
    assert np.all(m.separation_arcsec < G.MATCH_RADIUS_ARCSEC)
    # Two galaxies 0.1" and 0.3" from one cutout: astropy gives it to both, here the closer.
    pair = {"ra": np.array([50.0 + 0.3 / 3600, 50.0 + 0.1 / 3600]), "dec": np.zeros(2)}
    m = G.match_to_cutouts(pair, np.array([50.0, 60.0]), np.zeros(2))
    assert m.catalogue_rows.tolist() == [1] and m.cutout_rows.tolist() == [0]
    assert m.separation_arcsec[0] == pytest.approx(0.1, rel=1e-6)


# ------------------------------------------------------------------------------- synthetic votes

@pytest.fixture(scope="module")
def population():
    n = 3072
    p = S.parameters(n, seed=11)
    cat = {k: p[k].astype(np.float32) for k in S.CATALOGUE_KEYS}
    cat["artefact"] = p["artefact"].astype(np.int8)
    cat["r_eff_arcsec"] = S.r_eff_arcsec(cat["r_eff_kpc"], cat["redshift"])
    return cat, V.vote_counts(cat, 11, np.arange(n)), V.vote_columns(cat, 11, np.arange(n))


def test_votes_follow_the_written_model(population):
    """Given the volunteers asked, each answer's votes are binomial with the model's
    probability: per bin of the generator's bulge fraction (and of axis ratio), the summed votes
    equal the summed expectations within 4.5 standard deviations, for every answer."""
    cat, counts, _ = population
    probs = V.answer_probabilities(cat)
    checked = 0
    for key, edges in (("bulge_fraction", [0, 0.05, 0.2, 0.5, 0.8, 1.01]),
                       ("axis_ratio", [0, 0.3, 0.5, 0.7, 0.85, 1.01])):
        bins = np.digitize(cat[key], edges)
        for q in G.schema():
            total = counts[G.total_column(q.name)].astype(np.float64)
            for a, answer in enumerate(q.answers):
                c = counts[G.answer_column(q.name, answer)]
                p = probs[q.name][:, a]
                for b in np.unique(bins):
                    sel = bins == b
                    expected = np.sum(total[sel] * p[sel])
                    var = np.sum(total[sel] * p[sel] * (1 - p[sel]))
                    if var < 4:
                        continue
                    z = (c[sel].sum() - expected) / np.sqrt(var)
                    assert abs(z) < 4.5, (key, b, q.name, answer, z)
                    checked += 1
    assert checked > 100


def test_votes_respond_to_the_morphology(population):
    """The written model's physics shows in the fractions: bulge-dominated galaxies are voted
    smooth, thin discs edge-on, artefacts artifact."""
    cat, _, cols = population
    smooth = cols["smooth-or-featured_smooth_fraction"]
    assert np.nanmean(smooth[cat["bulge_fraction"] > 0.8]) > 0.8
    assert np.nanmean(smooth[cat["bulge_fraction"] < 0.05]) < 0.4
    edge = cols["disk-edge-on_yes_fraction"]
    assert np.nanmean(edge[cat["axis_ratio"] < 0.25]) > 0.8
    assert np.nanmean(edge[cat["axis_ratio"] > 0.5]) < 0.05
    art = cols["smooth-or-featured_artifact_fraction"]
    assert np.nanmean(art[cat["artefact"] != 0]) > 0.8 > 0.1 > np.nanmean(art[cat["artefact"] == 0])


def test_model_values_from_the_docstring():
    """Points where the written formulas give round numbers: B = 0.45 and theta = 1.5" make
    featured 1/2 (so smooth = featured = 0.49 without an artefact, 0.05 with one); q = 0.32
    makes edge-on 1/2; q = 0.575 makes round = cigar-shaped; m = 10.5 and s = -10, B = 0.3
    give bar softmax(-1, -0.3, 0) and spiral arms 1/2."""
    cat = {"bulge_fraction": np.array([0.45, 0.45, 0.3]),
           "axis_ratio": np.array([0.32, 0.575, 0.9]), "r_eff_arcsec": np.full(3, 1.5),
           "log_ssfr": np.array([-10.0, -10.0, -10.0]), "log_mstar": np.full(3, 10.5),
           "artefact": np.array([0, 1, 0])}
    p = V.answer_probabilities(cat)
    np.testing.assert_allclose(p["smooth-or-featured"][0], [0.49, 0.49, 0.02])
    np.testing.assert_allclose(p["smooth-or-featured"][1], [0.05, 0.05, 0.9])
    np.testing.assert_allclose(p["disk-edge-on"][0], [0.5, 0.5])
    assert p["how-rounded"][1, 0] == pytest.approx(p["how-rounded"][1, 2])
    np.testing.assert_allclose(p["bar"][2], np.exp([-1, -0.3, 0]) / np.exp([-1, -0.3, 0]).sum())
    np.testing.assert_allclose(p["has-spiral-arms"][2], [0.5, 0.5])
    np.testing.assert_allclose(p["spiral-arm-count"][0], V.ARM_COUNT_BASE)  # theta = 1.5"
    for q in G.schema():
        np.testing.assert_allclose(p[q.name].sum(1), 1.0)


def test_angular_size_is_astropys():
    """theta = r_eff / D_A (flat LCDM, H0 = 70, Omega_m = 0.3), as astropy computes it."""
    from astropy.cosmology import FlatLambdaCDM

    z = np.array([0.02, 0.1, 0.3, 0.6])
    d_a = FlatLambdaCDM(H0=70.0, Om0=0.3).angular_diameter_distance(z).to("kpc").value
    np.testing.assert_allclose(S.r_eff_arcsec(np.full(4, 5.0), z),
                               5.0 / d_a * 206264.80624709636, rtol=1e-4)


def test_vote_tree_is_consistent(population):
    """A question's total is its parent answer's votes (first questions: every volunteer);
    fractions sum to 1 where anyone was asked and are NaN where nobody was."""
    _, counts, cols = population
    everyone = counts["smooth-or-featured_total-votes"]
    assert 0 < np.mean(everyone >= 3) < 1 and np.mean(everyone > 34) > 0.5
    for q in G.schema():
        total = counts[G.total_column(q.name)]
        parent = everyone if q.asked_after is None else counts[q.asked_after]
        np.testing.assert_array_equal(total, parent)
        votes = np.stack([counts[G.answer_column(q.name, a)] for a in q.answers], 1)
        np.testing.assert_array_equal(votes.sum(1), total)
        frac = np.stack([cols[c] for c in G.label_columns(q.name)], 1)
        asked = total > 0
        np.testing.assert_allclose(frac[asked].sum(1), 1.0, rtol=1e-5)
        assert np.isnan(frac[~asked]).all()
        np.testing.assert_array_equal(cols[G.total_column(q.name)], total)


def test_votes_depend_only_on_seed_and_index(population):
    """Each galaxy's votes have their own stream: any slice gets the same votes."""
    cat, counts, _ = population
    part = {k: v[100:140] for k, v in cat.items()}
    again = V.vote_counts(part, 11, np.arange(100, 140))
    for k, v in again.items():
        np.testing.assert_array_equal(v, counts[k][100:140])
    other = V.vote_counts(part, 12, np.arange(100, 140))
    assert any(not np.array_equal(v, again[k]) for k, v in other.items())


def test_generate_adds_votes_without_touching_images(monkeypatch):
    with_votes = S.generate(3, seed=2, image_size=24)
    names = V.feature_names()
    assert set(names) <= set(with_votes)
    monkeypatch.setattr(V, "vote_columns", lambda *args: {})
    without = S.generate(3, seed=2, image_size=24)
    for k, v in without.items():
        np.testing.assert_array_equal(with_votes[k], v)
    assert set(with_votes) - set(without) == set(names)
