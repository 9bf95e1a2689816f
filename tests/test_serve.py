"""The search server (`--mode=serve`) on a smoke run, over HTTP on 127.0.0.1: a burst of
concurrent queries each checked against NumPy brute force over the embeddings table, uploads
that find their own galaxy, the catalogue and pictures against the dataset's records, and bad
requests (files, parameters, Host headers, slow clients) that get a 4xx with a message, or
are cut off, while the server keeps serving. The server is started on port 0 and reached on
the port it prints (tests/serving_server.py)."""

import concurrent.futures
import csv
import io
import os
import shutil
import socket
import subprocess
import time
import tracemalloc
import urllib.parse

import httpx
import matplotlib.image
import numpy as np
import pytest
from astropy.io import fits

import cli_runs
from astroclip_jax import settings as settings_lib
from astroclip_jax.data import pipeline, preprocess
from astroclip_jax.data.survey_files import write_survey_file
from astroclip_jax.errors import ConfigError, UserError
from astroclip_jax.serving import app as app_lib
from astroclip_jax.serving import queries
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


def _assert_4xx(r, status, message):
    assert r.status_code == status, (message, r.status_code, r.text)
    assert message in r.json()["error"], r.text


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
         "object values"),
        (lambda: _upload(server, _npy(image), "spectrum_to_image"), 400, "7781 flux values"),
        (lambda: _upload(server, _npy(np.ones(7781))[:200], "spectrum_to_image"), 400,
         "expected a complete .npy file"),
        (lambda: _upload(server, b"SIMPLE  = garbage" * 10, "image_to_image"), 400, "FITS"),
        (lambda: _upload(server, b"\0" * (8 * 2 ** 20 + 1), "image_to_image"), 413, "bytes"),
    ]
    for request, status, message in cases:
        _assert_4xx(request(), status, message)
        assert httpx.get(f"{server}/api/info").status_code == 200


def _npy_with_header(shape: str, descr: str = "'<f4'", fortran: str = "False", data=b"") -> bytes:
    """A .npy file of format 1.0 whose header says what it is told, followed by ``data``
    (numpy.lib.format's layout: magic, version, header length, padded dict)."""
    header = f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + data


def _fits_header(cards: dict, data=b"", primary=True) -> bytes:
    """A FITS HDU written card by card (80-character cards, 2880-byte blocks), without astropy
    checking what the cards say."""
    first = {"SIMPLE": "T"} if primary else {}
    text = "".join(f"{k:<8}= {v:>20}".ljust(80) for k, v in {**first, **cards}.items())
    text += "END".ljust(80)
    text += " " * (-len(text) % 2880)
    return text.encode("ascii") + data + b"\0" * (-len(data) % 2880)


def _compressed(array, **kw) -> bytes:
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(array, **kw)]).writeto(buf)
    return buf.getvalue()


def _edit_cards(content: bytes, **cards) -> bytes:
    """``content`` with the value of each named header card replaced (same card length)."""
    out = bytearray(content)
    for name, value in cards.items():
        at = content.index(f"{name:<8}= ".encode())
        out[at:at + 80] = f"{name:<8}= {value:>20}".ljust(80)[:80].encode("ascii")
    return bytes(out)


