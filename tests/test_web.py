"""The web page of `facemeta serve` in a real browser: headless Chromium (Selenium) against a real server
(`python -m facemeta serve` in a subprocess on a free port, the prior as its model, a gallery in tmp).

Screenshots go to pytest's tmp folder (see the test output for the path); they are not committed.
``FACEMETA_WEB_SCREENSHOT=docs/serve.png`` also writes the page with every result shown there (a
palette PNG, for the docs). Skips with a message when selenium, chromium or chromedriver is missing.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import load_benchmark_script

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000"]
WAIT = 60  # seconds for one request on a busy 2-core machine


def _browser_parts():
    try:
        from selenium import webdriver  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install 'facemeta[dev]'): browser tests skipped")
    chromium = os.environ.get("FACEMETA_CHROMIUM", CHROMIUM)
    driver = os.environ.get("FACEMETA_CHROMEDRIVER", CHROMEDRIVER)
    for what, path in (("chromium", chromium), ("chromedriver", driver)):
        if not (Path(path).exists() or shutil.which(path)):
            pytest.skip(f"{what} not found at {path} (apt-get install chromium chromium-driver): browser tests skipped")
    return chromium, driver


@pytest.fixture(scope="module")
def server(prior_model, tmp_path_factory):
    """`facemeta serve` on a free port (one torch thread); yields (base URL, gallery folder)."""
    _browser_parts()  # skip before starting anything
    gallery = tmp_path_factory.mktemp("web") / "people"
    with load_benchmark_script("bench_serve_load").running_server(gallery, prior_model.model_path, threads=1) as url:
        yield url, gallery


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    chromium, driver_path = _browser_parts()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where the screenshots go (pytest's tmp folder)."""
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots: {folder}")
    return folder


