"""Robustness of stage-1 training (issue 6): SIGKILL at any moment, NaN losses, broken image files."""

import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rqvae.cli import main
from rqvae.data import TensorImageDataset
from rqvae.train.checkpoint import latest_checkpoint
from rqvae.train.guard import NonFiniteLossError
from rqvae.train.vae import TrainVAEConfig, train_vae
from tests.helpers.images import write_pngs

STEPS = 12
ARGS = ["--preset", "tiny", "--model-config", '{"ch": 16, "codebook_size": 32}', "--image-size", "16",
        "--batch-size", "4", "--steps", str(STEPS), "--disc-start", "3", "--disc-ndf", "16", "--lr", "1e-3",
        "--warmup-steps", "2", "--ema", "0.9", "--log-every", "1", "--checkpoint-every", "2",
        "--sample-every", "0", "--no-progress", "--no-tensorboard", "--device", "cpu"]
# The child slows every fsync down, so that saves take long enough to be killed in the middle.
CHILD = ("import os, sys, time; _f = os.fsync; os.fsync = lambda fd: (time.sleep(0.03), _f(fd))[1]; "
         "from rqvae.cli import main; sys.exit(main(sys.argv[1:]))")


def _tmp_dirs(ck):
    return [p for p in ck.iterdir() if p.name.startswith(".tmp-")] if ck.is_dir() else []


def _run_until(args, condition, timeout=60.0):
    """Start a training child; SIGKILL it as soon as ``condition()`` holds. Returns what held at the kill."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            state = condition()
            if state:
                p.send_signal(signal.SIGKILL)
                p.wait()
                return state
            if p.poll() is not None:
                raise AssertionError(f"training ended before the kill point (rc {p.returncode}): "
                                     f"{p.stderr.read()[-2000:]}")
            time.sleep(0.003)
        raise AssertionError("kill point not reached in time")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_sigkill_at_any_point_then_resume_is_bitwise_identical(tmp_path):
    data = tmp_path / "imgs"
    write_pngs(data)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train-vae", "--data", str(data), "--out", str(ref), *ARGS]) == 0  # uninterrupted

    args = ["train-vae", "--data", str(data), "--out", str(run), *ARGS, "--resume"]
    ck = run / "checkpoints"

    def step():
        found = latest_checkpoint(run)
        return int(found.name.split("_")[1]) if found else 0

    mid_save = []
    # 1. during the very first save (no complete checkpoint yet)
    mid_save.append(bool(_run_until(args[:-1], lambda: _tmp_dirs(ck))))  # a new run: no --resume yet
    # 2. between saves, mid-training
    _run_until(args, lambda: step() >= 4 and not _tmp_dirs(ck) and time.sleep(0.15) is None)
    # 3. during a later save, after at least one more checkpoint
    start = step()
    mid_save.append(bool(_run_until(args, lambda: step() > start and _tmp_dirs(ck))))
    assert all(mid_save)
    assert step() < STEPS, "the run finished before the last kill"
    r = subprocess.run([sys.executable, "-c", CHILD, *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr

    a = load_file(str(ref / "model" / "model.safetensors"))
    b = load_file(str(run / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = load_file(str(ref / "checkpoints" / f"step_{STEPS:06d}" / "modules.safetensors"))
    mb = load_file(str(ck / f"step_{STEPS:06d}" / "modules.safetensors"))
    for k in ma:  # discriminator, EMA and live weights too
        assert torch.equal(ma[k], mb[k]), k
    assert not _tmp_dirs(ck)  # leftovers of the killed saves are cleaned up
    steps_logged = [int(line.split(",")[0].split(":")[1]) for line in
                    (run / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, STEPS + 1))  # no duplicates from the replayed steps


def _images(n=64, nan_at=()):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    for i in nan_at:
        x[i, 0, 0, 0] = float("nan")
    return x


def _cfg(run_dir, **kw):
    base = dict(data="(in memory)", run_dir=str(run_dir), preset="tiny", model=dict(ch=16, codebook_size=32),
                image_size=16, batch_size=8, steps=8, lr=1e-3, warmup_steps=0, disc_start=0, disc_ndf=16,
                log_every=1, checkpoint_every=4, sample_every=0, progress=False, tensorboard=False)
    base.update(kw)
    return TrainVAEConfig(**base)


def test_nonfinite_batch_is_skipped_and_counted(tmp_path):
    # 64 images, batch 8: one epoch is 8 steps and exactly one batch holds the NaN image.
    model = train_vae(_cfg(tmp_path / "r"), dataset=TensorImageDataset(_images(nan_at=[5])))
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert '"nonfinite_steps": 1' in lines[-1] and '"nonfinite_steps": 0' in lines[0] + lines[1]


def test_nonfinite_steps_change_nothing_and_stop_the_run(tmp_path):
    run = tmp_path / "r"
    train_vae(_cfg(run, steps=4), dataset=TensorImageDataset(_images()))
    good = load_file(str(run / "checkpoints" / "step_000004" / "modules.safetensors"))
    good_opt = load_file(str(run / "checkpoints" / "step_000004" / "optim.safetensors"))
    bad = TensorImageDataset(_images(nan_at=range(64)))
    with pytest.raises(NonFiniteLossError, match="3 steps in a row.*--resume"):
        train_vae(_cfg(run, steps=20, resume=True, max_nonfinite=3, checkpoint_every=1), dataset=bad)
    # steps 5 and 6 were skipped and checkpointed: weights, EMA codebook, BatchNorm statistics and
    # Adam moments are exactly those of step 4; the 3rd bad step stopped the run before a save.
    assert latest_checkpoint(run).name == "step_000006"
    after = load_file(str(run / "checkpoints" / "step_000006" / "modules.safetensors"))
    after_opt = load_file(str(run / "checkpoints" / "step_000006" / "optim.safetensors"))
    for k in good:
        assert torch.equal(good[k], after[k]), k
    for k in good_opt:
        if not k.startswith("rng."):  # the RNG moved on (skipped steps still draw dead-code restarts)
            assert torch.equal(good_opt[k], after_opt[k]), k


def test_training_on_a_folder_with_broken_files(tmp_path, caplog):
    data = tmp_path / "imgs"
    write_pngs(data, n=12)
    (data / "empty.png").write_bytes(b"")
    good = (data / "000.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "notes.png").write_text("this is not an image")
    Image.new("P", (20, 20), 3).save(data / "palette.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(data / "rgba.png")
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(data / "deep16.png")
    Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(data / "cmyk.jpg")
    Image.new("RGB", (3, 3), (0, 0, 255)).save(data / "tiny.png")
    with caplog.at_level(logging.INFO):
        rc = main(["train-vae", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny",
                   "--model-config", '{"ch": 16, "codebook_size": 32}', "--image-size", "16",
                   "--batch-size", "8", "--steps", "2", "--disc-ndf", "16", "--no-progress",
                   "--no-tensorboard", "--sample-every", "0"])
    assert rc == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert text.count("skipped 3 of 20 files") == 1  # said once (by the dataset), not again by the trainer
    for name in ("empty.png", "truncated.png", "notes.png"):
        assert name in text
    for name in ("palette.png", "rgba.png", "deep16.png", "cmyk.jpg", "tiny.png"):
        assert name not in text
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