def test_impossible_npy_and_fits_uploads_get_a_4xx_naming_the_file(server):
    """Headers that lie (shapes negative, zero, huge or not matching the data; object or
    structured dtypes; FITS cards astropy chokes on; truncated data; no image): each is refused
    with the field named and what was expected, and the server keeps serving."""
    image = np.ones((40, 40, 3), np.float32)
    good_fits = _fits(np.moveaxis(image, -1, 0))
    good_npy = _npy(image)
    cases = [
        (_npy_with_header("(-40, 40, 3)", data=bytes(19200)), 400, "sizes >= 0"),
        (_npy_with_header("(0, 40, 3)"), 400, "empty array"),
        (_npy_with_header("(40, 40, 3)", data=bytes(100)), 400, "complete .npy"),
        (_npy_with_header("(40, 40, 3)", data=bytes(19201)), 400, "complete .npy"),
        (_npy_with_header("(2**40, 2**40, 3)"), 400, ".npy header could not be read"),
        (_npy_with_header("(1099511627776, 1099511627776, 3)"), 413, "at most"),
        (_npy_with_header("(400000000000000000000000,)"), 413, "at most"),
        (_npy_with_header("(40, 40, 3)", descr="'|O'"), 400, "object"),
        (_npy_with_header("(1, 40, 40, 3)", data=bytes(19200)), 400, "at most 3"),
        (_npy_with_header("(1,) * 70"), 400, ".npy header"),
        (_npy_with_header(str((1,) * 70), data=bytes(4)), 400, "at most 3"),
        (_npy_with_header("(True, 3)", data=bytes(12)), 400, "sizes >= 0"),
        (_npy_with_header("(4,)", descr="[('a', '<f4')]", data=bytes(16)), 400, "flux"),
        (_npy_with_header("(40, 40, 3)", fortran="'yes'"), 400, ".npy header"),
        (_npy_with_header("[40, 40, 3]"), 400, ".npy header"),
        (_npy_with_header("(40, 40, 3"), 400, ".npy header"),
        (_npy_with_header("(" * 5000 + ")" * 5000), 400, ".npy header"),
        (_npy_with_header("(40, 40, 3)", descr="'<q8'"), 400, ".npy header"),
        (good_npy[:8] + b"\xff\xff" + good_npy[10:], 400, ".npy header"),
        (good_npy[:6] + b"\x03\x00" + good_npy[8:], 400, "format version 3.0"),
        (good_npy[:9], 400, ".npy header"),
        (good_fits.replace(b"END" + b" " * 77, b" " * 80), 400, "END"),
        (good_fits[:-3000], 400, "complete FITS file"),
        (good_fits[:2880], 400, "complete FITS file"),
        (_edit_cards(good_fits, BITPIX=-31), 400, "BITPIX"),
        (_edit_cards(good_fits, NAXIS1=-40), 400, "FITS"),
        (_edit_cards(good_fits, NAXIS1="'forty'"), 400, "FITS"),
        (_edit_cards(good_fits, NAXIS=1000), 400, "FITS"),
        (_edit_cards(good_fits, NAXIS1=10 ** 15), 400, "complete FITS file"),
        (_fits_header({"BITPIX": 8, "NAXIS": 0}), 400, "no image"),
        (_fits(np.ones((1, 3, 40, 40), np.float32)), 400, "at most 3"),
        (_fits_header({"BITPIX": 8, "NAXIS": 0, "EXTEND": "T"}) + b"".join(_fits_header(
            {"XTENSION": "'IMAGE'", "BITPIX": 8, "NAXIS": 0, "PCOUNT": 0, "GCOUNT": 1},
            primary=False) for _ in range(70)), 400, "first 64 HDUs"),
        (_fits_header({"BITPIX": "'abc'", "NAXIS": 0}), 400, "FITS"),
        (_fits_header({"BITPIX": 8, "NAXIS": 0, "EXTEND": "T"}) + _fits_header(
            {"XTENSION": "'BINTABLE'", "BITPIX": 8, "NAXIS": 2, "NAXIS1": 4, "NAXIS2": 1,
             "PCOUNT": 0, "GCOUNT": 1, "TFIELDS": 1, "TFORM1": "'E'"}, bytes(4), primary=False),
         400, "no image"),
        (_edit_cards(_compressed(image), ZNAXIS1=10 ** 9), 413, "at most"),
        (_edit_cards(_compressed(image), ZBITPIX=12), 400, "ZBITPIX"),
        (_edit_cards(_compressed(image), ZNAXIS2=-3), 400, "ZNAXIS2"),
        (_edit_cards(_compressed(image), ZTILE1=10 ** 6), 400, "ZTILE1"),
        (_compressed(image)[:-2880], 400, "complete FITS file"),
    ]
    for content, status, message in cases:
        for direction in ("image_to_image", "spectrum_to_image"):
            r = _upload(server, content, direction)
            _assert_4xx(r, status, message)
            assert r.json()["error"].startswith("file: ") and "\n" not in r.text, r.text
    assert httpx.get(f"{server}/api/info").status_code == 200
    # A tile-compressed cutout decodes like a plain one.
    assert _upload(server, _compressed(image), "image_to_image").status_code == 200


