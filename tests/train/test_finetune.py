"""Fine-tuning (--init-from): the first logged loss is the loaded model's loss on that batch (not a fresh
model's), from our folders and from the official fixtures; --freeze keeps weights bit-identical; a new class
count gets new class embeddings; a changed codebook is refused unless --allow-new-codebook.

Every first batch here is the whole dataset (batch size = number of images), so the first logged loss of a
fine-tuning run can be computed directly from the loaded model."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from rqvae.cli import main
from rqvae.data import TensorImageDataset
from rqvae.errors import UserError
from rqvae.models.transformer import RQTransformer
from rqvae.models.vae import RQVAE
from rqvae.official.convert import convert_official
from rqvae.official.load import load_official
from rqvae.official.transformer import convert_official_rqtransformer, load_codebook
from rqvae.official.vae import load_rqvae
from rqvae.train.ar import TrainARConfig, ar_image_loss, train_ar
from rqvae.train.vae import TrainVAEConfig, train_vae
from tests.helpers.paths import OFFICIAL
from tests.train.test_train_vae import synthetic_images

N = 16


def first(run_dir, key):
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(m[key] for m in lines if key in m)


def vae_cfg(run_dir, **kw):
    base = dict(data="(in memory)", run_dir=str(run_dir), batch_size=N, steps=2, lr=1e-3, warmup_steps=0,
                disc_weight=0.0, log_every=1, checkpoint_every=0, sample_every=0, progress=False,
                tensorboard=False)
    base.update(kw)
    return TrainVAEConfig(**base)


def rec_loss(vae, images):
    with torch.no_grad():
        return F.mse_loss(vae.eval()(images).reconstruction, images).item()


@pytest.fixture(scope="module")
def base_vae(tmp_path_factory):
    """A tiny RQ-VAE trained for 40 steps: its run folder and its images."""
    images = synthetic_images(N)
    run = tmp_path_factory.mktemp("base") / "run"
    train_vae(vae_cfg(run, preset="tiny", model=dict(ch=16, codebook_size=32), image_size=16, steps=40,
                      batch_size=8), dataset=TensorImageDataset(images))
    return run, images


def test_vae_from_our_run_folder_starts_at_the_trained_loss(base_vae, tmp_path):
    run, images = base_vae
    ds = TensorImageDataset(images)
    expected = rec_loss(RQVAE.from_pretrained(run / "model"), images)
    train_vae(vae_cfg(tmp_path / "ft", init_from=str(run)), dataset=ds)  # a run folder means its model/
    scratch_cfg = vae_cfg(tmp_path / "scratch", preset="tiny", model=dict(ch=16, codebook_size=32),
                          image_size=16)
    train_vae(scratch_cfg, dataset=ds)
    ft, scratch = first(tmp_path / "ft", "loss/rec"), first(tmp_path / "scratch", "loss/rec")
    assert ft == pytest.approx(expected, rel=1e-4)
    assert scratch > 1.5 * ft, (scratch, ft)
    config = json.loads((tmp_path / "ft" / "model" / "config.json").read_text())
    assert config["ch"] == 16 and config["codebook_size"] == 32  # the architecture is the loaded model's


def test_vae_from_an_official_checkpoint(tmp_path):
    images = synthetic_images(N, size=32)
    expected = rec_loss(load_rqvae(OFFICIAL / "rqvae_tiny"), images)
    train_vae(vae_cfg(tmp_path / "ft", init_from=str(OFFICIAL / "rqvae_tiny")),
              dataset=TensorImageDataset(images))
    assert first(tmp_path / "ft", "loss/rec") == pytest.approx(expected, rel=1e-4)
    assert RQVAE.from_pretrained(tmp_path / "ft" / "model").config.codebook_size == 64


def test_freeze_keeps_encoder_and_codebook_bit_identical(base_vae, tmp_path):
    run, images = base_vae
    before = RQVAE.from_pretrained(run / "model").state_dict()
    train_vae(vae_cfg(tmp_path / "ft", init_from=str(run / "model"), freeze="encoder,codebook", steps=3,
                      lr=1e-2), dataset=TensorImageDataset(images))
    after = RQVAE.from_pretrained(tmp_path / "ft" / "model").state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv.", "quantizer."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
    train_vae(vae_cfg(tmp_path / "free", init_from=str(run / "model"), steps=3, lr=1e-2),
              dataset=TensorImageDataset(images))  # without --freeze the same run changes both
    free = RQVAE.from_pretrained(tmp_path / "free" / "model").state_dict()
    assert not torch.equal(before["quantizer.codebook"], free["quantizer.codebook"])
    assert not torch.equal(before["quant_conv.weight"], free["quant_conv.weight"])


def test_vae_architecture_disagreement_and_bad_freeze_are_one_line_errors(base_vae, tmp_path, capsys):
    run, images = base_vae
    ds = TensorImageDataset(images)
    with pytest.raises(UserError, match=r"has ch=16 but .* ask for 32"):
        train_vae(vae_cfg(tmp_path / "a", init_from=str(run), model=dict(ch=32)), dataset=ds)
    with pytest.raises(UserError, match="image_size=16"):
        train_vae(vae_cfg(tmp_path / "b", init_from=str(run), preset="fmnist32-8x8x4"), dataset=ds)
    # fields that only change training may differ
    train_vae(vae_cfg(tmp_path / "c", init_from=str(run), model=dict(commitment_weight=0.5), steps=1),
              dataset=ds)
    rc = main(["train-vae", "--data", "x", "--out", str(tmp_path / "d"), "--init-from", str(run),
               "--freeze", "decoder"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown part(s) ['decoder']" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------------------ stage 2
def class_images(n, size, n_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 0.2 - 1.0
    labels = torch.arange(n) % n_classes
    for i, c in enumerate(labels.tolist()):
        r = c % 4
        h, w = (r // 2) * size // 2, (r % 2) * size // 2
        x[i, :, h:h + size // 2, w:w + size // 2] += 1.5
        x[i, c % 3] += 0.1 * (c // 4)
    return x.clamp(-1, 1), labels


def ar_cfg(tmp_path, vae, name, **kw):
    base = dict(vae=str(vae), data=f"mem-{name}", run_dir=str(tmp_path / name), cond="class",
                feature_cache=str(tmp_path / "cache"), steps=1, batch_size=N, checkpoint_every=0, log_every=1,
                sample_every=0, samples_per_class=1, progress=False, tensorboard=False, stochastic=False,
                soft_labels=False, model={"dropout": 0.0})
    base.update(kw)
    return TrainARConfig(**base)


def direct_loss(model, vae, images, labels):
    """The loss of ``model`` on all images with greedy codes of float16-cached latents (as training sees)."""
    with torch.no_grad():
        z = vae.encode_latent(images).half().float()
        codes = vae.quantizer.encode(z)
        logits = model.eval()(codes, labels)
    B, h, w, D = codes.shape
    return ar_image_loss(logits, None, codes.reshape(B, h * w, D), soft_labels=False).item()


@pytest.fixture(scope="module")
def base_ar(tmp_path_factory):
    """A tiny class-conditional RQ-Transformer (4 classes) trained for 30 steps on a tiny RQ-VAE."""
    tmp = tmp_path_factory.mktemp("ar")
    torch.manual_seed(0)
    vae_dir = tmp / "vae"
    RQVAE.from_preset("tiny").save_pretrained(vae_dir)
    images, labels = class_images(N, 32, 4)
    ds = TensorImageDataset(images, labels, class_names=["a", "b", "c", "d"])
    train_ar(ar_cfg(tmp, vae_dir, "base", preset="tiny", steps=30, lr=3e-3), dataset=ds)
    return tmp, vae_dir, images, labels


def test_ar_from_our_folder_starts_at_the_trained_loss(base_ar, tmp_path):
    tmp, vae_dir, images, labels = base_ar
    ds = TensorImageDataset(images, labels, class_names=["a", "b", "c", "d"])
    loaded = RQTransformer.from_pretrained(tmp / "base" / "model")
    expected = direct_loss(loaded, RQVAE.from_pretrained(vae_dir), images, labels)
    train_ar(ar_cfg(tmp_path, vae_dir, "ft", init_from=str(tmp / "base")), dataset=ds)
    train_ar(ar_cfg(tmp_path, vae_dir, "scratch", preset="tiny"), dataset=ds)
    ft, scratch = first(tmp_path / "ft", "loss/image"), first(tmp_path / "scratch", "loss/image")
    assert ft == pytest.approx(expected, rel=1e-4)
    assert scratch > ft + 0.3, (scratch, ft)
    assert RQTransformer.from_pretrained(tmp_path / "ft" / "model").config.class_names == ("a", "b", "c", "d")


def test_ar_new_class_count_gets_new_class_embeddings(base_ar, tmp_path, caplog):
    tmp, vae_dir, images, _ = base_ar
    labels = torch.arange(N) % 2
    ds = TensorImageDataset(images, labels, class_names=["x", "y"])
    with caplog.at_level(logging.INFO):
        train_ar(ar_cfg(tmp_path, vae_dir, "ft", init_from=str(tmp / "base"), cond_dropout=0.1), dataset=ds)
    assert "4 -> 2 classes: new class embeddings (2 + null row), the rest loaded" in caplog.text
    assert "classes (id name): 0 x, 1 y" in caplog.text
    model = RQTransformer.from_pretrained(tmp_path / "ft" / "model")
    assert model.config.num_classes == 2 and model.cond_emb.weight.shape[0] == 3
    old = RQTransformer.from_pretrained(tmp / "base" / "model")
    # one step at a small LR: the loaded weights are still close, the class embeddings are not the old ones
    assert (model.head.linear.weight - old.head.linear.weight).abs().max() < 0.01
    assert not torch.allclose(model.cond_emb.weight[:2], old.cond_emb.weight[:2], atol=0.01)


def test_ar_refuses_another_codebook_unless_allowed(base_ar, tmp_path):
    tmp, vae_dir, images, labels = base_ar
    ds = TensorImageDataset(images, labels, class_names=["a", "b", "c", "d"])
    tuned = RQVAE.from_pretrained(vae_dir)
    with torch.no_grad():
        tuned.quantizer.codebook.add_(0.01)  # a fine-tuned tokenizer: same shape, other codebook
    tuned.save_pretrained(tmp_path / "tuned")
    with pytest.raises(UserError, match="another codebook.*--allow-new-codebook"):
        train_ar(ar_cfg(tmp_path, tmp_path / "tuned", "no", init_from=str(tmp / "base")), dataset=ds)
    cfg = ar_cfg(tmp_path, tmp_path / "tuned", "yes", init_from=str(tmp / "base"), allow_new_codebook=True)
    train_ar(cfg, dataset=ds)
    saved = RQTransformer.from_pretrained(tmp_path / "yes" / "model").codebook
    assert torch.equal(saved, tuned.quantizer.codebook[0])


def test_ar_from_the_official_fixtures(tmp_path):
    vae_dir = convert_official(OFFICIAL / "rqvae_tiny", tmp_path / "vae")
    images, labels = class_images(N, 32, 10)
    ds = TensorImageDataset(images, labels)
    state, arch = load_official(OFFICIAL / "rqtransformer_class_tiny")
    loaded = convert_official_rqtransformer(state, arch, load_codebook(vae_dir))
    expected = direct_loss(loaded, RQVAE.from_pretrained(vae_dir), images, labels)
    train_ar(ar_cfg(tmp_path, vae_dir, "ft", init_from=str(OFFICIAL / "rqtransformer_class_tiny")),
             dataset=ds)
    assert first(tmp_path / "ft", "loss/image") == pytest.approx(expected, rel=1e-4)
    with pytest.raises(UserError, match="has width=64 but"):
        train_ar(ar_cfg(tmp_path, vae_dir, "p", init_from=str(OFFICIAL / "rqtransformer_class_tiny"),
                        preset="fmnist-small"), dataset=ds)


def test_finetune_may_change_per_depth_decays_but_not_the_architecture():
    from rqvae.models.vae import RQVAEConfig
    from rqvae.train.finetune import VAE_TRAINING_FIELDS, with_architecture_of

    base = RQVAEConfig(shared_codebook=False, depth=2, decays=(0.9, 0.5))
    out = with_architecture_of(base, {"decays": None, "ema_decay": 0.95}, source="m",
                               training_fields=VAE_TRAINING_FIELDS)
    assert out.decays is None and out.ema_decay == 0.95 and out.depth == 2
    with pytest.raises(UserError, match="depth"):
        with_architecture_of(base, {"depth": 4}, source="m", training_fields=VAE_TRAINING_FIELDS)
