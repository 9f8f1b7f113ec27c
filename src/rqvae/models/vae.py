"""The RQ-VAE (stage 1): a VQGAN-style convolutional encoder/decoder around a residual quantizer.

Paper (Lee et al., CVPR 2022), Sec. 3.1: an image X (H x W x 3) is encoded to a feature map
Z = E(X) of shape (h, w, n_z), h = H / f.  Each vector z of Z is represented by D codes

    RQ(z; C, D) = (k_1, ..., k_D),   r_0 = z,   k_d = argmin_k ||r_{d-1} - e(k)||^2,   r_d = r_{d-1} - e(k_d)

so that the partial sums  z^(d) = sum_{i<=d} e(k_i)  approximate z coarse-to-fine.  The decoder G
reconstructs X^ = G(z^(D)).  Training minimises  ||X - X^||^2 + beta * L_commit  (beta = 0.25), where the
quantizer computes L_commit from ||Z - sg[Z^(d)]||^2 over the depths d (Eq. 7; the official code averages
over d), and the gradient reaches the encoder through the straight-through estimator.  The codebook itself
is updated by EMA, not by gradients.

The encoder/decoder follow the taming-transformers layout that the official implementation uses, with
the same module names, so that official weights load by renaming only the quantizer's tensors
(see :mod:`rqvae.official.vae`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rqvae.errors import UserError
from rqvae.models.hub import PretrainedMixin
from rqvae.models.quantize import ResidualQuantizer


@dataclass
class RQVAEConfig:
    image_size: int = 256  # H = W of the training images
    in_channels: int = 3  # 3 for RGB, 1 for grayscale; the decoder outputs the same count
    ch: int = 128  # base channel count
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)  # channels per level; len - 1 stride-2 downsamples
    num_res_blocks: int = 2  # encoder ResNet blocks per level (the decoder has one more)
    attn_resolutions: tuple[int, ...] = (8,)  # feature-map sizes that get a self-attention block
    z_channels: int = 256  # encoder output channels (before quant_conv)
    embed_dim: int = 256  # n_z: the dimension of the quantized vectors
    codebook_size: int = 16384  # K
    depth: int = 4  # D: codes per position
    shared_codebook: bool = True  # one codebook for all depths (the paper's choice)
    codebook_sizes: tuple[int, ...] | None = None  # K_d per depth (not shared; max = codebook_size); None: K
    ema_decay: float = 0.99
    decays: tuple[float, ...] | None = None  # EMA decay per depth's codebook (not shared); None: ema_decay
    restart_dead_codes: bool = True
    commitment_weight: float = 0.25  # beta; used by the trainer, the model returns the raw loss
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.codebook_sizes is not None:
            self.codebook_sizes = tuple(int(k) for k in self.codebook_sizes)
        if self.decays is not None:
            self.decays = tuple(float(g) for g in self.decays)
        problems = []
        if self.in_channels not in (1, 3):
            problems.append(f"in_channels must be 1 or 3, got {self.in_channels}")
        if not self.ch_mult:
            problems.append("ch_mult must not be empty")
        if self.depth < 1 or self.codebook_size < 2:
            problems.append(f"need depth >= 1 and codebook_size >= 2, got {self.depth}, {self.codebook_size}")
        if self.ch_mult and self.image_size % self.downsample_factor:
            problems.append(f"image_size {self.image_size} is not divisible by the downsampling factor "
                            f"{self.downsample_factor}")
        if problems:
            raise UserError("invalid RQVAEConfig: " + "; ".join(problems))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


VAE_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's ImageNet 256x256 tokenizer: 8x8x4 codes, K = 16384 (~104.4M parameters incl. codebook).
    "imagenet256-8x8x4": dict(image_size=256, in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4, 4),
                              num_res_blocks=2, attn_resolutions=(8,), z_channels=256, embed_dim=256,
                              codebook_size=16384, depth=4),
    # FFHQ 256x256: K = 2048, attention at 16x16 (~100.7M).
    "ffhq256-8x8x4": dict(image_size=256, in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4, 4),
                          num_res_blocks=2, attn_resolutions=(16,), z_channels=256, embed_dim=256,
                          codebook_size=2048, depth=4),
    # Fashion-MNIST (28x28 padded to 32x32, grayscale): 32 -> 8, small enough to train on 2 CPU cores
    # (0.81M parameters, 0.59 GFLOP per image per training step; ch=32, ch_mult=(1, 2, 2) costs 2.2x more).
    "fmnist32-8x8x4": dict(image_size=32, in_channels=1, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1,
                           attn_resolutions=(8,), z_channels=64, embed_dim=64, codebook_size=256, depth=4),
    # Tests: the same architecture as tests/data/official/rqvae_tiny.
    "tiny": dict(image_size=32, in_channels=3, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                 attn_resolutions=(8,), z_channels=32, embed_dim=16, codebook_size=64, depth=4),
}


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (eps 1e-6) as in VQGAN; fewer groups only when channels % 32 != 0."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 `nin_shortcut` when channels change."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1 convolutions for q, k, v and output."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head of width C
        q, k, v = (t(h).flatten(2).transpose(1, 2).unsqueeze(1) for t in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, (B, 1, H*W, C)
        a = a.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 convolution: (H, W) -> (H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResNet blocks), `attn` (after each block, if any) and a resampler."""

    def __init__(self, blocks: list[ResnetBlock], attn: list[AttnBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    """The middle of the encoder / decoder: ResNet block, attention, ResNet block."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, z_channels, H/f, W/f), f = 2^(len(ch_mult) - 1)."""

    def __init__(self, cfg: RQVAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, c_in = cfg.image_size, cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            c_out = cfg.ch * mult
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.dropout)
                      for j in range(cfg.num_res_blocks)]
            nb = cfg.num_res_blocks
            attn = [AttnBlock(c_out) for _ in range(nb)] if res in cfg.attn_resolutions else []
            level = _Level(blocks, attn)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(c_out)
                res //= 2
            self.down.append(level)
            c_in = c_out
        self.mid = _Mid(c_in, cfg.dropout)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, C, h*f, w*f); `up[i]` mirrors the encoder's `down[i]`."""

    def __init__(self, cfg: RQVAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.image_size // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _Mid(c_in, cfg.dropout)
        up: list[_Level] = []
        for i in reversed(range(n)):
            c_out = cfg.ch * cfg.ch_mult[i]
            nb = cfg.num_res_blocks + 1
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.dropout) for j in range(nb)]
            attn = [AttnBlock(c_out) for _ in range(nb)] if res in cfg.attn_resolutions else []
            level = _Level(blocks, attn)
            if i != 0:
                level.upsample = Upsample(c_out)
                res *= 2
            up.insert(0, level)
            c_in = c_out
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class RQVAEOutput:
    reconstruction: torch.Tensor  # (B, C, H, W)
    codes: torch.Tensor  # (B, h, w, D) int64
    commitment_loss: torch.Tensor  # scalar, not yet multiplied by config.commitment_weight


