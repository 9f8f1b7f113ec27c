"""--activation-checkpointing: the blocks are recomputed in the backward pass, and the losses and gradients
are those of the plain model (peak memory is not measurable reliably on a CPU; recomputation is counted)."""

import copy
import json

import torch
import torch.nn.functional as F

from rqvae.data import TensorImageDataset
from rqvae.models.transformer import RQTransformer
from rqvae.models.transformer_blocks import Block
from rqvae.models.vae import RQVAE, ResnetBlock
from rqvae.train.activations import checkpoint_blocks, is_checkpointed
from rqvae.train.ar import transformer_blocks
from rqvae.train.vae import TrainVAEConfig, train_vae


def counting_forwards(model, kind):
    """Count the calls of every ``kind`` block's own forward (recomputation calls it again)."""
    calls = {"n": 0}
    for m in model.modules():
        if isinstance(m, kind):
            inner = m.forward

            def counted(*args, _inner=inner, **kwargs):
                calls["n"] += 1
                return _inner(*args, **kwargs)

            m.forward = counted
    return calls


def grads_after(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(plain, ckpt, loss_fn):
    loss_a, grads_a = grads_after(plain, loss_fn)
    loss_b, grads_b = grads_after(ckpt, loss_fn)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-7, msg=k)


def test_transformer_blocks_are_recomputed_with_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = RQTransformer.from_preset("tiny", dropout=0.1)  # dropout: the recomputed masks must agree
    ckpt = copy.deepcopy(plain)
    calls = counting_forwards(ckpt, Block)
    n = checkpoint_blocks(transformer_blocks(ckpt))
    assert n == len(plain.spatial_blocks) + len(plain.depth_blocks) and all(
        is_checkpointed(b) for b in transformer_blocks(ckpt))
    codes = torch.randint(0, plain.config.vocab_size, (4, *plain.config.code_shape))
    cond = torch.randint(0, plain.config.num_classes, (4,))

    def loss_fn(model):
        torch.manual_seed(1)  # the same dropout masks in both models
        logits = model(codes, cond)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))

    assert_same_loss_and_grads(plain, ckpt, loss_fn)
    assert calls["n"] == 2 * n  # every block ran again in the backward pass
    with torch.no_grad():
        calls["n"] = 0
        ckpt(codes, cond)
    assert calls["n"] == n  # no recomputation without gradients
    assert ckpt.state_dict().keys() == plain.state_dict().keys()  # checkpoints and folders unchanged


def test_vae_resnet_blocks_are_recomputed_with_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = RQVAE.from_preset("tiny", image_size=16, ch=16, codebook_size=32)
    ckpt = copy.deepcopy(plain)
    calls = counting_forwards(ckpt, ResnetBlock)
    n = checkpoint_blocks(m for m in ckpt.modules() if isinstance(m, ResnetBlock))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    plain.eval(), ckpt.eval()  # no EMA codebook update between the two forwards

    def loss_fn(model):
        out = model(x)
        return F.mse_loss(out.reconstruction, x) + 0.25 * out.commitment_loss

    assert_same_loss_and_grads(plain, ckpt, loss_fn)
    assert n > 0 and calls["n"] == 2 * n


def test_vae_training_with_activation_checkpointing_logs_the_same_losses(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(16, 3, 16, 16) * 2 - 1
    ds = TensorImageDataset(images, torch.zeros(16, dtype=torch.long))
    base = dict(data="mem", preset="tiny", model=dict(ch=16, codebook_size=32), image_size=16, batch_size=4,
                steps=3, lr=1e-3, warmup_steps=1, disc_ndf=16, disc_start=1, log_every=1, checkpoint_every=0,
                sample_every=0, progress=False, tensorboard=False)
    for name, on in (("plain", False), ("ckpt", True)):
        cfg = TrainVAEConfig(**base, run_dir=str(tmp_path / name), activation_checkpointing=on)
        train_vae(cfg, dataset=ds)
    plain, ckpt = ([json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
                   for n in ("plain", "ckpt"))
    assert len(plain) == 3 and "loss/g" in plain[-1]  # with the GAN loss (its adaptive weight's gradients)
    for a, b in zip(plain, ckpt):
        for k in ("loss/total", "loss/rec", "loss/g", "loss/d"):
            if k in a:
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
