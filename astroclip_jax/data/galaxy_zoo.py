"""Galaxy Zoo DECaLS (GZD-5) volunteer votes: the question schema, the published catalogue, the
vote cut and the cross-match to cutouts, as AstroCLIP's morphology task reads them.

The schema (ten questions, their answers, and the answer after which each question is asked)
is zoobot's, shipped as `resources/gz_decals_schema.json` with its provenance (zoobot's
`label_metadata.py`: `decals_pairs` at fda17b0 and the '-dr5' entries of
`decals_ortho_dependencies` at 8d6c455; tests/test_galaxy_zoo.py compares it with that source).

The published catalogue (Walmsley et al. 2022, Zenodo record 4573248:
`gz_decals_volunteers_5.csv` / `.parquet`) has one row per galaxy: `iauname`, `ra`, `dec`
(degrees), and per question `<question>_total-votes`, per answer `<question>_<answer>` (votes),
`<question>_<answer>_fraction` (votes / total, empty when nobody was asked) and
`<question>_<answer>_debiased` (redshift-debiased fractions: the labels AstroCLIP trains on).

AstroCLIP (`downstream_tasks/morphology_classification/`) keeps galaxies with
`smooth-or-featured_total-votes >= 3` and pairs them with Legacy Survey cutouts by astropy's
`match_to_catalog_sky` within 0.5 arcsec (not one-to-one: two catalogue rows may take the same
cutout). Here the pairing is one-to-one (`crossmatch.match_one_to_one`), at the same radius.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np

from astroclip_jax.errors import DataError, MissingInput

SCHEMA_FILE = os.path.join(os.path.dirname(__file__), "resources", "gz_decals_schema.json")
FILENAME = "gz_decals_volunteers_5.csv"  # also published as .parquet
URL = "https://zenodo.org/records/4573248/files/gz_decals_volunteers_5.csv?download=1"
MATCH_RADIUS_ARCSEC = 0.5  # AstroCLIP's cross_match.py
MIN_VOTES = 3  # AstroCLIP's cut, on smooth-or-featured_total-votes
ID_COLUMNS = ("iauname", "ra", "dec")
LABEL_KINDS = ("fraction", "debiased")


@dataclasses.dataclass(frozen=True)
class Question:
    name: str
    answers: tuple[str, ...]
    asked_after: str | None  # "<question>_<answer>" of the parent; None: asked of everyone


@functools.lru_cache(maxsize=1)
def schema() -> tuple[Question, ...]:
    """The ten GZD-5 questions in zoobot's order."""
    with open(SCHEMA_FILE) as f:
        table = json.load(f)
    return tuple(Question(q["name"], tuple(q["answers"]), q["asked_after"])
                 for q in table["questions"])


def question(name: str) -> Question:
    for q in schema():
        if q.name == name:
            return q
    raise KeyError(name)


def total_column(q: str) -> str:
    return f"{q}_total-votes"


def answer_column(q: str, answer: str, kind: str = "count") -> str:
    """The published column of an answer: its votes ("count"), "fraction" or "debiased"."""
    base = f"{q}_{answer}"
    return base if kind == "count" else f"{base}_{kind}"


def label_columns(q: str, kind: str = "fraction") -> list[str]:
    return [answer_column(q, a, kind) for a in question(q).answers]


def catalogue_columns(debiased: bool = True) -> list[str]:
    """Every column this module reads, in the published order (ids, then per question the
    total, then per answer its votes, fraction and debiased fraction)."""
    out = list(ID_COLUMNS)
    for q in schema():
        out.append(total_column(q.name))
        for a in q.answers:
            kinds = ("count", "fraction", "debiased") if debiased else ("count", "fraction")
            out += [answer_column(q.name, a, k) for k in kinds]
    return out


def _read_table(path: str):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        return pq.read_table(path)
    # iauname as text whatever it looks like; empty cells (nobody asked) are nulls.
    return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
        column_types={"iauname": "string"}, strings_can_be_null=True))


