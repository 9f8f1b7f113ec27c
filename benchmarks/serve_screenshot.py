"""Screenshot of ``rqvae serve`` for the README: start the server on RUN_DIR's models, generate a grid,
upload an image (or inspect a generated one), set the depth slider, save a PNG.

    python benchmarks/serve_screenshot.py runs/demo docs/serve.png [--image some.png] [--n 32] [--depth 2]

Needs selenium, chromium and chromedriver (`make test` installs the last two with apt when it can).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rqvae.serve import browser
from rqvae.serve.server import running


def fmnist_test_image(folder: Path) -> Path | None:
    """The first Fashion-MNIST test image (28x28, as stored) as a PNG, when the dataset is installed."""
    from PIL import Image

    from rqvae.data import FMNIST_DIR
    from rqvae.data.idx import read_idx

    path = Path(FMNIST_DIR) / "t10k-images-idx3-ubyte.gz"
    if not path.is_file():
        print(f"{path} not found; showing a generated image instead", file=sys.stderr)
        return None
    out = folder / "fmnist-test-0.png"
    Image.fromarray(read_idx(path)[0]).save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a `make demo` folder, or model / run folders as rqvae serve takes them")
    p.add_argument("out", help="PNG file to write")
    p.add_argument("--image", help="image to upload (default: a Fashion-MNIST test image when installed)")
    p.add_argument("--n", type=int, default=32, help="images in the grid (default 32)")
    p.add_argument("--depth", type=int, default=2, help="depth slider position (default 2)")
    p.add_argument("--width", type=int, default=1200)
    args = p.parse_args(argv)
    reason = browser.missing()
    if reason:
        print(f"serve_screenshot: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, running([args.run_dir], max_images=max(64, args.n)) as url:
        image = Path(args.image) if args.image else fmnist_test_image(Path(tmp))
        driver = browser.chrome(args.width)
        try:
            browser.open_page(driver, url)
            if browser.by_id(driver, "generate").is_displayed():
                browser.generate(driver, n=args.n)
                driver.find_element("css selector", "#grid img").click()
            if image is not None:
                browser.upload(driver, image)
            browser.set_depth(driver, args.depth)
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(args.width, height + 140)  # the whole page, window chrome included
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
