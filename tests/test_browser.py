"""The search page in a real browser: headless Chromium (the system's `chromium` and
`chromedriver`, installed by scripts/install_browser.sh) driven by Selenium against a smoke
run's `--mode=serve`. A query in each direction shows k neighbours with their pictures, the same
ones the JSON API gives; the CSV download holds the API's rows; an uploaded cutout finds its
galaxy; a bad file gets the server's message on the page; and a screenshot is taken.

Never skipped silently: without a browser it fails, unless ASTROCLIP_SKIP_BROWSER=1 is set.
"""

import csv
import os
import shutil
import time

import httpx
import numpy as np
import pytest

import cli_runs
from astroclip_jax import settings as settings_lib
from astroclip_jax.data import pipeline
from configs import spender

DIRECTIONS = ("image_to_image", "spectrum_to_spectrum", "image_to_spectrum", "spectrum_to_image")
WAIT = 60  # seconds for the page to answer (a loaded 2-core machine)


def _browser_paths():
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary and driver:
        return binary, driver
    if os.environ.get("ASTROCLIP_SKIP_BROWSER") == "1":
        pytest.skip("ASTROCLIP_SKIP_BROWSER=1 and no chromium/chromedriver")
    pytest.fail("chromium and chromedriver are needed: run scripts/install_browser.sh "
                "(or set ASTROCLIP_SKIP_BROWSER=1 to skip on purpose)")


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return str(tmp_path_factory.mktemp("downloads"))


@pytest.fixture(scope="module")
def browser(downloads):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": downloads,
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": downloads})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(smoke_server):
    return smoke_server.url


@pytest.fixture(scope="module")
def page(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/")
    WebDriverWait(browser, WAIT).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    return browser


@pytest.fixture(scope="module")
def record():
    config = spender.get_config("smoke")
    config.data.data_dir = cli_runs.DATA_DIR
    return pipeline.data_source(settings_lib.resolve(config).data, "test")[9]


def _search(page, by, direction, k, targetid=None, upload=None):
    """Fill the form, submit, and wait for the answer (cards, or an error message)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    page.execute_script("document.getElementById('status').textContent = '';")
    page.find_element(By.CSS_SELECTOR, f'input[name="by"][value="{by}"]').click()
    if targetid is not None:
        box = page.find_element(By.ID, "targetid")
        box.clear()
        box.send_keys(str(targetid))
    if upload is not None:
        page.find_element(By.ID, "upload").send_keys(upload)
    Select(page.find_element(By.ID, "direction")).select_by_value(direction)
    box = page.find_element(By.ID, "k")
    box.clear()
    box.send_keys(str(k))
    page.find_element(By.ID, "search").click()
    WebDriverWait(page, WAIT).until(
        lambda d: d.find_element(By.ID, "status").text not in ("", "searching\u2026"))
    return page.find_element(By.ID, "status")


def _cards(page):
    """(target ids, all pictures loaded) of the neighbour cards shown."""
    from selenium.webdriver.common.by import By

    cards = page.find_elements(By.CSS_SELECTOR, "#results .card.result")
    loaded = page.execute_script(
        "return [...document.querySelectorAll('#results .card.result img')]"
        ".every(i => i.complete && i.naturalWidth > 0) && "
        "document.querySelectorAll('#results .card.result img').length;")
    return [int(c.get_attribute("data-targetid")) for c in cards], loaded


def _wait_for_pictures(page, n_cards):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, WAIT).until(lambda d: _cards(d)[1] == 2 * n_cards)


def test_a_query_in_each_direction_shows_k_neighbours_with_pictures(page, server, record):
    from selenium.webdriver.common.by import By

    tid, k = int(record["targetid"]), 4
    for direction in DIRECTIONS:
        status = _search(page, "targetid", direction, k, targetid=tid)
        assert "error" not in status.get_attribute("class"), status.text
        _wait_for_pictures(page, k)
        shown, _ = _cards(page)
        api = httpx.get(f"{server}/api/search",
                        params={"direction": direction, "k": k, "targetid": tid}).json()
        assert shown == [n["targetid"] for n in api["neighbours"]], direction
        query = page.find_element(By.CSS_SELECTOR, "#query .card.query")
        assert "QUERY" in query.text and str(tid) in query.text
        labels = page.find_element(By.CSS_SELECTOR, "#results .card.result").text
        assert "similarity" in labels and "z = " in labels and "log M* = " in labels


def test_random_query_and_the_csv_download_match_the_api(page, server, downloads):
    from selenium.webdriver.common.by import By

    _search(page, "random", "spectrum_to_spectrum", 6)
    _wait_for_pictures(page, 6)
    tid = int(page.find_element(By.CSS_SELECTOR, "#query .tid").text)
    shown, _ = _cards(page)
    page.find_element(By.ID, "download-csv").click()
    path = os.path.join(downloads, f"neighbours_{tid}_spectrum_to_spectrum.csv")
    deadline = time.monotonic() + WAIT
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.2)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    api = httpx.get(f"{server}/api/search", params={"direction": "spectrum_to_spectrum", "k": 6,
                                                    "targetid": tid}).json()["neighbours"]
    assert [int(r["targetid"]) for r in rows] == [n["targetid"] for n in api] == shown
    np.testing.assert_allclose([float(r["similarity"]) for r in rows],
                               [n["similarity"] for n in api], rtol=1e-6)
    assert [int(r["rank"]) for r in rows] == list(range(1, 7))


def test_an_uploaded_cutout_finds_its_galaxy_and_a_bad_file_gets_a_message(page, record,
                                                                            tmp_path):
    good = tmp_path / "cutout.npy"
    np.save(good, record["image"])
    status = _search(page, "upload", "image_to_image", 3, upload=str(good))
    assert "error" not in status.get_attribute("class"), status.text
    _wait_for_pictures(page, 3)
    assert _cards(page)[0][0] == int(record["targetid"])
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not a cutout")
    page.find_element("id", "upload").clear()
    status = _search(page, "upload", "image_to_image", 3, upload=str(bad))
    assert "error" in status.get_attribute("class")
    assert "error 400" in status.text and "neither a .npy file nor a FITS file" in status.text
    # The server keeps serving, and so does the page.
    status = _search(page, "random", "image_to_spectrum", 2)
    assert "error" not in status.get_attribute("class"), status.text
    _wait_for_pictures(page, 2)


def test_a_screenshot_of_the_page(page, tmp_path):
    height = page.execute_script("return document.body.scrollHeight")
    page.set_window_size(1400, min(height + 200, 4000))
    path = tmp_path / "search_page.png"
    assert page.save_screenshot(str(path))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000  # cutouts and plots, not a blank page
    target = os.environ.get("ASTROCLIP_SCREENSHOT")  # docs/search_page.png is made this way
    if target:
        shutil.copyfile(path, target)