def read_catalogue(path: str, min_votes: int = MIN_VOTES) -> dict[str, np.ndarray]:
    """The volunteer-vote table at `path` (.csv or .parquet, published layout), the galaxies
    with `smooth-or-featured_total-votes >= min_votes`, as {column: array}: `iauname` (str),
    `ra`, `dec` (float64, degrees), totals and votes (float64), fractions and, when the file
    has them, debiased fractions (float64; NaN where the file is empty), and `row` (int64: the
    galaxy's row in the file). Raises MissingInput or DataError (one line: file and column)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingInput(f"Galaxy Zoo catalogue {path} does not exist; expected {FILENAME} "
                           f"(or .parquet) from {URL}")
    try:
        table = _read_table(path)
    except Exception as err:  # pyarrow raises its own kinds for a malformed file
        raise DataError(f"Galaxy Zoo catalogue {path}: cannot be read as "
                        f"{'Parquet' if path.endswith('.parquet') else 'CSV'} "
                        f"({' '.join(str(err).split())})") from err
    names = set(table.column_names)
    debiased = all(answer_column(q.name, a, "debiased") in names
                   for q in schema() for a in q.answers)
    wanted = catalogue_columns(debiased)
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(f"Galaxy Zoo catalogue {path}: no column {missing[0]!r} "
                        f"({len(missing)} missing); expected the published GZ DECaLS columns "
                        "(<question>_total-votes, <question>_<answer>, ..._fraction)")
    out = {"iauname": np.asarray(table.column("iauname").to_pylist(), dtype=object).astype(str)}
    for name in wanted[1:]:
        column = table.column(name)
        try:
            values = column.cast("float64").to_numpy()
        except Exception as err:  # text in a numeric column
            raise DataError(f"Galaxy Zoo catalogue {path}: column {name!r} is not numeric "
                            f"({column.type})") from err
        out[name] = np.asarray(values, np.float64)
    for name in ("ra", "dec"):
        if not np.all(np.isfinite(out[name])):
            bad = int(np.flatnonzero(~np.isfinite(out[name]))[0])
            raise DataError(f"Galaxy Zoo catalogue {path}: row {bad} has no {name}; expected "
                            "finite coordinates in degrees")
    out["row"] = np.arange(table.num_rows, dtype=np.int64)
    return vote_cut(out, min_votes)


def vote_cut(catalogue: dict[str, np.ndarray], min_votes: int = MIN_VOTES,
             q: str = "smooth-or-featured") -> dict[str, np.ndarray]:
    """The rows with at least `min_votes` answers to question `q` (a missing total counts 0)."""
    total = np.nan_to_num(np.asarray(catalogue[total_column(q)], np.float64))
    keep = total >= min_votes
    return {k: np.asarray(v)[keep] for k, v in catalogue.items()}


@dataclasses.dataclass(frozen=True)
class CutoutMatch:
    """Catalogue rows paired with cutout rows (one-to-one), and their separations."""

    catalogue_rows: np.ndarray  # positions in the catalogue dict
    cutout_rows: np.ndarray
    separation_arcsec: np.ndarray


def match_to_cutouts(catalogue: dict[str, np.ndarray], cutout_ra, cutout_dec,
                     radius_arcsec: float = MATCH_RADIUS_ARCSEC) -> CutoutMatch:
    """Pairs each catalogue galaxy with the cutout at its position (within `radius_arcsec`,
    each cutout used once), by `crossmatch.match_one_to_one`."""
    from astroclip_jax.data import crossmatch

    m = crossmatch.match_one_to_one(np.asarray(catalogue["ra"], np.float64),
                                    np.asarray(catalogue["dec"], np.float64),
                                    np.asarray(cutout_ra, np.float64),
                                    np.asarray(cutout_dec, np.float64),
                                    radius_arcsec=radius_arcsec)
    return CutoutMatch(np.asarray(m.left, np.int64), np.asarray(m.right, np.int64),
                       np.asarray(m.separation_arcsec, np.float64))


def has_votes(arrays, kind: str = "fraction") -> bool:
    """Whether a table holds every question's total and `kind` columns (published names)."""
    return all(c in arrays for q in schema()
               for c in (total_column(q.name), *label_columns(q.name, kind)))


def labels(arrays: dict[str, np.ndarray], q: str, kind: str = "fraction"
           ) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N, K) float64, total votes (N,)) of question `q` from a table whose columns have
    the published names (the catalogue, an embeddings table). NaN totals count 0."""
    if kind not in LABEL_KINDS:
        raise ValueError(f"label kind {kind!r}; expected one of {LABEL_KINDS}")
    cols = label_columns(q, kind)
    missing = [c for c in (*cols, total_column(q)) if c not in arrays]
    if missing:
        raise DataError(f"no column {missing[0]!r} for Galaxy Zoo question {q!r}; the table "
                        f"has {sorted(k for k in arrays if k.startswith(q + '_'))}")
    y = np.stack([np.asarray(arrays[c], np.float64) for c in cols], axis=1)
    return y, np.nan_to_num(np.asarray(arrays[total_column(q)], np.float64))
