"""Drive the search web page in headless Chromium: type a query, see a grid of results.

Chromium and chromedriver are required (``apt-get install -y chromium chromium-driver``; CI's
``.ci/run`` installs them). A missing browser FAILS this test so a broken CI image cannot pass
silently; set ``CLIPFORGE_NO_BROWSER=1`` to skip it knowingly on a machine without one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from search_fixtures import UvicornThread, build_setup

pytest.importorskip("faiss")
pytest.importorskip("fastapi")

CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1200,900",
)
NOTES_COPY = Path("/work/notes/search_screenshot.png")


def _browser_paths() -> tuple[str, str]:
    chrome = next(
        (
            p
            for p in (
                shutil.which("chromium"),
                shutil.which("chromium-browser"),
                shutil.which("google-chrome"),
            )
            if p
        ),
        None,
    )
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None
    )
    if not (chrome and driver):
        if os.environ.get("CLIPFORGE_NO_BROWSER") == "1":
            pytest.skip("no chromium/chromedriver and CLIPFORGE_NO_BROWSER=1")
        pytest.fail(
            "chromium and chromedriver are needed (apt-get install -y chromium chromium-driver); "
            "set CLIPFORGE_NO_BROWSER=1 to skip on purpose"
        )
    return chrome, driver


@pytest.mark.slow
def test_web_page_search_shows_results(tmp_path):
    selenium = pytest.importorskip("selenium")  # noqa: F841 - in the [dev] extra
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from clipforge.search.searcher import Searcher
    from clipforge.search.server import create_app

    chrome, driver_path = _browser_paths()
    setup = build_setup(tmp_path / "data", n=24, num_workers=0)
    searcher = Searcher(setup.index_dir)
    want = [r.id for r in searcher.search(text="a red circle", k=12)]

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chrome-profile'}")
    with UvicornThread(create_app(searcher)) as srv:
        driver = webdriver.Chrome(service=Service(driver_path), options=opts)
        try:
            driver.set_page_load_timeout(60)
            driver.get(srv.url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: "images" in d.find_element(By.ID, "info").text)  # /health answered
            k = driver.find_element(By.ID, "k")
            k.clear()
            k.send_keys("12")
            box = driver.find_element(By.ID, "q")
            box.send_keys("a red circle")
            driver.find_element(By.ID, "go").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 12)
            cards = driver.find_elements(By.CSS_SELECTOR, "#results .result")
            assert [int(c.get_attribute("data-id")) for c in cards] == want  # same order as Python
            assert "12 results" in driver.find_element(By.ID, "status").text
            # every thumbnail actually loaded (naturalWidth > 0 once decoded)
            wait.until(
                lambda d: d.execute_script(
                    "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
                )
            )
            score = cards[0].find_element(By.CLASS_NAME, "score").text
            assert score.startswith(f"{searcher.search(text='a red circle', k=1)[0].score:.3f}")
            shot = tmp_path / "search_page.png"
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 5000
            if NOTES_COPY.parent.is_dir():  # a copy for people reviewing the change
                shutil.copy(shot, NOTES_COPY)
            # click a result: "more like this" search by image id
            cards[3].click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "similar to #"))
            first = driver.find_elements(By.CSS_SELECTOR, "#results .result")[0]
            assert first.find_element(By.CLASS_NAME, "score").text.startswith("1.000")  # itself (or a copy)
            # an error from the server is shown, not swallowed
            driver.execute_script("document.getElementById('q').value = 'x'.repeat(1001)")
            driver.find_element(By.ID, "go").click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "the limit is 1000"))
            assert "error" in driver.find_element(By.ID, "status").get_attribute("class")
        finally:
            driver.quit()
