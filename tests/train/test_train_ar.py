import json
import logging
import math

import pytest
import torch

from rqvae.cli import main
from rqvae.data import TensorImageDataset
from rqvae.errors import UserError
from rqvae.models.vae import RQVAE
from rqvae.train.ar import (
    TrainARConfig,
    ar_image_loss,
    ar_text_loss,
    step_generator,
    train_ar,
)
from rqvae.train.ar_loss import soft_label_lines, soft_label_stats

N_IMAGES = 64


@pytest.fixture(scope="module")
def images():
    """64 tiny 32x32 RGB images in 4 classes: a bright square in a class-dependent corner."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N_IMAGES, 3, 32, 32, generator=g) * 0.2 - 1.0
    labels = torch.arange(N_IMAGES) % 4
    for i, c in enumerate(labels.tolist()):
        r, col = divmod(c, 2)
        x[i, :, r * 16:(r + 1) * 16, col * 16:(col + 1) * 16] += 1.5
    return x.clamp(-1, 1), labels


def _cfg(tmp_path, vae_dir, **kw):
    base = dict(vae=str(vae_dir), data="mem", run_dir=str(tmp_path / "run"), cond="class", preset="tiny",
                feature_cache=str(tmp_path / "cache"), steps=6, batch_size=16, checkpoint_every=1000,
                log_every=1, sample_every=0, samples_per_class=1, progress=False, tensorboard=False, seed=0,
                model={"dropout": 0.0})
    base.update(kw)
    return TrainARConfig(**base)


def _losses(run_dir, key="loss/image"):
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------- loss and codes
def test_soft_label_loss_matches_hand_computation():
    logits = torch.tensor([[[[1.0, 2.0, 0.0], [0.5, 0.5, 0.5]]]])  # (B=1, T=1, D=2, K=3)
    probs = torch.tensor([[[[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]]]])
    codes = torch.tensor([[[0, 1]]])
    # depth 1: log-softmax of (1, 2, 0) = (1, 2, 0) - log(e + e^2 + 1); depth 2: uniform -> -log 3
    lse = math.log(math.e + math.e ** 2 + 1)
    d1 = -(0.7 * (1 - lse) + 0.2 * (2 - lse) + 0.1 * (0 - lse))
    d2 = math.log(3)
    assert ar_image_loss(logits, probs, codes).item() == pytest.approx((d1 + d2) / 2, abs=1e-6)
    hard = ar_image_loss(logits, probs, codes, soft_labels=False).item()  # one-hot of codes (0, 1)
    assert hard == pytest.approx((-(1 - lse) + d2) / 2, abs=1e-6)

    text_logits = torch.zeros(1, 2, 5)  # predicts tokens 2..3; the pad (id 0) is ignored
    assert ar_text_loss(text_logits, torch.tensor([[3, 4, 0]]), pad=0).item() == pytest.approx(math.log(5))


def test_stochastic_codes_vary_between_batches_greedy_do_not(vae_dir, images):
    q = RQVAE.from_pretrained(vae_dir).quantizer
    with torch.no_grad():
        z = RQVAE.from_pretrained(vae_dir).encode_latent(images[0][:8])  # (8, 8, 8, 16)
    p1, c1 = q.soft_codes(z, 0.5, stochastic=True, generator=step_generator(0, 0, 0))
    p2, c2 = q.soft_codes(z, 0.5, stochastic=True, generator=step_generator(0, 1, 0))
    _, c1again = q.soft_codes(z, 0.5, stochastic=True, generator=step_generator(0, 0, 0))
    assert not torch.equal(c1, c2) and torch.equal(c1, c1again)  # fresh per step, reproducible per step
    torch.testing.assert_close(p1[..., 0, :], p2[..., 0, :])  # depth 1 does not depend on draws
    _, g1 = q.soft_codes(z, 0.5, stochastic=False, generator=step_generator(0, 0, 0))
    _, g2 = q.soft_codes(z, 0.5, stochastic=False, generator=step_generator(0, 1, 0))
    assert torch.equal(g1, g2) and torch.equal(g1, q.encode(z))


def test_soft_label_stats_span_greedy_to_uniform(vae_dir, images):
    vae = RQVAE.from_pretrained(vae_dir)
    with torch.no_grad():
        z = vae.encode_latent(images[0][:8])  # (8, h, w, n_z)
    q, D, K = vae.quantizer, vae.config.depth, vae.config.codebook_size
    sharp = soft_label_stats(q, z, 1e-8, torch.Generator().manual_seed(0))
    assert sharp["greedy_share"] == [1.0] * D and max(sharp["entropy_bits"]) < 1e-3
    flat = soft_label_stats(q, z, 1e8, torch.Generator().manual_seed(0))
    assert all(e == pytest.approx(math.log2(K), abs=1e-3) for e in flat["entropy_bits"])
    assert max(flat["greedy_share"]) < 0.5  # uniform draws: the greedy code about 1 / K of the time
    probs, _ = q.soft_codes(z, 0.3, stochastic=True, generator=torch.Generator().manual_seed(0))
    by_hand = -(probs * probs.clamp_min(1e-30).log2()).sum(-1).mean(dim=(0, 1, 2))  # (D,)
    mid = soft_label_stats(q, z, 0.3, torch.Generator().manual_seed(0))["entropy_bits"]
    torch.testing.assert_close(torch.tensor(mid), by_hand.float(), atol=1e-5, rtol=1e-5)

    assert not any("WARNING" in line for line in soft_label_lines(q, z, 1e-8, 0))
    lines = soft_label_lines(q, z, 1e8, 0)
    assert len(lines) == 2 and "WARNING" in lines[1] and "--temperature" in lines[1]


# --------------------------------------------------------------------------------- training runs
def test_class_conditional_training_lowers_loss_and_caches_features(tmp_path, vae_dir, images, monkeypatch,
                                                                    caplog):
    caplog.set_level(logging.INFO, logger="rqvae.train.logger")
    ds = TensorImageDataset(*images)
    calls = {"n": 0}
    orig = RQVAE.encode_latent

    def counting(self, x):
        calls["n"] += 1
        return orig(self, x)

    monkeypatch.setattr(RQVAE, "encode_latent", counting)
    cfg = _cfg(tmp_path, vae_dir, steps=40, warmup_steps=2, sample_every=0)
    model = train_ar(cfg, dataset=ds)
    assert calls["n"] > 0
    assert any(r.getMessage().startswith("soft labels at temperature 0.5 (on ") for r in caplog.records)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    run = tmp_path / "run"
    assert (run / "model" / "model.safetensors").is_file()
    assert (run / "samples" / "step_0000040.png").is_file()
    from rqvae.models.transformer import RQTransformer

    loaded = RQTransformer.from_pretrained(run / "model")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)

    calls["n"] = 0  # a second run over the same VAE and data reuses the cache: no encoder call
    train_ar(_cfg(tmp_path, vae_dir, steps=1, run_dir=str(tmp_path / "run2")), dataset=ds)
    assert calls["n"] == 0


def test_resume_is_bitwise_identical(tmp_path, vae_dir, images):
    ds = TensorImageDataset(*images)
    kw = dict(steps=6, warmup_steps=2, model={"dropout": 0.1}, cond_dropout=0.2, checkpoint_every=3)
    full = train_ar(_cfg(tmp_path, vae_dir, run_dir=str(tmp_path / "full"), **kw), dataset=ds)
    train_ar(_cfg(tmp_path, vae_dir, run_dir=str(tmp_path / "part"), stop_after=3, **kw), dataset=ds)
    assert not (tmp_path / "part" / "model").exists()
    resumed = train_ar(_cfg(tmp_path, vae_dir, run_dir=str(tmp_path / "part"), resume=True, **kw), dataset=ds)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")


def test_text_conditioning_trains_with_a_tokenizer_from_captions(tmp_path, vae_dir, images):
    from rqvae.data.images import save_image
    from rqvae.data.text import load_tokenizer

    folder = tmp_path / "imgs"
    words = ["top left", "top right", "bottom left", "bottom right"]
    x, labels = images
    for i in range(32):
        save_image(x[i], folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a bright square at the {words[int(labels[i])]}")
    cfg = _cfg(tmp_path, vae_dir, data=str(folder), cond="text", text_len=8, text_vocab_size=300,
               cond_dropout=0.1, steps=4, batch_size=8)
    train_ar(cfg)
    model_dir = tmp_path / "run" / "model"
    tok = load_tokenizer(model_dir)
    assert tok.get_vocab_size() <= 300 and tok.encode("top left").ids[-1] == tok.token_to_id("[PAD]")
    text_losses = _losses(tmp_path / "run", "loss/text")
    assert len(text_losses) == 4 and all(math.isfinite(v) for v in text_losses)
    cfg_json = json.loads((model_dir / "config.json").read_text())
    assert cfg_json["cond_type"] == "text"


# ------------------------------------------------------------------------------------------ CLI
def test_cli_errors_are_one_line(tmp_path, vae_dir, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    cases = [
        (["--vae", str(tmp_path / "missing"), "--data", str(tmp_path / "empty")], "is not a model folder"),
        (["--vae", str(vae_dir), "--data", str(tmp_path / "empty")], "no usable images"),
    ]
    for extra, needle in cases:
        rc = main(["train-ar", *extra, "--out", str(tmp_path / "o"), "--preset", "tiny", "--steps", "1",
                   "--no-progress", "--no-tensorboard", "--feature-cache", str(tmp_path / "c")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and needle in err and "\n" not in err, err
    with pytest.raises(UserError, match="--cond-dropout needs a condition"):
        TrainARConfig(vae="v", data="d", run_dir="r", cond="uncond", cond_dropout=0.1).validate()