def wait_for(driver, condition, timeout: float = WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def visible(element_id: str):
    return lambda d: by_id(d, element_id).is_displayed() and by_id(d, element_id)


def idle(element_id: str):
    """The button is no longer busy (its request finished)."""
    return lambda d: "busy" not in (by_id(d, element_id).get_attribute("class") or "")


def choose(driver, input_id: str, *paths: Path) -> None:
    by_id(driver, input_id).send_keys("\n".join(str(p) for p in paths))


def click_when_ready(driver, button_id: str) -> None:
    wait_for(driver, lambda d: by_id(d, button_id).is_enabled())
    by_id(driver, button_id).click()


def people_names(driver) -> list[str]:
    """The names listed in the gallery, read in one script (the list is re-drawn after every change)."""
    return driver.execute_script("return [...document.querySelectorAll('#people li')].map((li) => li.dataset.name)")


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    wait_for(driver, lambda d: "model" in by_id(d, "info").text)


def enroll(driver, name: str, *photos: Path) -> str:
    by_id(driver, "enroll-name").clear()
    by_id(driver, "enroll-name").send_keys(name)
    choose(driver, "enroll-files", *photos)
    click_when_ready(driver, "enroll-btn")
    wait_for(driver, lambda d: idle("enroll-btn")(d) and (by_id(d, "enroll-error").text
                                                          or (by_id(d, "enroll-result").is_displayed()
                                                              and name in by_id(d, "enroll-result").text)))
    assert by_id(driver, "enroll-error").text == ""
    wait_for(driver, lambda d: name in people_names(d))
    return by_id(driver, "enroll-result").text


def full_page_screenshot(driver, path: Path, width: int = 1280) -> None:
    """The whole page, not only the window (Chromium's DevTools: lay the page out as tall as it is)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        time.sleep(0.3)  # let the page re-lay out
        driver.save_screenshot(str(path))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def lfw(data_dir, name: str, n: int) -> Path:
    return data_dir / "lfw" / "images" / name / f"{name}_{n:04d}.jpg"


def test_verify_in_the_browser(browser, server, data_dir, shots):
    url, _ = server
    open_page(browser, url)
    choose(browser, "verify-a", lfw(data_dir, "Bill_Gates", 1))
    choose(browser, "verify-b", lfw(data_dir, "Bill_Gates", 2))
    click_when_ready(browser, "verify-btn")
    wait_for(browser, visible("verify-result"))
    assert by_id(browser, "verify-decision").text == "same person"
    assert "same" in by_id(browser, "verify-decision").get_attribute("class")
    for img in ("verify-face-a", "verify-face-b"):  # the aligned faces were drawn
        wait_for(browser, lambda d, i=img: d.execute_script("return arguments[0].naturalWidth", by_id(d, i)) == 112)
    same_score = float(by_id(browser, "verify-score").text)
    browser.save_screenshot(str(shots / "verify-same.png"))

    choose(browser, "verify-b", lfw(data_dir, "Anna_Kournikova", 1))
    click_when_ready(browser, "verify-btn")
    wait_for(browser, visible("verify-result"))
    assert by_id(browser, "verify-decision").text == "different people"
    assert float(by_id(browser, "verify-score").text) < same_score
    browser.save_screenshot(str(shots / "verify-different.png"))

    # the server's one-line error is shown, and the page goes on working
    junk = shots / "junk.jpg"
    junk.write_bytes(b"not a photo at all")
    choose(browser, "verify-b", junk)
    click_when_ready(browser, "verify-btn")
    wait_for(browser, lambda d: by_id(d, "verify-error").text)
    assert by_id(browser, "verify-error").text == "junk.jpg: not an image (format not recognised)"
    assert not by_id(browser, "verify-result").is_displayed()


def test_enroll_identify_rename_remove_in_the_browser(browser, server, data_dir, shots):
    from selenium.webdriver.common.by import By

    url, gallery = server
    open_page(browser, url)
    orl = data_dir / "orl"
    for s in ("s1", "s2", "s3"):
        enroll(browser, s, orl / s / "1.pgm")
    text = enroll(browser, "Ada Lovelace", orl / "s7" / "1.pgm", orl / "s7" / "2.pgm")
    assert text.startswith("Ada Lovelace: 2 photo(s) added"), text
    assert people_names(browser) == ["Ada Lovelace", "s1", "s2", "s3"]
    # one aligned thumbnail per person, loaded with the page's fetch
    wait_for(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#people img.thumb')].filter((i) => i.naturalWidth === 112).length") == 4)

    choose(browser, "identify-file", orl / "s2" / "5.pgm")
    click_when_ready(browser, "identify-btn")
    wait_for(browser, visible("identify-result"))
    items = browser.find_elements(By.CSS_SELECTOR, "#identify-list li")
    assert [li.get_attribute("data-identity") for li in items] == ["s2"], [li.text for li in items]
    assert browser.execute_script("return document.getElementById('identify-canvas').width") > 200  # drawn, scaled up

    # every section showing a result: the picture for the docs
    choose(browser, "verify-a", lfw(data_dir, "Bill_Gates", 1))
    choose(browser, "verify-b", lfw(data_dir, "Bill_Gates", 2))
    click_when_ready(browser, "verify-btn")
    wait_for(browser, visible("verify-result"))
    full_page_screenshot(browser, shots / "all-results.png")
    if os.environ.get("FACEMETA_WEB_SCREENSHOT"):
        from PIL import Image

        with Image.open(shots / "all-results.png") as im:
            im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
                os.environ["FACEMETA_WEB_SCREENSHOT"], optimize=True)

    # rename s3, then remove them (the second click confirms)
    row = browser.find_element(By.CSS_SELECTOR, '#people li[data-name="s3"]')
    row.find_element(By.CSS_SELECTOR, "button.rename").click()
    field = row.find_element(By.CSS_SELECTOR, "input.new-name")
    field.clear()
    field.send_keys("Third Person")
    row.find_element(By.CSS_SELECTOR, "button.rename").click()
    wait_for(browser, lambda d: "Third Person" in people_names(d))
    assert "s3" not in people_names(browser)
    row = browser.find_element(By.CSS_SELECTOR, '#people li[data-name="Third Person"]')
    row.find_element(By.CSS_SELECTOR, "button.remove").click()
    assert row.find_element(By.CSS_SELECTOR, "button.remove").text == "Really remove?"
    row.find_element(By.CSS_SELECTOR, "button.remove").click()
    wait_for(browser, lambda d: "Third Person" not in people_names(d))
    assert people_names(browser) == ["Ada Lovelace", "s1", "s2"]
    # a bad name: the server's message under the button
    by_id(browser, "enroll-name").clear()
    by_id(browser, "enroll-name").send_keys("unknown")
    choose(browser, "enroll-files", orl / "s9" / "1.pgm")
    click_when_ready(browser, "enroll-btn")
    wait_for(browser, lambda d: by_id(d, "enroll-error").text)
    assert "reserved" in by_id(browser, "enroll-error").text
    browser.save_screenshot(str(shots / "after-remove.png"))
