import json

import pytest
import torch

from rqvae.errors import UserError
from rqvae.models.vae import RQVAE, VAE_PRESETS, RQVAEConfig, RQVAEOutput

SMALL = dict(image_size=16, in_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
             z_channels=16, embed_dim=8, codebook_size=32, depth=3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RQVAE(RQVAEConfig(**SMALL)).eval()


def test_shapes_and_partial_depth(model):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = model.encode_latent(x)
    assert z.shape == (2, 8, 8, 8)
    codes = model.encode(x)
    assert codes.shape == (2, 8, 8, 3) and codes.dtype == torch.int64
    assert model.code_shape() == (8, 8, 3) and model.code_shape(32) == (16, 16, 3)
    full = model.decode(codes)
    assert full.shape == x.shape
    torch.testing.assert_close(full, model.decode_latent(model.quantizer.decode(codes)))
    for d in (1, 2):
        part = model.decode(codes, depth=d)
        torch.testing.assert_close(part, model.decode_latent(model.quantizer.decode(codes[..., :d])))
        assert not torch.allclose(part, full)
    # eval forward = decode(encode) (straight-through value equals the quantized sum)
    out = model(x)
    assert isinstance(out, RQVAEOutput) and torch.equal(out.codes, codes)
    torch.testing.assert_close(out.reconstruction, full, atol=1e-5, rtol=1e-5)
    assert out.commitment_loss.ndim == 0 and out.commitment_loss > 0
    assert model.last_layer_weight is model.decoder.conv_out.weight


def test_input_validation(model):
    with pytest.raises(UserError, match="RGB"):
        model.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(UserError, match="not divisible"):
        model.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(UserError, match="codebook size|lie in"):
        model.decode(torch.full((1, 8, 8, 3), 32))
    with pytest.raises(UserError, match="depth 4 is out of range"):
        model.decode(torch.zeros(1, 8, 8, 3, dtype=torch.long), depth=4)
    with pytest.raises(UserError, match="latents of shape"):
        model.decode_latent(torch.zeros(1, 8, 8, 5))
    with pytest.raises(UserError, match="unknown RQ-VAE preset"):
        RQVAE.from_preset("nope")
    with pytest.raises(UserError, match="not divisible"):
        RQVAEConfig(**{**SMALL, "image_size": 17})


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    m = RQVAE(RQVAEConfig(**SMALL)).train()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        out = m(x)
        loss = (out.reconstruction - x).pow(2).mean() + m.config.commitment_weight * out.commitment_loss
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    # straight-through: the encoder gets gradients from the reconstruction loss
    assert m.encoder.conv_in.weight.grad is not None and m.encoder.conv_in.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in m.quantizer.buffers())
    assert losses[-1] < 0.7 * losses[0]


def test_save_and_load_roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    m2 = RQVAE.from_pretrained(tmp_path / "m").eval()
    assert m2.config == model.config
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(model.encode(x), m2.encode(x))
    assert torch.equal(model.decode(model.encode(x)), m2.decode(model.encode(x)))


def test_per_depth_decays_round_trip_and_older_configs_load(tmp_path):
    """decays (one EMA decay per depth's codebook) survive config.json; a config.json written before the
    field existed loads with decays None, i.e. ema_decay for every codebook."""
    m = RQVAE(RQVAEConfig(**SMALL, shared_codebook=False, decays=[0.9, 0.5, 0.99]))
    assert m.config.decays == (0.9, 0.5, 0.99) and m.quantizer.book_decays == (0.9, 0.5, 0.99)
    m.save_pretrained(tmp_path / "m")
    assert RQVAE.from_pretrained(tmp_path / "m").quantizer.book_decays == (0.9, 0.5, 0.99)
    RQVAE(RQVAEConfig(**SMALL, ema_decay=0.95)).save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    del cfg["decays"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    old = RQVAE.from_pretrained(tmp_path / "old")
    assert old.config.decays is None and old.quantizer.book_decays == (0.95,)
    with pytest.raises(UserError, match="set shared_codebook false"):
        RQVAE(RQVAEConfig(**SMALL, decays=(0.9, 0.5, 0.99)))


@pytest.mark.parametrize("name,encoder,decoder,total", [
    ("imagenet256-8x8x4", 41.1e6, 59.0e6, 104.4e6),
    ("ffhq256-8x8x4", 41.1e6, 59.0e6, 100.7e6),
])
def test_paper_preset_sizes(name, encoder, decoder, total):
    with torch.device("meta"):
        m = RQVAE.from_preset(name)
    n_enc = sum(p.numel() for p in m.encoder.parameters())
    n_dec = sum(p.numel() for p in m.decoder.parameters())
    # the paper's count includes the official codebook tensor of K + 1 rows (a padding row)
    n_all = sum(p.numel() for p in m.parameters()) + (m.config.codebook_size + 1) * m.config.embed_dim
    assert abs(n_enc - encoder) < 0.05e6 and abs(n_dec - decoder) < 0.05e6
    assert abs(n_all - total) < 0.05e6
    assert m.code_shape() == (8, 8, 4)


def test_small_presets_are_small():
    for name in ("fmnist32-8x8x4", "tiny"):
        with torch.device("meta"):
            m = RQVAE.from_preset(name)
        n = sum(p.numel() for p in m.parameters())
        assert 0.3e6 < n < 3e6
        assert m.code_shape() == (8, 8, 4)
    assert VAE_PRESETS["fmnist32-8x8x4"]["in_channels"] == 1


def test_decoder_runs_in_the_standard_memory_layout():
    """Latents arrive channels-last (B, h, w, n_z); the decoder must still see NCHW-contiguous tensors, else
    every convolution and GroupNorm takes its channels-last kernel (GroupNorm measured 3x slower on a CPU)."""
    model = RQVAE(RQVAEConfig(**VAE_PRESETS["tiny"]))
    layouts = []
    for m in model.decoder.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.register_forward_hook(lambda mod, inp, out: layouts.append(inp[0].is_contiguous()))
    model(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert layouts and all(layouts)