def peak_traced_bytes(fn, *args):
    """(peak bytes allocated while ``fn(*args)`` runs, its result or the exception it raised):
    tracemalloc sees Python objects and NumPy's array buffers (NumPy reports them to it)."""
    tracemalloc.start()
    try:
        try:
            result = fn(*args)
        except Exception as err:  # noqa: BLE001 (returned for the test to check)
            result = err
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_a_compression_bomb_is_refused_from_its_header_without_decoding_it(server):
    """A few hundred KB of tile-compressed zeros that decode to 32 MiB (the issue's 554 KB file
    cost over 1 GB): refused with 413 while the request's peak memory stays near the upload's
    size; decoding it (astropy, what the server did before) costs the whole decoded array."""
    decoded = np.zeros((4096, 4096), np.int16)
    bomb = _compressed(decoded, compression_type="GZIP_1")
    del decoded
    assert len(bomb) < 600_000
    limit = queries.max_values(8 * 2 ** 20)
    peak, refused = peak_traced_bytes(queries.read_array, bomb, limit)
    assert isinstance(refused, queries.BadRequest) and refused.status == 413, refused
    assert peak < 2 * len(bomb) + 2 ** 20, peak

    def decode(content):
        with fits.open(io.BytesIO(content), memmap=False) as hdus:
            return hdus[1].data.nbytes
    full_peak, nbytes = peak_traced_bytes(decode, bomb)
    assert nbytes == 4096 * 4096 * 2 and full_peak >= nbytes  # the helper sees a decode
    assert peak * 20 < full_peak
    _assert_4xx(_upload(server, bomb, "image_to_image"), 413, "at most")
    assert httpx.get(f"{server}/api/info").status_code == 200


def test_query_parameters_are_typed_bounded_and_known(server, table):
    """Every parameter a request gives is checked where requests are parsed: wrong types,
    values outside int64 or below 0, unknown or repeated names, and contradicting
    combinations get a 4xx with a message (before, some of these were 500s)."""
    tid = int(table["targetid"][0])
    search = {"direction": "image_to_image"}
    cases = [
        ({**search, "random": 1, "seed": -1}, 422, "seed"),
        ({**search, "random": 1, "seed": 2 ** 64}, 422, "seed"),
        ({**search, "random": 1, "seed": "1.5"}, 422, "seed"),
        ({**search, "random": 1, "seed": "nan"}, 422, "seed"),
        ({**search, "random": "maybe"}, 422, "random"),
        ({**search, "targetid": -5}, 404, "no galaxy with target id -5"),
        ({**search, "targetid": 2 ** 64 + 1}, 422, "targetid"),
        ({**search, "targetid": -2 ** 63 - 1}, 422, "targetid"),
        ({**search, "targetid": "12abc"}, 422, "targetid"),
        ({**search, "targetid": ""}, 422, "targetid"),
        ({**search, "targetid": tid, "k": 10 ** 30}, 400, "k is"),
        ({**search, "targetid": tid, "k": -3}, 400, "k is -3"),
        ({**search, "targetid": tid, "k": "2.5"}, 422, "k"),
        ({**search, "targetid": tid, "random": 1}, 400, "not both"),
        ({**search, "targetid": tid, "seed": 3}, 400, "random=1"),
        ({**search, "targetid": tid, "bogus": 1}, 400, "unknown query parameter(s) ['bogus']"),
        ([("direction", "image_to_image"), ("targetid", tid), ("k", 3), ("k", 4)], 400,
         "['k'] given more than once"),
        ({"targetid": tid}, 422, "direction"),
    ]
    for params, status, message in cases:
        _assert_4xx(httpx.get(f"{server}/api/search", params=params), status, message)
    for path, status, message in [(f"/api/galaxy/{2 ** 70}", 422, "targetid"),
                                  (f"/api/galaxy/{2 ** 70}/image.png", 422, "targetid"),
                                  (f"/api/galaxy/{-2 ** 64}/spectrum.svg", 422, "targetid"),
                                  ("/api/galaxy/-1", 404, "no galaxy"),
                                  ("/api/galaxy/1e5", 422, "targetid"),
                                  (f"/api/galaxy/{tid}?fields=all", 400, "unknown"),
                                  ("/api/info?verbose=1", 400, "unknown"),
                                  ("/?x=1", 400, "unknown")]:
        _assert_4xx(httpx.get(f"{server}{path}"), status, message)
    image = _npy(np.ones((40, 40, 3), np.float32))
    extra_form = httpx.post(f"{server}/api/search", files={"file": ("a.npy", image)},
                            data={"direction": "image_to_image", "targetid": str(tid)})
    _assert_4xx(extra_form, 400, "['targetid'] unknown")
    two_files = httpx.post(f"{server}/api/search", files=[("file", ("a.npy", image)),
                                                          ("file", ("b.npy", image))],
                           data={"direction": "image_to_image"})
    _assert_4xx(two_files, 400, "['file'] given more than once")
    query_on_post = httpx.post(f"{server}/api/search?k=3", files={"file": ("a.npy", image)},
                               data={"direction": "image_to_image"})
    _assert_4xx(query_on_post, 400, "unknown query parameter")
    assert httpx.get(f"{server}/api/search", params={**search, "random": 1, "seed": 2 ** 63 - 1}
                     ).status_code == 200


