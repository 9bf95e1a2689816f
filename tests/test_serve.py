"""The search server (`--mode=serve`) on a smoke run, over HTTP on 127.0.0.1: a burst of
concurrent queries each checked against NumPy brute force over the embeddings table, uploads
that find their own galaxy, the catalogue and pictures against the dataset's records, and bad
requests that get a 4xx with a message while the server keeps serving."""

import concurrent.futures
import csv
import io
import socket

import httpx
import matplotlib.image
import numpy as np
import pytest
from astropy.io import fits

import cli_runs
from astroclip_jax import settings as settings_lib
from astroclip_jax.data import pipeline, preprocess
from astroclip_jax.errors import ConfigError, UserError
from astroclip_jax.serving import app as app_lib
from configs import spender

DIRECTIONS = {"image_to_image": ("image", "image"), "spectrum_to_spectrum": ("spectrum", "spectrum"),
              "image_to_spectrum": ("image", "spectrum"), "spectrum_to_image": ("spectrum", "image")}


@pytest.fixture(scope="module")
def server(smoke_server):
    return smoke_server.url


@pytest.fixture(scope="module")
def table(smoke_server):
    """The embeddings table the server searches, read independently of it."""
    return smoke_server.table


@pytest.fixture(scope="module")
def source():
    config = spender.get_config("smoke")
    config.data.data_dir = cli_runs.DATA_DIR
    return pipeline.data_source(settings_lib.resolve(config).data, "test")


def brute_force(table, direction, row, k):
    """float64 cosine similarities of the query row against every row, the query galaxy's own
    target id left out, top k (stable argsort)."""
    a, b = DIRECTIONS[direction]
    q = np.asarray(table[f"{a}_embedding"][row], np.float64)
    keys = np.asarray(table[f"{b}_embedding"], np.float64)
    sims = keys @ q / (np.linalg.norm(keys, axis=1) * np.linalg.norm(q))
    order = [i for i in np.argsort(-sims, kind="stable") if i != row][:k]
    return table["targetid"][order], sims[order], np.sort(sims[[i for i in range(len(sims))
                                                                  if i != row]])[::-1]


def check_answer(answer, table, direction, row, k):
    want_ids, want_sims, all_sims = brute_force(table, direction, row, k)
    got = answer["neighbours"]
    assert answer["query"]["targetid"] == int(table["targetid"][row])
    assert [n["rank"] for n in got] == list(range(1, k + 1))
    np.testing.assert_allclose([n["similarity"] for n in got], want_sims, atol=2e-6)
    # Ranks are compared where the similarity gap to the next galaxy exceeds float32 rounding.
    gaps = -np.diff(all_sims[:k + 1])
    for r in range(k):
        if gaps[r] > 1e-5 and (r == 0 or gaps[r - 1] > 1e-5):
            assert got[r]["targetid"] == int(want_ids[r])
    assert set(n["targetid"] for n in got).isdisjoint({int(table["targetid"][row])})


def test_a_burst_of_concurrent_queries_all_answer_like_brute_force(server, table):
    rng = np.random.default_rng(0)
    n = len(table["targetid"])
    jobs = [[(str(rng.choice(list(DIRECTIONS))), int(rng.integers(n)), int(rng.integers(1, 12)))
             for _ in range(50)] for _ in range(8)]

    def client(queries):
        answers = []
        with httpx.Client(base_url=server, timeout=60) as http:
            for direction, row, k in queries:
                r = http.get("/api/search", params={"direction": direction, "k": k,
                                                    "targetid": int(table["targetid"][row])})
                answers.append((r.status_code, r.json(), direction, row, k))
        return answers

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = [a for answers in pool.map(client, jobs) for a in answers]
    assert len(results) == 400
    for status, answer, direction, row, k in results:
        assert status == 200, answer
        check_answer(answer, table, direction, row, k)


def test_random_queries_and_csv_match_the_json(server, table):
    for seed in range(3):
        answer = httpx.get(f"{server}/api/search", params={"direction": "spectrum_to_image",
                                                           "random": 1, "seed": seed, "k": 5}).json()
        row = int(np.flatnonzero(table["targetid"] == answer["query"]["targetid"])[0])
        check_answer(answer, table, "spectrum_to_image", row, 5)
        text = httpx.get(f"{server}/api/search", params={"direction": "spectrum_to_image",
                                                         "random": 1, "seed": seed, "k": 5,
                                                         "format": "csv"}).text
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [int(r["targetid"]) for r in rows] == [n["targetid"]
                                                     for n in answer["neighbours"]]
        np.testing.assert_allclose([float(r["redshift"]) for r in rows],
                                   [n["redshift"] for n in answer["neighbours"]], rtol=1e-7)


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _fits(array) -> bytes:
    buf = io.BytesIO()
    fits.PrimaryHDU(array).writeto(buf)
    return buf.getvalue()


def _upload(server, content, direction, k=3, name="upload.npy"):
    return httpx.post(f"{server}/api/search", files={"file": (name, content)},
                      data={"direction": direction, "k": str(k)}, timeout=60)


