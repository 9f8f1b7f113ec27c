"""``rqvae serve`` in a real browser (headless Chromium via selenium): generate a grid, move the depth
slider, upload a broken file and a good one. Skipped, with the reason, when Chromium or chromedriver is
missing (`make test` installs them with apt when it can)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

pytest.importorskip("starlette")
from rqvae.serve import browser  # noqa: E402
from rqvae.serve.server import running  # noqa: E402
from tests.serve.test_serve import build_models  # noqa: E402

MISSING = browser.missing()


@pytest.mark.skipif(MISSING is not None, reason=f"browser test skipped: {MISSING}")
def test_page_in_headless_chromium(tmp_path):
    root = build_models(tmp_path / "models")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (50, 30), (200, 40, 40)).save(tmp_path / "red.png")
    with running([root / "demo"], batch_size=2, max_images=16) as url:
        driver = browser.chrome()
        try:
            browser.open_page(driver, url)
            assert browser.by_id(driver, "class").text.splitlines()[4] == "3: Dress"  # Fashion-MNIST names
            assert not browser.by_id(driver, "prompt-row").is_displayed()  # a class model: no prompt box
            assert browser.generate(driver, n=6, class_index=2) == 6
            assert browser.by_id(driver, "gen-status").text == "6 / 6 images"
            driver.find_element("css selector", "#grid img").click()  # inspect the first image
            full = browser.set_depth(driver, 4)
            coarse = browser.set_depth(driver, 1)
            assert coarse.split(" ")[1] != full.split(" ")[1]  # other pixels from the first code only
            assert "1 / 4" in browser.by_id(driver, "depth-value").text

            message = browser.upload(driver, tmp_path / "broken.png", expect_error=True)
            assert "broken.png is not a readable image" in message
            assert browser.upload(driver, tmp_path / "red.png") == ""
            assert "PSNR" in browser.by_id(driver, "recon-caption").text
            assert len(driver.find_elements("css selector", "#per-depth tr")) == 3  # depth, change, PSNR
            browser.set_depth(driver, 2)
            shot = tmp_path / "serve.png"
            driver.save_screenshot(str(shot))
            assert Image.open(io.BytesIO(shot.read_bytes())).size[0] > 500
        finally:
            driver.quit()
