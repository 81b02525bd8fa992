"""The browser viewer of `svlm serve` (svlm_jax/serve/static/), end to end in headless Chromium.

A real server (the bundled demo model, 112x112 frames) runs as a subprocess; the page streams
Chromium's fake webcam to it, and the commentary of consecutive seconds, the latency and the
real-time factor must show up in the page; Stop must end the stream, and the server's row must be
freed when the page stops or goes away. Needs Debian's `chromium` and `chromium-driver` and the
`selenium` package; skipped without them.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO_ROOT / "svlm_jax" / "assets" / "demo_model"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROME_ARGS = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
               "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
# The demo model's 112x112 frames go to the model as they are (the checkpoint's preprocessor_config);
# without the pixel bounds the streaming defaults would upscale them to 280x280.
SERVE_ARGS = ["--max-streams", "2", "--frame-size", "112x112", "--min-pixels", "12544", "--max-pixels", "12544"]
SERVER_START_S = 45  # compiling the batch's round step on the CPU


def _skip_reason() -> str | None:
    if not pathlib.Path(CHROMIUM).exists():
        return f"{CHROMIUM} is absent (apt-get install chromium)"
    if not pathlib.Path(CHROMEDRIVER).exists():
        return "chromedriver is absent (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is absent (pip install selenium)"
    return None


SKIP = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@contextlib.contextmanager
def running_server(log_path: pathlib.Path, *args: str):
    """`svlm serve` in a subprocess on a free port; yields its base URL once /health answers; killed at the end."""
    port = free_port()
    command = [sys.executable, "-m", "svlm_jax.cli", "serve", "--model", str(DEMO_MODEL), "--host", "127.0.0.1",
               "--port", str(port), *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"svlm serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                get_json(base + "/health")
                break
            if time.monotonic() > deadline:
                pytest.fail(f"svlm serve did not answer /health in {SERVER_START_S} s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def commentary_seconds(driver) -> list[tuple[float, float]]:
    """The (t_start, t_end) of every commentary line, oldest first (the page shows the newest first)."""
    labels = driver.execute_script(
        "return [...document.querySelectorAll('#commentary li')].map(li => [li.dataset.tStart, li.dataset.tEnd]);")
    return [(float(a), float(b)) for a, b in reversed(labels)]


def text_of(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent;").strip()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_viewer_streams_the_webcam(browser, tmp_path):
    from selenium.webdriver.common.by import By

    with running_server(tmp_path / "serve.log", *SERVE_ARGS) as base:
        assert get_json(base + "/health")["streams_active"] == 0
        browser.get(base + "/")
        browser.find_element(By.ID, "webcam").click()
        start = browser.find_element(By.ID, "start")
        wait_for(start.is_enabled, 10, "the fake webcam to play")
        start.click()
        wait_for(lambda: text_of(browser, "status").startswith("streaming"), 10, "the stream's ready")
        assert get_json(base + "/health")["streams_active"] == 1

        seconds = wait_for(lambda: (s := commentary_seconds(browser)) and len(s) >= 3 and s, 20,
                           "3 seconds of commentary")
        assert seconds[:3] == [(0, 1), (1, 2), (2, 3)], seconds
        assert all(a[1] <= b[0] for a, b in zip(seconds, seconds[1:])), seconds  # in order
        assert float(text_of(browser, "latency")) >= 0
        assert 0 < float(text_of(browser, "rtf")) < 10
        assert float(text_of(browser, "dropped")) >= 0 and float(text_of(browser, "lag")) >= 0
        assert text_of(browser, "errors") == ""

        browser.find_element(By.ID, "stop").click()
        wait_for(lambda: text_of(browser, "status") == "ended", 20, "the end of the stream")
        wait_for(lambda: get_json(base + "/health")["streams_active"] == 0, 10, "the row freed after Stop")
        after_stop = commentary_seconds(browser)
        assert after_stop[:len(seconds)] == seconds

        # Again, and this time the page goes away without Stop: the server frees the row as well.
        wait_for(start.is_enabled, 5, "Start enabled again")
        start.click()
        wait_for(lambda: len(commentary_seconds(browser)) >= 1, 20, "the second stream's first second")
        assert commentary_seconds(browser)[0] == (0, 1)
        assert get_json(base + "/health")["streams_active"] == 1
        browser.get("about:blank")
        wait_for(lambda: get_json(base + "/health")["streams_active"] == 0, 10, "the row freed after the page left")
