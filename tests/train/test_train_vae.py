"""Stage-1 trainer: the loss goes down, resume is bitwise exact, LPIPS plugs in, CLI errors are one-liners.

Runs in-process on a very small model (the `tiny` preset at 16x16 with 16 base channels) and one thread,
because the CPU is shared with other processes (several OpenMP threads under contention are ~8x slower).
"""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from rqvae.cli import main
from rqvae.data import TensorImageDataset
from rqvae.errors import UserError
from rqvae.models.vae import RQVAE
from rqvae.train.vae import TrainVAEConfig, train_vae


def synthetic_images(n=64, size=16, seed=0):
    """Smooth random colour waves in [-1, 1]: learnable but not trivial."""
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-1, 1, size)
    out = []
    for _ in range(n):
        a, b, c = (torch.rand(3, generator=g) * 3).tolist()
        out.append(torch.stack([torch.tanh(2 * torch.sin(a * x[None, :] + b * x[:, None] + c * k))
                                for k in range(3)]))
    return torch.stack(out)  # (n, 3, size, size)


def small_cfg(run_dir, **kw):
    base = dict(data="(in memory)", run_dir=str(run_dir), preset="tiny", model=dict(ch=16, codebook_size=32),
                image_size=16, batch_size=8, steps=40, lr=1e-3, warmup_steps=2, disc_ndf=16, log_every=10,
                checkpoint_every=20, sample_every=40, progress=False, tensorboard=False)
    base.update(kw)
    return TrainVAEConfig(**base)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_lowers_the_loss_and_saves_a_model(tmp_path):
    ds = TensorImageDataset(synthetic_images())
    run = tmp_path / "run"
    model = train_vae(small_cfg(run, disc_weight=0.0, tensorboard=True), dataset=ds)
    m = read_metrics(run)
    assert [r["step"] for r in m] == [10, 20, 30, 40]
    assert m[-1]["loss/rec"] < 0.75 * m[0]["loss/rec"], (m[0]["loss/rec"], m[-1]["loss/rec"])
    assert m[-1]["psnr"] > m[0]["psnr"]
    assert all(m[-1][f"codes/perplexity_d{d}"] > 1 for d in range(1, 5))
    loaded = RQVAE.from_pretrained(run / "model")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert (run / "samples" / "step_0000040.png").is_file()
    assert any((run / "tb").iterdir())
    assert (run / "checkpoints" / "step_000040").is_dir()


def _modules(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "modules.safetensors"))


def test_resume_is_bitwise_identical(tmp_path):
    """k steps + resume for k more == 2k steps in one go (GAN on, EMA, grad accumulation, augmentation)."""
    ds = TensorImageDataset(synthetic_images(32), augment=True)
    kw = dict(steps=6, disc_start=2, ema_decay=0.9, grad_accum=2, batch_size=4, checkpoint_every=3,
              log_every=1, sample_every=2)
    full, part = tmp_path / "full", tmp_path / "part"
    a = train_vae(small_cfg(full, **kw), dataset=ds)
    with pytest.raises(UserError, match="--resume"):  # a used run folder needs --resume
        train_vae(small_cfg(full, **kw), dataset=ds)
    train_vae(small_cfg(part, **{**kw, "steps": 3}), dataset=ds)
    b = train_vae(small_cfg(part, **kw, resume=True), dataset=ds)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    ma, mb = _modules(full, 6), _modules(part, 6)
    assert ma.keys() == mb.keys() and any(k.startswith("disc.") for k in ma)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    ra, rb = read_metrics(full), read_metrics(part)  # the resumed log continues without duplicates
    assert [r["step"] for r in rb] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(ra, rb):
        assert x["loss/total"] == y["loss/total"] and x.get("loss/d") == y.get("loss/d")
    assert "loss/d" in ra[-1] and ra[-1]["gan/weight"] > 0


def _lpips_files(tmp_path):
    from rqvae.models.lpips import LPIPS

    torch.manual_seed(0)
    ref = LPIPS()
    vgg = {f"features.{k}": v for k, v in ref.features.state_dict().items()}
    heads = {f"lin{i}.model.1.weight": torch.rand_like(lin.model[1].weight) for i, lin in enumerate(ref.lins)}
    save_file(vgg, str(tmp_path / "vgg16.safetensors"))
    torch.save(heads, tmp_path / "vgg.pth")
    return tmp_path / "vgg16.safetensors", tmp_path / "vgg.pth"


def test_lpips_loss_is_used_when_files_are_given(tmp_path, caplog):
    ds = TensorImageDataset(synthetic_images(16))
    vgg, heads = _lpips_files(tmp_path)
    train_vae(small_cfg(tmp_path / "p", steps=2, log_every=1, disc_weight=0.0, lpips_vgg=str(vgg),
                        lpips_heads=str(heads)), dataset=ds)
    m = read_metrics(tmp_path / "p")
    assert m[0]["loss/perceptual"] > 0
    assert m[0]["loss/total"] > m[0]["loss/rec"] + m[0]["loss/perceptual"] - 1e-6
    with caplog.at_level(logging.INFO, logger="rqvae.train"):
        train_vae(small_cfg(tmp_path / "q", steps=1, disc_weight=0.0), dataset=ds)
    said = [r.message for r in caplog.records if "LPIPS" in r.message]
    assert len(said) == 1 and "without the perceptual loss" in said[0]
    assert "loss/perceptual" not in read_metrics(tmp_path / "q")[0]


def test_cli_user_errors(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train-vae", "--data", str(tmp_path / "missing"), "--out", out, "--steps", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train-vae", "--data", "fmnist", "--out", out, "--lpips-vgg", "x.pth"]) == 2
    assert "--lpips-heads" in capsys.readouterr().err
    assert main(["train-vae", "--data", "fmnist", "--out", out, "--preset", "nope"]) == 2
    assert "unknown RQ-VAE preset" in capsys.readouterr().err
    assert main(["train-vae", "--data", "fmnist", "--out", out, "--model-config", '{"colour": 1}']) == 2
    assert "unknown model config fields" in capsys.readouterr().err
    assert main(["train-vae", "--data", "fmnist", "--out", out, "--lpips-vgg", str(tmp_path / "v.pth"),
                 "--lpips-heads", str(tmp_path / "h.pth"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_kmeans_codebook_init_fits_the_first_encoder_outputs_and_resumes_bitwise(tmp_path):
    ds = TensorImageDataset(synthetic_images())
    cfg = dict(disc_weight=0.0, steps=2, log_every=1, checkpoint_every=1, sample_every=0)
    train_vae(small_cfg(tmp_path / "rand", **cfg), dataset=ds)
    train_vae(small_cfg(tmp_path / "km", codebook_init_batches=4, **cfg), dataset=ds)
    first = {name: read_metrics(tmp_path / name)[0] for name in ("rand", "km")}
    # at step 1 a codebook fitted to the encoder's outputs quantizes them far better than the random one
    assert first["km"]["loss/commit"] < 0.1 * first["rand"]["loss/commit"], first
    assert json.loads((tmp_path / "km" / "train_config.json").read_text())["codebook_init_batches"] == 4
    # resuming a k-means run from its step-1 checkpoint gives the uninterrupted run's weights
    train_vae(small_cfg(tmp_path / "km2", codebook_init_batches=4, stop_after=1, **cfg), dataset=ds)
    resumed = train_vae(small_cfg(tmp_path / "km2", codebook_init_batches=4, resume=True, **cfg), dataset=ds)
    full = RQVAE.from_pretrained(tmp_path / "km" / "model")
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
