"""PatchGAN discriminator, GAN losses, adaptive weight, LPIPS loading, and the training helpers."""

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from rqvae.errors import UserError
from rqvae.models.discriminator import (
    DiscriminatorConfig,
    PatchDiscriminator,
    adaptive_gan_weight,
    generator_loss,
    hinge_d_loss,
)
from rqvae.models.lpips import LPIPS
from rqvae.train.ema import ModelEMA
from rqvae.train.guard import NonFiniteGuard, NonFiniteLossError
from rqvae.train.optim import build_scheduler, lr_factor


def test_patchgan_matches_official_layout():
    torch.manual_seed(0)
    d = PatchDiscriminator(DiscriminatorConfig(in_channels=3, ndf=64, n_layers=2))
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2), (64, 128, 2), (128, 256, 1), (256, 1, 1)]
    assert all(c.kernel_size == (4, 4) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 2
    assert convs[1].bias is None and convs[-1].bias is not None
    assert abs(convs[2].weight.std().item() - 0.02) < 0.002  # N(0, 0.02) init
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    assert PatchDiscriminator(DiscriminatorConfig(in_channels=1, ndf=8, n_layers=3))(
        torch.randn(2, 1, 32, 32)).shape == (2, 1, 2, 2)


def test_hinge_and_generator_losses():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.0])
    # relu(1 - real) = [0, 0.5] -> 0.25; relu(1 + fake) = [0, 1] -> 0.5; L_D = 0.5 * 0.75
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.375)
    assert generator_loss(fake).item() == pytest.approx(1.0)


def test_adaptive_weight_is_gradient_norm_ratio():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    nll = (3.0 * w).sum()  # grad (3, 3), norm 3 sqrt 2
    g = (w * torch.tensor([1.0, 0.0])).sum()  # grad (1, 0), norm 1
    lam = adaptive_gan_weight(nll, g, w)
    assert lam.item() == pytest.approx(3 * math.sqrt(2) / (1 + 1e-4), rel=1e-5)
    assert not lam.requires_grad
    nll.backward()  # graphs are kept
    huge = adaptive_gan_weight((1e9 * w).sum(), (0 * w).sum(), w)
    assert huge.item() == pytest.approx(1e4)  # clamped


def _lpips_files(tmp_path, vgg_ext=".safetensors"):
    torch.manual_seed(0)
    ref = LPIPS()
    vgg = {f"features.{k}": v.clone() for k, v in ref.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision files also hold the classifier
    heads = {f"lin{i}.model.1.weight": torch.rand_like(lin.model[1].weight) for i, lin in enumerate(ref.lins)}
    vgg_path, heads_path = tmp_path / f"vgg16{vgg_ext}", tmp_path / "vgg.pth"
    if vgg_ext == ".safetensors":
        save_file(vgg, str(vgg_path))
    else:
        torch.save(vgg, vgg_path)
    torch.save(heads, heads_path)
    return vgg_path, heads_path, vgg, heads


def test_lpips_loads_torchvision_and_lpips_keys(tmp_path):
    vgg_path, heads_path, vgg, heads = _lpips_files(tmp_path, ".pt")
    m = LPIPS.from_files(vgg_path, heads_path)
    assert torch.equal(m.features[28].weight, vgg["features.28.weight"])
    assert torch.equal(m.lins[4].model[1].weight, heads["lin4.model.1.weight"])
    assert not any(p.requires_grad for p in m.parameters())
    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    assert torch.allclose(m(x, x), torch.zeros(2), atol=1e-6)  # identical images: distance 0
    d = m(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0  # a usable loss
    g = x[:, :1]
    assert torch.allclose(m(g, g), torch.zeros(2), atol=1e-6) and m(g, y[:, :1].detach()).shape == (2,)


def test_lpips_bad_files_are_user_errors(tmp_path):
    vgg_path, heads_path, vgg, heads = _lpips_files(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        LPIPS.from_files(tmp_path / "nope.pth", heads_path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        LPIPS.from_files(junk, heads_path)
    with pytest.raises(UserError, match="could not be read"):
        LPIPS.from_files(vgg_path, junk)
    del vgg["features.28.bias"]
    save_file(vgg, str(tmp_path / "partial.safetensors"))
    with pytest.raises(UserError, match="lacks"):
        LPIPS.from_files(tmp_path / "partial.safetensors", heads_path)
    torch.save({"lin0.model.1.weight": torch.zeros(1, 3, 1, 1)}, tmp_path / "heads_bad.pth")
    with pytest.raises(UserError, match="lin0"):
        LPIPS.from_files(vgg_path, tmp_path / "heads_bad.pth")


def test_lr_schedule_and_ema_and_guard():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(50, 10, 100) == 1.0
    assert lr_factor(100, 10, 100, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(55, 10, 100, "cosine") == pytest.approx(0.5)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, warmup_steps=4, total_steps=8)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
    with pytest.raises(UserError):
        build_scheduler(opt, 0, 8, schedule="linear-ish")
    assert sched.state_dict()["last_epoch"] == 0

    model = nn.Linear(2, 2)
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # first decay = min(0.5, 1 / 10) = 0.1
    before = ema.module.weight.clone()
    with ema.swap_in(model) as m:
        assert torch.equal(m.weight, before)
    assert torch.equal(model.weight, torch.ones(2, 2))
    assert int(ema.num_updates) == 1 and "num_updates" in ema.state_dict()

    guard = NonFiniteGuard(max_consecutive=2)
    buf_owner = nn.BatchNorm1d(2)
    guard.snapshot(buf_owner)
    buf_owner.running_mean.fill_(7.0)
    assert guard.check(torch.tensor(float("nan")), step=1) is False
    guard.restore(buf_owner)
    assert torch.equal(buf_owner.running_mean, torch.zeros(2))
    assert guard.check(torch.tensor(1.0), 2.0, step=2) is True and guard.consecutive == 0
    guard.check(float("inf"), step=3)
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        guard.check(torch.tensor([1.0, float("nan")]), step=4)
    assert guard.total == 3
