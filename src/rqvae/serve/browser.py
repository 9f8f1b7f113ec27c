"""Drive the page with selenium and headless Chromium: the browser test and the README screenshot
(``benchmarks/serve_screenshot.py``) click through the same steps. Every wait is bounded.

selenium is optional (the ``dev`` extra), so each function imports what it uses of it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

WAIT_S = 60.0  # the longest any step may take

PIXELS_JS = """
const img = document.getElementById(arguments[0]);
if (!img || !img.complete || !img.naturalWidth) return null;
const c = document.createElement("canvas");
c.width = img.naturalWidth; c.height = img.naturalHeight;
const ctx = c.getContext("2d");
ctx.drawImage(img, 0, 0);
return img.getAttribute("src") + " " + Array.from(ctx.getImageData(0, 0, c.width, c.height).data).join(",");
"""


def missing() -> str | None:
    """Why the browser steps cannot run here (selenium, chromium or chromedriver missing), or None."""
    try:
        import selenium  # noqa: F401  (optional: only the browser test and the screenshot need it)
    except ImportError:
        return "selenium is not installed (pip install selenium, or the [dev] extra)"
    for tool in ("chromedriver", "chromium"):
        if not (shutil.which(tool) or (tool == "chromium" and shutil.which("chromium-browser"))):
            return f"{tool} is not installed (apt-get install chromium chromium-driver; `make test` tries)"
    return None


def chrome(width: int = 1200, height: int = 1000):
    """A headless Chromium driven by the system chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def wait_for(driver, condition: Callable[[Any], Any], what: str, timeout: float = WAIT_S) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        raise TimeoutError(f"waited {timeout:.0f} s for {what}") from None


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def pixels(driver, element_id: str) -> str | None:
    """An <img>'s src and decoded pixels (None until it has loaded)."""
    return driver.execute_script(PIXELS_JS, element_id)


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_for(driver, lambda d: "codes" in by_id(d, "models").text, "the page to load the models' info")


def generate(driver, n: int, class_index: int | None = None) -> int:
    """Fill in the form, click Generate and wait for every image of the grid; -> number of images."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    field = by_id(driver, "n")
    field.clear()
    field.send_keys(str(n))
    if class_index is not None and by_id(driver, "class").is_displayed():
        Select(by_id(driver, "class")).select_by_index(class_index)
    by_id(driver, "gen-button").click()
    loaded = ("return [...document.querySelectorAll('#grid img')]"
              ".filter(i => i.complete && i.naturalWidth).length")
    wait_for(driver, lambda d: d.execute_script(loaded) == n, f"{n} generated images")
    wait_for(driver, lambda d: by_id(d, "gen-button").is_enabled(), "the job to finish")
    return len(driver.find_elements(By.CSS_SELECTOR, "#grid img"))


def set_depth(driver, depth: int) -> str:
    """Move the depth slider with the keyboard to ``depth``; -> the reconstruction's src + pixels."""
    from selenium.webdriver.common.keys import Keys

    slider = by_id(driver, "depth")
    slider.send_keys(Keys.HOME)
    for _ in range(depth - 1):
        slider.send_keys(Keys.ARROW_RIGHT)
    return wait_for(driver, lambda d: (p := pixels(d, "recon")) and f"depth={depth} " in p and p,
                    f"the reconstruction from {depth} codes")


def upload(driver, path: str | Path, expect_error: bool = False) -> str:
    """Choose a file in the tokenizer's file input; -> the error message shown, or "" once the coarse-to-fine
    panel shows the upload."""
    by_id(driver, "upload").send_keys(str(Path(path).resolve()))
    if expect_error:
        return wait_for(driver, lambda d: by_id(d, "upload-error").text, f"an error message for {path}")
    wait_for(driver, lambda d: by_id(d, "item-label").text == Path(path).name and pixels(d, "original"),
             f"the upload of {path}")
    return ""
