"""Small image folders that tests write."""

import numpy as np
from PIL import Image


def write_pngs(folder, n=16, size=16, seed=0):
    """``n`` noisy colour PNGs of ``size`` x ``size`` (a random base colour each) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 256, size=(1, 1, 3))
        noise = rng.integers(-40, 40, size=(size, size, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
