"""LPIPS-VGG16 perceptual distance (Zhang et al., 2018), the perceptual loss of VQGAN / RQ-VAE.

    d(x, y) = sum_l  1/(H_l W_l) sum_{h,w} || w_l * (f_l(x)_{hw} - f_l(y)_{hw}) ||^2

where ``f_l`` are the channel-unit-normalised activations of VGG16 at relu1_2, relu2_2, relu3_3,
relu4_3 and relu5_3 of the inputs shifted and scaled by LPIPS's ``ScalingLayer``, and ``w_l`` the
non-negative per-channel weights of LPIPS's linear heads.

Nothing is downloaded. The user gives two local files:
- VGG16 weights with torchvision's key names (``features.0.weight`` ... ``features.28.bias``; any
  ``classifier.*`` keys are ignored), as ``.safetensors`` or a ``.pt``/``.pth`` state dict read with
  ``torch.load(weights_only=True)``;
- LPIPS linear heads as the ``lpips`` package ships them (``vgg.pth``: ``lin0.model.1.weight`` ...
  ``lin4.model.1.weight``, each (1, C, 1, 1)), same formats.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from rqvae.errors import UserError

# torchvision vgg16().features: conv indices and where LPIPS taps the five ReLU outputs.
_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # index of the ReLU after conv1_2, conv2_2, conv3_3, conv4_3, conv5_3
_CHANNELS = (64, 128, 256, 512, 512)


def _build_vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_ch, int(v), 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = int(v)
    return nn.Sequential(*layers)  # indices 0..29 match torchvision's vgg16().features[:30]


class _LinearHead(nn.Module):
    """LPIPS ``NetLinLayer``: dropout (index 0, identity at eval) + 1x1 conv without bias (index 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; pass the path of a local weights file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or a pickle with objects torch refuses to load
        raise UserError(f"{what} file {path} could not be read as a state dict ({type(e).__name__}); "
                        "give a .safetensors or a weights-only .pt/.pth file") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what} file {path} does not hold a flat state dict of tensors")
    return state


class LPIPS(nn.Module):
    """LPIPS-VGG16. ``forward(x, y)`` with (B, C, H, W) images in [-1, 1] (C = 1 or 3) -> (B,) distances.

    Frozen: its parameters never require gradients, but gradients flow to the inputs.
    """

    # LPIPS ScalingLayer constants: (x - shift) / scale maps [-1, 1] inputs to ImageNet-normalised ones.
    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.features = _build_vgg16_features()
        self.lins = nn.ModuleList(_LinearHead(c) for c in _CHANNELS)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, vgg_path: str | os.PathLike, heads_path: str | os.PathLike) -> LPIPS:
        """Load VGG16 (torchvision key names) and the LPIPS heads (``lin{i}.model.1.weight``)."""
        model = cls()
        vgg = _read_state_dict(vgg_path, "VGG16 weights")
        own = {f"features.{k}": v for k, v in model.features.state_dict().items()}
        missing = sorted(set(own) - set(vgg))
        if missing:
            raise UserError(f"VGG16 weights file {vgg_path} lacks {missing[:2]}...; expected torchvision "
                            "vgg16 key names (features.0.weight ... features.28.bias)")
        wrong = [k for k in own if vgg[k].shape != own[k].shape]
        if wrong:
            k = wrong[0]
            raise UserError(f"VGG16 weights file {vgg_path}: {k} has shape {tuple(vgg[k].shape)}, expected "
                            f"{tuple(own[k].shape)}; is it a VGG16 (not VGG11/19 or BN) file?")
        model.features.load_state_dict({k[len("features."):]: vgg[k].float() for k in own})
        heads = _read_state_dict(heads_path, "LPIPS heads")
        for i, (lin, c) in enumerate(zip(model.lins, _CHANNELS)):
            key = f"lin{i}.model.1.weight"
            if key not in heads:
                raise UserError(f"LPIPS heads file {heads_path} lacks {key}; expected the lpips package's "
                                "vgg.pth (lin0.model.1.weight ... lin4.model.1.weight)")
            if heads[key].shape != (1, c, 1, 1):
                raise UserError(f"LPIPS heads file {heads_path}: {key} has shape {tuple(heads[key].shape)}, "
                                f"expected (1, {c}, 1, 1); is it the VGG variant of the heads?")
            lin.model[1].weight.data.copy_(heads[key].float())
        return model

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always frozen, no dropout

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x)
                if i == _TAPS[-1]:
                    break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS expects two (B, 1|3, H, W) images of the same shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[1] == 1:  # grayscale: the same image in all three channels
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        n = x.shape[0]
        both = (torch.cat([x, y]) - self.shift) / self.scale  # (2B, 3, H, W)
        total = torch.zeros(n, device=x.device, dtype=torch.float32)
        for feat, lin in zip(self._taps(both), self.lins):
            feat = feat.float()
            feat = feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length per position
            fx, fy = feat[:n], feat[n:]
            total = total + lin((fx - fy).pow(2)).mean(dim=(1, 2, 3))  # spatial average of w_l . diff^2
        return total  # (B,)
