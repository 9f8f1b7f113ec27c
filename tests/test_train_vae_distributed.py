"""Two-process (gloo) training through torchrun: it completes and the ranks end with the same weights."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from rqvae.models.vae import RQVAE


def write_pngs(folder, n=16, size=16, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 256, size=(1, 1, 3))
        noise = rng.integers(-40, 40, size=(size, size, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


def test_two_process_gloo_run(tmp_path):
    data, out = tmp_path / "imgs", tmp_path / "run"
    write_pngs(data)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "rqvae", "train-vae", "--data", str(data), "--out", str(out), "--preset", "tiny",
           "--model-config", '{"ch": 16, "codebook_size": 32}', "--image-size", "16", "--batch-size", "4",
           "--steps", "4", "--disc-start", "1", "--disc-ndf", "16", "--lr", "1e-3", "--log-every", "2",
           "--checkpoint-every", "2", "--sample-every", "0", "--no-progress", "--no-tensorboard",
           "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "2 process(es)" in log
    # train_vae all-gathers per-tensor checksums of the final weights and codebook and raises if any rank
    # differs, so a zero exit code means the ranks agree; the saved model is rank 0's.
    model = RQVAE.from_pretrained(out / "model")
    assert torch.isfinite(model.quantizer.codebook).all()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4] and "loss/d" in metrics[-1]
    assert (out / "checkpoints" / "step_000004").is_dir()
