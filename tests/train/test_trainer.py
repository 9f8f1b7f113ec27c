"""The one Trainer: every task runs through it, Ctrl-C leaves a resumable checkpoint and closed logs,
``--resume`` without a run says so, and progress in a log file is plain lines."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from rqvae.data import TensorImageDataset
from rqvae.errors import UserError
from rqvae.models.classifier import Classifier, ClassifierConfig
from rqvae.models.vae import RQVAE
from rqvae.train.ar import TrainARConfig, train_ar
from rqvae.train.checkpoint import latest_checkpoint
from rqvae.train.classifier import train_classifier
from rqvae.train.logger import Logger
from rqvae.train.trainer import Trainer
from rqvae.train.vae import TrainVAEConfig, VAETask, train_vae


def _images(n=32, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.arange(n) % 2


def _vae_cfg(run_dir, **kw):
    base = dict(data="(in memory)", run_dir=str(run_dir), preset="tiny", model=dict(ch=16, codebook_size=32),
                image_size=16, batch_size=4, grad_accum=2, steps=6, lr=1e-3, warmup_steps=2, disc_start=1,
                disc_ndf=16, ema_decay=0.9, log_every=1, checkpoint_every=100, sample_every=0, progress=False,
                tensorboard=True)
    base.update(kw)
    return TrainVAEConfig(**base)


def test_interrupt_mid_step_saves_the_last_step_closes_the_logs_and_resumes_bitwise(tmp_path, monkeypatch):
    ds = TensorImageDataset(_images()[0])
    full = train_vae(_vae_cfg(tmp_path / "full"), dataset=ds)

    closed = []
    original_close = Logger.close

    def recording_close(self):
        handles = (self._file, self._writer)
        original_close(self)
        closed.append(handles)

    original_step = VAETask.train_step

    def interrupted_step(self, batch, *, step, micro, scale):
        out = original_step(self, batch, step=step, micro=micro, scale=scale)  # the codebook moved already
        if micro == 7:  # the second micro-batch of step 3 (0-based): Ctrl-C in the middle of a step
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Logger, "close", recording_close)
    monkeypatch.setattr(VAETask, "train_step", interrupted_step)
    run = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train_vae(_vae_cfg(run), dataset=ds)
    (file, writer), = closed
    assert file.closed and writer.all_writers is None  # metrics.jsonl and TensorBoard closed
    assert latest_checkpoint(run).name == "step_000003"
    monkeypatch.setattr(VAETask, "train_step", original_step)

    resumed = train_vae(_vae_cfg(run, resume=True), dataset=ds)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    ma = load_file(str(tmp_path / "full" / "checkpoints" / "step_000006" / "modules.safetensors"))
    mb = load_file(str(run / "checkpoints" / "step_000006" / "modules.safetensors"))
    for k in ma:  # discriminator and EMA too
        assert torch.equal(ma[k], mb[k]), k


def test_resume_without_a_run_says_so(tmp_path):
    with pytest.raises(UserError, match="--resume: .* holds no run to continue"):
        train_vae(_vae_cfg(tmp_path / "new", resume=True), dataset=TensorImageDataset(_images()[0]))
    assert not (tmp_path / "new").exists()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_plain_lines_off_a_terminal():
    stream = io.StringIO()
    logger = Logger(None, total_steps=3, desc="train-vae", stream=stream, interval=0.0)
    logger.scalars(1, {"loss/total": 0.0123, "lr": 1e-3})
    for _ in range(3):
        logger.advance()
    logger.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 3
    assert lines[-1].startswith("train-vae step 3/3 loss 0.0123 ") and lines[-1].endswith(" it/s")

    quiet = io.StringIO()  # the default interval: one line at the end of a short run
    logger = Logger(None, total_steps=5, desc="train-ar", stream=quiet)
    for _ in range(5):
        logger.advance()
    logger.close()
    assert quiet.getvalue().count("\n") == 1 and quiet.getvalue().startswith("train-ar step 5/5 ")

    tty = _Terminal()  # a terminal gets the tqdm bar
    logger = Logger(None, total_steps=2, desc="bar", stream=tty)
    logger.advance()
    logger.close()
    assert "\r" in tty.getvalue() and "it/s" in tty.getvalue()


def test_every_task_runs_through_the_one_trainer(tmp_path, monkeypatch, capsys):
    tasks = []
    original = Trainer.train

    def spy(self):
        tasks.append(type(self.task).__name__)
        return original(self)

    monkeypatch.setattr(Trainer, "train", spy)
    x, y = _images()
    train_vae(_vae_cfg(tmp_path / "vae", steps=2, grad_accum=1, progress=True), dataset=TensorImageDataset(x))
    vae_dir = tmp_path / "vae" / "model"
    RQVAE.from_pretrained(vae_dir)
    train_ar(TrainARConfig(vae=str(vae_dir), data="mem", run_dir=str(tmp_path / "ar"), preset="tiny", steps=2,
                           batch_size=8, log_every=1, sample_every=0, samples_per_class=1, progress=True,
                           tensorboard=False, feature_cache=str(tmp_path / "cache")),
             dataset=TensorImageDataset(x, y))
    clf = Classifier(ClassifierConfig(in_channels=3, num_classes=2, width=4, image_size=16))
    result = train_classifier(clf, TensorImageDataset(x, y), steps=2, batch_size=8,
                              run_dir=str(tmp_path / "clf"), progress=True)
    assert tasks == ["VAETask", "ARTask", "ClassifierTask"] and result.steps == 2

    for name in ("vae", "ar", "clf"):  # one metric naming
        last = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
        for key in ("loss/total", "lr", "grad_norm", "time/step_s", "time/data_s", "perf/images_per_s"):
            assert key in last, (name, key)
        assert 0 <= last["time/data_s"] <= last["time/step_s"]
    for name in ("vae", "ar"):  # one sample naming
        assert [p.name for p in (tmp_path / name / "samples").iterdir()] == ["step_0000002.png"]
    err = capsys.readouterr().err
    for desc in ("train-vae", "train-ar", "classifier"):
        assert f"{desc} step 2/2 loss " in err
        assert f"{desc}:" not in err  # no tqdm bar ("desc:  50%|...") off a terminal


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_command_ends_with_a_checkpoint(tmp_path, sig):
    from PIL import Image

    data = tmp_path / "imgs"
    data.mkdir()
    for i, img in enumerate(_images(16)[0]):
        Image.fromarray(((img.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()).save(
            data / f"{i}.png")
    run = tmp_path / "run"
    argv = ["train-vae", "--data", str(data), "--out", str(run), "--preset", "tiny", "--model-config",
            '{"ch": 16, "codebook_size": 32}', "--image-size", "16", "--batch-size", "4", "--steps", "100000",
            "--checkpoint-every", "100000", "--log-every", "1", "--sample-every", "0", "--no-tensorboard",
            "--device", "cpu"]
    p = subprocess.Popen([sys.executable, "-m", "rqvae", *argv], stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = run / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.time() - t0 < 60:
        time.sleep(0.05)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert "interrupted: saved step" in err and "Traceback" not in err
    step = int(latest_checkpoint(run).name.split("_")[1])
    assert step >= 2 and f"saved step {step} " in err


def test_progress_shows_the_loss_of_every_step_not_only_of_log_lines():
    stream = io.StringIO()
    logger = Logger(None, total_steps=3, desc="train-vae", stream=stream, interval=0.0)
    logger.scalars(1, {"loss/total": 9.0})  # a log line (every --log-every steps)
    logger.progress_loss(torch.tensor(1.0))
    logger.progress_loss(torch.tensor(3.0))
    logger.advance()  # the mean of the steps since the last refresh
    logger.progress_loss(torch.tensor(5.0))
    logger.advance()
    logger.advance()  # no new step loss: the last value stays
    logger.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" loss ")[1].split()[0] for line in lines] == ["2", "5", "5"]


def test_a_run_failing_before_its_first_step_removes_the_folder_it_created(tmp_path, monkeypatch):
    def fail(self, batch, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(VAETask, "train_step", fail)
    ds = TensorImageDataset(_images()[0])
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="out of memory"):
        train_vae(_vae_cfg(run), dataset=ds)
    assert not run.exists() and tmp_path.exists()
    run.mkdir()  # a folder the user made is left alone
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="out of memory"):
        train_vae(_vae_cfg(run), dataset=ds)
    assert (run / "notes.txt").read_text() == "mine"