def test_only_requests_naming_this_server_in_their_host_header_are_answered(server):
    """DNS rebinding: a page on another site that resolves its name to 127.0.0.1 sends its own
    name as Host; the server refuses it."""
    port = urllib.parse.urlsplit(server).port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example",
                 "localhost.evil.example", "[::2]", "", "[::1", "0.0.0.0",
                 "evil@127.0.0.1", "127.0.0.1/x", "127.0.0.1 evil", "localhost.",
                 f"127.0.0.1:{port}:{port}"):
        r = httpx.get(f"{server}/api/info", headers={"Host": host})
        _assert_4xx(r, 400, "serve.allowed_hosts")
        _assert_4xx(httpx.post(f"{server}/api/search", headers={"Host": host},
                               files={"file": ("a.npy", b"x")}, data={"direction": "x"}),
                    400, "Host header")
    for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST",
                 f"[::1]:{port}"):
        assert httpx.get(f"{server}/api/info", headers={"Host": host}).status_code == 200, host
    allowed = app_lib.allowed_hosts("0.0.0.0", ("search.example.org",))
    assert app_lib.host_problem("search.example.org:8000", allowed) is None
    assert app_lib.host_problem(socket.gethostname(), allowed) is None
    assert app_lib.host_problem("other.example.org", allowed) is not None
    assert app_lib.host_problem("anything", app_lib.allowed_hosts("127.0.0.1", ("*",))) is None


def test_a_client_sending_its_headers_slowly_is_cut_off(server):
    """Slowloris: a connection that trickles header lines is closed after HEADER_TIMEOUT_S,
    while the server answers others."""
    address = urllib.parse.urlsplit(server)
    with socket.create_connection((address.hostname, address.port)) as s:
        s.settimeout(0.5)
        start = time.monotonic()
        s.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed_after = None
        while time.monotonic() - start < app_lib.HEADER_TIMEOUT_S + 10:
            try:
                s.sendall(b"X-Slow: 1\r\n")
                if s.recv(1024) == b"":
                    closed_after = time.monotonic() - start
                    break
            except TimeoutError:
                continue
            except OSError:  # reset or broken pipe: closed too
                closed_after = time.monotonic() - start
                break
        assert httpx.get(f"{server}/api/info").status_code == 200
    assert closed_after is not None, "the slow client was never cut off"
    assert app_lib.HEADER_TIMEOUT_S - 0.5 <= closed_after <= app_lib.HEADER_TIMEOUT_S + 3


def test_the_server_listens_on_the_port_it_prints_when_given_port_0(server):
    """tests/serving_server.py starts it with serve.port=0 and reached it on the printed port."""
    port = urllib.parse.urlsplit(server).port
    assert port and port > 0
    assert httpx.get(f"http://127.0.0.1:{port}/api/info").json()["n"] > 0


def test_serve_on_a_survey_says_in_one_line_why_not(smoke_run, source, tmp_path):
    """An image-only survey has no spectra or dataset records to show: one line, nothing
    embedded (before, serve embedded the survey and then failed with a traceback). Search:
    tests/test_index.py."""
    images = np.stack([source[i]["image"] for i in range(4)])
    path = write_survey_file(str(tmp_path / "south.h5"), images, ra=np.arange(4.0),
                             dec=np.zeros(4))
    workdir = str(tmp_path / "run")
    shutil.copytree(smoke_run, workdir)
    proc = subprocess.run(cli_runs.command("serve", workdir, f"--config.eval.survey_file={path}",
                                           "--config.serve.port=0"),
                          cwd=cli_runs.ROOT, env=cli_runs.env(), capture_output=True,
                          text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: config field eval.survey_file") and "--mode=serve" in lines[0], \
        lines
    assert not os.path.exists(os.path.join(workdir, "embeddings", "survey-south"))


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
            app_lib.bind("127.0.0.1", s.getsockname()[1])
    with app_lib.bind("127.0.0.1", 0) as first:  # a server still building its index
        with pytest.raises(UserError, match="cannot serve on 127.0.0.1"):
            app_lib.bind("127.0.0.1", first.getsockname()[1])
    with pytest.raises(UserError, match="cannot serve on 256.0.0.1"):
        app_lib.bind("256.0.0.1", 8000)
    config = spender.get_config("smoke")
    config.serve.allowed_hosts = ("good.example", "bad host")
    with pytest.raises(ConfigError, match="serve.allowed_hosts"):
        settings_lib.resolve(config)


def test_the_page_and_its_files_are_package_data(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and 'src="/static/app.js"' in page.text
    for name, mime in app_lib.STATIC.items():
        r = httpx.get(f"{server}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(mime)
