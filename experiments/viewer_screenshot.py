"""Writes docs/images/viewer.png: the viewer of `svlm serve` commenting a synthetic match (one-off, not a test).

    svlm demo --seconds 40 --out /tmp/svlm_demo      # writes /tmp/svlm_demo/match_1000.mp4
    python experiments/viewer_screenshot.py /tmp/svlm_demo/match_1000.mp4

Needs Debian's chromium and chromium-driver and the selenium package (as tests/test_serve_viewer.py).
"""

import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

import test_serve_viewer as viewer  # noqa: E402  (its server and browser helpers)
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402


# As `svlm demo` streams its matches (svlm_jax/demo.py: STREAM, match_stream), match 1000's intro.
DEMO_ARGS = ["--dtype", "float32", "--greedy", "--vision-window", "8", "--text-rounds", "16", "--text-sink", "64",
             "--text-window", "192", "--max-new-tokens", "20"]
INTRO = "Blue home, Black away."


def main(video: str, seconds: int = 14) -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = viewer.CHROMIUM
    for arg in [*viewer.CHROME_ARGS, "--autoplay-policy=no-user-gesture-required"]:
        options.add_argument(arg)
    log = pathlib.Path("/tmp/viewer_screenshot_serve.log")
    with viewer.running_server(log, *viewer.SERVE_ARGS, *DEMO_ARGS) as base:
        driver = webdriver.Chrome(service=Service(viewer.CHROMEDRIVER), options=options)
        try:
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                   {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
            driver.get(base + "/")
            driver.find_element(By.ID, "previous-text").send_keys(INTRO)
            driver.find_element(By.ID, "file").send_keys(str(pathlib.Path(video).resolve()))
            start = driver.find_element(By.ID, "start")
            viewer.wait_for(start.is_enabled, 10, "the file")
            start.click()
            viewer.wait_for(lambda: len(viewer.commentary_seconds(driver)) >= seconds, seconds + 20,
                            f"{seconds} seconds of commentary")
            out = REPO_ROOT / "docs" / "images" / "viewer.png"
            driver.save_screenshot(str(out))
            print(f"wrote {out}")
        finally:
            driver.quit()


if __name__ == "__main__":
    main(sys.argv[1])
