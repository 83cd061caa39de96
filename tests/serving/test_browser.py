"""The web page in a real headless Chromium, driven by Selenium through /usr/bin/chromedriver."""

import os
import shutil
from pathlib import Path

import pytest

from tests.serving.conftest import flickr_photos

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

CHROMIUM = os.environ.get("FLORENCE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FLORENCE_CHROMEDRIVER", "/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"Chromium not found at {CHROMIUM} with {CHROMEDRIVER}; install Debian's chromium and chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,1000"):
        options.add_argument(argument)
    # Keep the browser off the network: no proxy lookups, no background services.
    options.add_argument("--no-proxy-server")
    options.add_argument("--disable-background-networking")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _artefact_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("FLORENCE_TEST_ARTEFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_page_search_shows_rendered_images(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    browser.find_element(By.ID, "query").send_keys("a dog running on the beach")
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("6")
    browser.find_element(By.ID, "search-button").click()

    rendered = "return [...document.querySelectorAll('figure.result img')].filter(i => i.complete && i.naturalWidth > 0).length"
    WebDriverWait(browser, 60).until(lambda driver: driver.execute_script(rendered) == 6)
    captions = [element.text for element in browser.find_elements(By.CSS_SELECTOR, "figure.result figcaption")]
    screenshot = _artefact_dir(tmp_path) / "search.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")

    assert len(captions) == 6
    assert all(caption.split()[0].replace(".", "", 1).lstrip("-").isdigit() for caption in captions)
    assert "6 results" in browser.find_element(By.ID, "status").text
    assert screenshot.stat().st_size > 0


def test_page_classify_ranks_labels(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "photo.jpg"
    shutil.copy(flickr_photos()[0], photo)
    browser.get(server.url + "/")
    browser.find_element(By.ID, "file").send_keys(str(photo))
    browser.find_element(By.ID, "labels").send_keys("dog, child, stairs")
    browser.find_element(By.ID, "classify-button").click()

    WebDriverWait(browser, 60).until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, "#ranking li.label")) == 3)
    ranking = [element.text for element in browser.find_elements(By.CSS_SELECTOR, "#ranking li.label")]
    screenshot = _artefact_dir(tmp_path) / "classify.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")

    assert {line.split()[-1] for line in ranking} == {"dog", "child", "stairs"}
    assert all(line.split()[0].endswith("%") for line in ranking)


def test_page_shows_error_message(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    browser.find_element(By.ID, "query").send_keys("dog")
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("99")
    browser.find_element(By.ID, "search-button").click()

    WebDriverWait(browser, 30).until(lambda driver: "out of range" in driver.find_element(By.ID, "status").text)

    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
