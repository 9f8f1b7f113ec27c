"""Official RQ-Transformer checkpoints (tests/data/official) -> RQTransformer, checked against the
official logits computed from the same weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rqvae.errors import UserError
from rqvae.models.transformer import RQTransformer
from rqvae.official.load import load_official
from rqvae.official.transformer import (
    convert_official_rqtransformer,
    convert_official_rqtransformer_dir,
    load_codebook,
)
from rqvae.official.vae import convert_official_rqvae
from tests.helpers.paths import OFFICIAL

VAE = OFFICIAL / "rqvae_tiny"


@pytest.fixture(scope="module")
def codebook() -> torch.Tensor:
    return load_codebook(VAE)  # (K, n_z), the padding row dropped


@pytest.mark.parametrize("kind", ["class", "uncond", "text"])
def test_converted_logits_match_official(kind, codebook):
    state, arch = load_official(OFFICIAL / f"rqtransformer_{kind}_tiny")
    model = convert_official_rqtransformer(state, arch, codebook)
    assert model.config.cond_type == kind and not model.training
    io = load_file(str(OFFICIAL / f"rqtransformer_{kind}_tiny" / "io.safetensors"))
    B, H, W, D = io["codes"].shape
    with torch.no_grad():
        out = model(io["codes"], io["cond"], return_cond_logits=kind == "text")
    logits, cond_logits = out if kind == "text" else (out, None)
    torch.testing.assert_close(logits.view(B, H, W, D, -1), io["logits"], atol=1e-5, rtol=0)
    if kind == "text":
        torch.testing.assert_close(cond_logits, io["cond_logits"], atol=1e-5, rtol=0)


def test_separate_depth_head_count_matches_official(codebook):
    """head.block.n_head 2 under body.block.n_head 4, and 3 + 2 layers: the official logits to 1e-5."""
    folder = OFFICIAL / "rqtransformer_class_heads_tiny"
    model = convert_official_rqtransformer(*load_official(folder), codebook)
    c = model.config
    assert (c.n_heads, c.depth_heads, c.n_spatial_layers, c.n_depth_layers) == (4, 2, 3, 2)
    io = load_file(str(folder / "io.safetensors"))
    with torch.no_grad():
        logits = model(io["codes"], io["cond"])
        greedy = [model.generate(io["cond"], top_k=1, dtype=torch.float32, impl=impl)
                  for impl in ("reference", "fast")]
    torch.testing.assert_close(logits.view(io["logits"].shape), io["logits"], atol=1e-5, rtol=0)
    assert torch.equal(greedy[0], greedy[1])


def test_codebook_is_the_vaes_without_padding(codebook):
    raw = torch.load(VAE / "model.pt", weights_only=True)["state_dict"]["quantizer.codebooks.0.weight"]
    assert codebook.shape == (64, 16) and torch.equal(codebook, raw[:-1])


def test_convert_dir_and_roundtrip_through_our_format(tmp_path, codebook):
    model = convert_official_rqtransformer_dir(OFFICIAL / "rqtransformer_class_tiny", VAE)
    model.save_pretrained(tmp_path / "ar")
    loaded = RQTransformer.from_pretrained(tmp_path / "ar").eval()
    io = load_file(str(OFFICIAL / "rqtransformer_class_tiny" / "io.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(io["codes"], io["cond"]).flatten(), io["logits"].flatten(),
                                   atol=1e-5, rtol=0)
    # the codebook of our own converted RQ-VAE folder works the same way
    convert_official_rqvae(*load_official(VAE)).save_pretrained(tmp_path / "vae")
    assert torch.equal(load_codebook(tmp_path / "vae"), codebook)


def test_conversion_errors(codebook):
    state, arch = load_official(OFFICIAL / "rqtransformer_class_tiny")
    with pytest.raises(UserError, match="--vae"):
        convert_official_rqtransformer(state, arch, None)
    with pytest.raises(UserError, match="codes"):
        convert_official_rqtransformer(state, arch, codebook[:10])
    wider = {**arch, "head": {**arch["head"], "block": {**arch["head"]["block"], "embed_dim": 128}}}
    with pytest.raises(UserError, match="head.block.embed_dim=128"):  # the official model cannot run it
        convert_official_rqtransformer(state, wider, codebook)
    with pytest.raises(UserError, match="gelu='v3'"):
        convert_official_rqtransformer(state, {**arch, "body": {**arch["body"], "block": {
            **arch["body"]["block"], "gelu": "v3"}}}, codebook)
    with pytest.raises(UserError, match="rq-transformer"):
        convert_official_rqtransformer(state, {**arch, "type": "rq-vae"}, codebook)
    broken = dict(state)
    broken.pop("head_mlp.bias")
    with pytest.raises(UserError, match="missing"):
        convert_official_rqtransformer(broken, arch, codebook)


def test_cli_converts_both_stages_and_needs_vae_for_stage2(tmp_path, capsys):
    from rqvae.cli import main

    assert main(["convert-official", str(VAE), str(tmp_path / "vae")]) == 0
    assert main(["convert-official", str(OFFICIAL / "rqtransformer_text_tiny"), str(tmp_path / "ar")]) == 2
    assert "--vae" in capsys.readouterr().err
    assert main(["convert-official", str(OFFICIAL / "rqtransformer_text_tiny"), str(tmp_path / "ar"),
                 "--vae", str(tmp_path / "vae")]) == 0
    model = RQTransformer.from_pretrained(tmp_path / "ar").eval()
    io = load_file(str(OFFICIAL / "rqtransformer_text_tiny" / "io.safetensors"))
    B, H, W, D = io["codes"].shape
    with torch.no_grad():
        logits, cond_logits = model(io["codes"], io["cond"], return_cond_logits=True)
    torch.testing.assert_close(logits.view(B, H, W, D, -1), io["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(cond_logits, io["cond_logits"], atol=1e-5, rtol=0)