class RQVAE(nn.Module, PretrainedMixin):
    """Encoder -> quant_conv -> residual quantizer -> post_quant_conv -> decoder.  Images are in [-1, 1]."""

    config_class = RQVAEConfig
    model_type = "rqvae"

    def __init__(self, config: RQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.quantizer = ResidualQuantizer(config.embed_dim, config.codebook_size, config.depth,
                                           shared_codebook=config.shared_codebook,
                                           ema_decay=config.decays or config.ema_decay,
                                           restart_dead_codes=config.restart_dead_codes,
                                           codebook_sizes=config.codebook_sizes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> RQVAE:
        if name not in VAE_PRESETS:
            raise UserError(f"unknown RQ-VAE preset {name!r}; choose one of {sorted(VAE_PRESETS)}")
        return cls(RQVAEConfig(**{**VAE_PRESETS[name], **overrides}))

    # ----------------------------------------------------------------------------------- shapes
    def code_shape(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int, int]:
        """(h, w, D) of the codes of an image of `image_size` (default: the configured size)."""
        size = self.config.image_size if image_size is None else image_size
        H, W = (size, size) if isinstance(size, int) else size
        f = self.config.downsample_factor
        return H // f, W // f, self.config.depth

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's final conv weight, for the adaptive GAN weight of VQGAN."""
        return self.decoder.conv_out.weight

    def _check_images(self, images: torch.Tensor) -> None:
        c, f = self.config.in_channels, self.config.downsample_factor
        if images.ndim != 4 or images.shape[1] != c:
            raise UserError(f"expected images of shape (B, {c}, H, W), got {tuple(images.shape)}; "
                            f"this model takes {'RGB' if c == 3 else 'grayscale'} images")
        if images.shape[2] % f or images.shape[3] % f:
            raise UserError(f"image size {tuple(images.shape[2:])} is not divisible by the model's "
                            f"downsampling factor {f}; resize or crop to a multiple of {f}")

    # --------------------------------------------------------------------------- latent level
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> Z (B, h, w, n_z), channels last, after quant_conv."""
        self._check_images(images)
        z = self.quant_conv(self.encoder(images))  # (B, n_z, h, w)
        return z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, n_z)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """(B, h, w, n_z) (a quantized sum of code embeddings, or any latent) -> images (B, C, H, W)."""
        if z.ndim != 4 or z.shape[-1] != self.config.embed_dim:
            raise UserError(f"expected latents of shape (B, h, w, {self.config.embed_dim}), "
                            f"got {tuple(z.shape)}")
        z = z.to(self.post_quant_conv.weight.dtype)  # code embeddings are float32; the model may be cast
        # contiguous: the permuted view has channels-last strides, which would put every decoder convolution
        # and GroupNorm on its channels-last kernel (GroupNorm 3x slower there; measured on a CPU)
        return self.decoder(self.post_quant_conv(z.permute(0, 3, 1, 2).contiguous()))

    # ----------------------------------------------------------------------------- code level
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> codes (B, h, w, D) int64 (greedy residual quantization)."""
        return self.quantizer.encode(self.encode_latent(images))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """codes (B, h, w, d) -> images (B, C, H, W).  With `depth`, only the first `depth` codes of each
        position are used: X^(d) = G(sum_{i<=d} e(k_i)), the coarse-to-fine reconstructions of Fig. 5."""
        if codes.ndim != 4:
            raise UserError(f"expected codes of shape (B, h, w, D), got {tuple(codes.shape)}")
        if depth is not None:
            if not 1 <= depth <= codes.shape[-1]:
                raise UserError(f"depth {depth} is out of range; these codes have depth {codes.shape[-1]}")
            codes = codes[..., :depth]
        return self.decode_latent(self.quantizer.decode(codes))

    def forward(self, images: torch.Tensor) -> RQVAEOutput:
        """Training pass through the straight-through quantizer (EMA codebook updates in train mode)."""
        z = self.encode_latent(images)  # (B, h, w, n_z)
        q = self.quantizer(z)
        return RQVAEOutput(self.decode_latent(q.quantized), q.codes, q.commitment_loss)
