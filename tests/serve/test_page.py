"""The page at `/`: served offline with the server, and driven in headless Chromium with a fake camera.

The browser test needs Debian's `chromium` and `chromium-driver` (scripts/setup.sh installs them on CI;
docs/serve.md, "The page") and skips with that reason where they are absent. Its server binds
127.0.0.1 on a free port in this process and is stopped by its fixture; every wait is bounded.
MQT_EDGE_PAGE_SHOTS=DIR also saves a screenshot of each answer there (docs/page-m*.png come from it).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'mqt-edge[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (dev extra)")

from mqt_edge.serve import ServeConfig, create_app  # noqa: E402

EXAMPLE = Path(__file__).parent.parent.parent / "examples" / "shapes.png"
STATIC = Path(__file__).parent.parent.parent / "mqt_edge" / "serve" / "static"
WAIT_S = 60  # the bound on any one wait in the browser (page load, camera, an answer)


def test_the_page_is_served_and_loads_nothing_from_other_hosts():
    from starlette.testclient import TestClient

    http = TestClient(create_app(ServeConfig(bundle="unused", model_name="m"), load=False))
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert linked and all(u.startswith(("/static/", "data:")) for u in linked), linked
    for name in ("app.js", "style.css"):
        r = http.get(f"/static/{name}")
        assert r.status_code == 200 and r.text == (STATIC / name).read_text()
    for f in STATIC.iterdir():  # no CDN, no web fonts: the page must work offline
        assert not re.search(r"https?://|@import|url\(\s*['\"]?//", f.read_text()), f.name
    assert http.get("/static/nothing.js").json()["error"]["code"] == "not_found"


# -- in the browser --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def chrome() -> tuple[str, str]:
    """Chromium and its driver, or a skip before anything slow starts."""
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chrome and driver):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="selenium is not installed (dev extra)")
    return chrome, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_camera(path: Path) -> Path:
    """examples/shapes.png as an MJPEG file: Chromium's fake camera plays it in a loop."""
    from PIL import Image

    buf = io.BytesIO()
    Image.open(EXAMPLE).convert("RGB").save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue() * 10)
    return path


@pytest.fixture(scope="module")
def server(chrome, shipped_bundle):
    import uvicorn

    port = _free_port()
    app = create_app(ServeConfig(bundle=str(shipped_bundle), port=port, model_name="mqt-default", max_new_tokens=16))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        pytest.fail("the server did not become healthy in 120 s")
    yield url
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def browser(chrome, tmp_path, monkeypatch):
    binary, driver_path = chrome
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={_fake_camera(tmp_path / 'shapes.mjpeg')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _ask(driver, asked: int) -> dict:
    """Press Ask and wait for answer number `asked`; returns what the page shows of it."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element("id", "go").click()
    WebDriverWait(driver, WAIT_S).until(
        lambda d: len(d.find_elements("css selector", "#history tbody tr")) == asked
        or d.find_element("id", "error").is_displayed())
    text = lambda i: driver.find_element("id", i).text  # noqa: E731
    assert not driver.find_element("id", "error").is_displayed(), text("error")
    return {"answer": text("answer"), "m": text("s-m"), "ttft": text("s-ttft"), "cached": text("s-cached"),
            "asked_m": driver.find_element("id", "m").get_attribute("value")}


def _visual_tokens_sum(url: str) -> float:
    metrics = httpx.get(url + "/metrics", timeout=10).text
    return float(re.search(r"^mqt_visual_tokens_sum (\S+)$", metrics, re.M).group(1))


def _shot(driver, m: str) -> None:
    where = os.environ.get("MQT_EDGE_PAGE_SHOTS")
    if where:
        driver.save_screenshot(str(Path(where) / f"page-m{m}.png"))


@pytest.mark.browser
def test_the_page_answers_from_the_camera_and_its_slider_sets_m(server, browser):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_element("id", "status").get_attribute("data-state") == "ready"
        and d.execute_script("return document.getElementById('video').videoWidth") > 0)
    slider = browser.find_element("id", "m-slider")
    slider.send_keys(Keys.HOME, *[Keys.ARROW_RIGHT] * 3)  # stops 1, 2, 3, 4, ...
    first = _ask(browser, 1)
    assert first["answer"].lower().startswith("red"), first
    assert first["m"] == first["asked_m"] == "4", first
    assert first["ttft"].endswith(" ms") and first["cached"].isdigit(), first
    _shot(browser, first["m"])

    slider.send_keys(*[Keys.ARROW_RIGHT] * 12)  # ... 8, 10, 11, 13, 16, 19, 23, 27, 32
    second = _ask(browser, 2)
    assert second["m"] == second["asked_m"] == "32", second
    assert second["answer"].lower().startswith("red"), second
    _shot(browser, second["m"])
    assert _visual_tokens_sum(server) == 4 + 32  # the m the server computed with, not only what it echoed

    browser.find_element("id", "refine").click()
    confidence = browser.find_element("id", "confidence")
    confidence.clear()
    confidence.send_keys("1")  # refine unless the first token is certain
    third = _ask(browser, 3)
    refined = browser.find_element("id", "refined").text
    assert third["m"] == "256" and refined.startswith("Refined from m = 32 to m = 256"), (third, refined)
    assert third["answer"].lower().startswith("red"), third
    _shot(browser, "256-refined")
    assert _visual_tokens_sum(server) == 4 + 32 + 256

    browser.find_element("id", "refine").click()
    browser.find_element("id", "tab-image").click()
    browser.find_element("id", "file").send_keys(str(EXAMPLE.resolve()))  # an uploaded file, its own bytes
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element("id", "picture").is_displayed())
    uploaded = _ask(browser, 4)
    assert uploaded["answer"].lower().startswith("red") and uploaded["m"] == "32", uploaded
