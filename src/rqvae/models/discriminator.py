"""PatchGAN discriminator and the adversarial losses of stage-1 training (VQGAN / RQ-VAE).

The discriminator is the pix2pix "NLayer" PatchGAN the official RQ-VAE uses: 4x4 convolutions,
``ndf`` channels stride 2, then ``n_layers - 1`` more stride-2 layers doubling the width (capped at
8 * ndf) with BatchNorm, one stride-1 layer with BatchNorm, and a 1-channel stride-1 output: one
real/fake logit per overlapping patch. Losses (paper Sec. 3.1, following VQGAN):

    L_D = 1/2 * ( E[relu(1 - D(x))] + E[relu(1 + D(x_hat))] )          (hinge)
    L_G = -E[D(x_hat)]
    lambda = ||grad_{w_L} L_nll|| / (||grad_{w_L} L_G|| + 1e-4), clamped to [0, 1e4]

where ``w_L`` is the decoder's last layer and ``L_nll`` the reconstruction (+ perceptual) loss; the
generator objective is ``L_nll + beta * L_commit + disc_weight * lambda * L_G``.

Under DDP on CUDA, convert BatchNorm with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (see
:func:`maybe_sync_batchnorm`); SyncBatchNorm has no CPU kernel, so on CPU each rank normalises with
its own batch statistics (as the official per-GPU BatchNorm does) and the running statistics of rank 0
are broadcast before saving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DiscriminatorConfig:
    in_channels: int = 3
    ndf: int = 64  # width of the first layer
    n_layers: int = 2  # stride-2 layers; the official RQ-VAE uses 2 (64 s2, 128 s2, 256 s1, 1 s1)


class PatchDiscriminator(nn.Module):
    """(B, C, H, W) images in [-1, 1] -> (B, 1, h, w) patch logits."""

    def __init__(self, config: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DiscriminatorConfig()
        if config.n_layers < 1:
            raise ValueError("n_layers must be >= 1")
        ndf = config.ndf
        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, config.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < config.n_layers else 1  # the last hidden layer keeps the resolution
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: conv weights N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)  # (B, 1, h, w)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = 1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_G = -E[D(x_hat)]."""
    return -logits_fake.mean()


def adaptive_gan_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_w nll|| / (||grad_w g|| + 1e-4), clamped to [0, max_weight], detached.

    Both losses must still have their graphs (this keeps them with ``retain_graph=True``). If the
    generator loss does not reach ``last_layer_weight`` the weight is 0.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True, allow_unused=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True, allow_unused=True)[0]
    if nll_grad is None or g_grad is None:
        return torch.zeros((), device=last_layer_weight.device)
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def maybe_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """SyncBatchNorm under multi-process CUDA training; unchanged otherwise (no CPU kernel)."""
    if device.type == "cuda" and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module