def test_uploads_of_a_galaxy_find_that_galaxy_first(server, source):
    record = source[11]
    tid = int(record["targetid"])
    uploads = [(_npy(record["image"]), "image_to_image"),
               (_fits(np.moveaxis(record["image"], -1, 0)), "image_to_image"),  # (3, H, W)
               (_npy(record["spectrum"].astype(np.float64)), "spectrum_to_spectrum"),
               (_fits(record["spectrum"]), "spectrum_to_spectrum")]
    for content, direction in uploads:
        r = _upload(server, content, direction)
        assert r.status_code == 200, r.text
        top = r.json()["neighbours"][0]
        assert top["targetid"] == tid and top["similarity"] > 0.99999, (direction, top)
        assert r.json()["query"]["source"] == "upload"


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(server, table):
    tid = int(table["targetid"][0])
    image = np.ones((40, 40, 3), np.float32)
    nan_image = image.copy()
    nan_image[3, 4, 1] = np.nan
    cases = [
        (lambda: httpx.get(f"{server}/api/galaxy/12345"), 404, "no galaxy with target id 12345"),
        (lambda: httpx.get(f"{server}/api/search", params={"direction": "image_to_image",
                                                           "targetid": 7}), 404, "target id 7"),
        (lambda: httpx.get(f"{server}/api/search", params={"direction": "sideways",
                                                           "targetid": tid}), 400, "direction"),
        (lambda: httpx.get(f"{server}/api/search", params={"direction": "image_to_image",
                                                           "targetid": "x1"}), 422, "targetid"),
        (lambda: httpx.get(f"{server}/api/search", params={"direction": "image_to_image",
                                                           "targetid": tid, "k": 0}), 400, "k is 0"),
        (lambda: httpx.get(f"{server}/api/search", params={"direction": "image_to_image",
                                                           "targetid": tid, "k": 101}), 400, "k is"),
        (lambda: httpx.get(f"{server}/api/search", params={"direction": "image_to_image"}), 400,
         "targetid"),
        (lambda: httpx.get(f"{server}/api/search", params={"direction": "image_to_image",
                                                           "targetid": tid, "format": "xml"}),
         400, "format"),
        (lambda: httpx.get(f"{server}/api/galaxy/..%2F..%2Fetc%2Fpasswd"), 404, "Not Found"),
        (lambda: httpx.get(f"{server}/static/..%2Fservice.py"), 404, ""),
        (lambda: _upload(server, b"hello, not an array", "image_to_image"), 400, "neither"),
        (lambda: _upload(server, _npy(np.ones((10, 10, 3))), "image_to_image"), 400,
         "at least 32x32"),
        (lambda: _upload(server, _npy(np.ones((40, 40))), "image_to_image"), 400, "(H, W, 3)"),
        (lambda: _upload(server, _npy(nan_image), "image_to_image"), 400, "NaN"),
        (lambda: _upload(server, _npy(np.array(["a", "b"])), "image_to_image"), 400, "flux"),
        (lambda: _upload(server, _npy(np.array([{}], dtype=object)), "image_to_image"), 400,
         "could not be read"),
        (lambda: _upload(server, _npy(image), "spectrum_to_image"), 400, "7781 flux values"),
        (lambda: _upload(server, _npy(np.ones(7781))[:200], "spectrum_to_image"), 400,
         "could not be read"),
        (lambda: _upload(server, b"SIMPLE  = garbage" * 10, "image_to_image"), 400, "FITS"),
        (lambda: _upload(server, b"\0" * (8 * 2 ** 20 + 1), "image_to_image"), 413, "bytes"),
    ]
    for request, status, message in cases:
        r = request()
        assert r.status_code == status, (message, r.status_code, r.text)
        assert message in r.json()["error"], r.text
        assert httpx.get(f"{server}/api/info").status_code == 200


def test_galaxy_catalogue_and_pictures_are_the_dataset_records(server, source, table):
    rows = [0, 17, len(table["targetid"]) - 1]
    raw = pipeline.read_records(source, rows)
    for i, row in enumerate(rows):
        tid = int(raw["targetid"][i])
        info = httpx.get(f"{server}/api/galaxy/{tid}").json()
        assert info["targetid"] == tid
        for field in ("redshift", "log_mstar", "z_hp"):
            value = float(raw[field][i])
            assert (info[field] is None) if np.isnan(value) else info[field] == pytest.approx(value)
        png = httpx.get(f"{server}/api/galaxy/{tid}/image.png")
        assert png.headers["content-type"] == "image/png"
        shown = matplotlib.image.imread(io.BytesIO(png.content), format="png")[::-1, :, :3]
        # Stein's ToRGB of the 32-px centre crop, as the smoke model saw it (figures' rendering).
        want = preprocess.stein_rgb(preprocess.center_crop(raw["image"][i], 32))
        np.testing.assert_allclose(shown, want, atol=1 / 255 + 1e-6)
        svg = httpx.get(f"{server}/api/galaxy/{tid}/spectrum.svg")
        assert svg.headers["content-type"].startswith("image/svg+xml")
        assert svg.text.startswith("<svg") and "polyline" in svg.text


def test_serve_settings_are_checked_and_a_taken_port_is_one_line():
    config = spender.get_config("smoke")
    config.serve.k = 200
    with pytest.raises(ConfigError, match="serve.k"):
        settings_lib.resolve(config)
    config = spender.get_config("smoke")
    config.index.recall_target = 1.5
    with pytest.raises(ConfigError, match="index.recall_target"):
        settings_lib.resolve(config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(UserError, match="cannot serve on 127.0.0.1"):
            app_lib._check_port("127.0.0.1", s.getsockname()[1])


def test_the_page_and_its_files_are_package_data(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and 'src="/static/app.js"' in page.text
    for name, mime in app_lib.STATIC.items():
        r = httpx.get(f"{server}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(mime)
