"""The learned codec: bit-exact round trips, payload size vs the model's NLL, damaged files, wrong models."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from rqvae.cli import main
from rqvae.codec import format as rqv
from rqvae.codec.codec import compress_codes, decode_image, decompress_codes, most_likely_class
from rqvae.data.images import load_images, save_image
from rqvae.errors import UserError
from rqvae.models.transformer import AR_PRESETS, RQTransformer
from rqvae.models.vae import RQVAE


def _vae(seed: int = 0) -> RQVAE:
    torch.manual_seed(seed)
    return RQVAE.from_preset("tiny").eval()


def _prior(vae: RQVAE, cond_type: str, seed: int = 1) -> RQTransformer:
    torch.manual_seed(seed)
    extra = {"text": dict(text_vocab_size=50, cond_len=5), "class": dict(num_classes=3),
             "uncond": {}}[cond_type]
    cfg = dataclasses.replace(AR_PRESETS["tiny"], code_shape=vae.code_shape(),
                              vocab_size=vae.config.codebook_size, embed_dim=vae.config.embed_dim,
                              cond_type=cond_type, **extra)
    model = RQTransformer(cfg, codebook=vae.quantizer.codebook[0])
    with torch.no_grad():  # sharper than the initialisation, so that the prior is far from uniform
        model.head.linear.weight.mul_(30.0)
    return model.eval()


COND = {"uncond": (), "class": (2,), "text": (3, 7, 1, 0, 0)}


@pytest.fixture(scope="module")
def vae():
    return _vae()


@pytest.fixture(scope="module")
def codes(vae):
    torch.manual_seed(5)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        return vae.encode(x)[0]  # (h, w, D)


@pytest.mark.parametrize("cond_type", [None, "uncond", "class", "text"])
def test_round_trip_is_bit_exact_at_every_depth(vae, codes, cond_type):
    prior = None if cond_type is None else _prior(vae, cond_type)
    cond = () if cond_type is None else COND[cond_type]
    for d in range(1, vae.config.depth + 1):
        c = compress_codes(codes, vae, prior, cond=cond, depth=d)
        out, header = decompress_codes(c.data, vae, prior)
        assert np.array_equal(out, codes[..., :d].numpy()), (cond_type, d)
        assert header.depth == d and header.cond == cond
        # the payload is the model's NLL up to 1% and the range coder's final two 32-bit words
        assert c.header.payload_len <= c.nll_bits / 8 * 1.01 + 8
        assert c.header.payload_len >= c.nll_bits / 8 * 0.99 - 1


def test_payload_tracks_nll_and_depth(vae, codes):
    prior = _prior(vae, "class")
    sizes = [compress_codes(codes, vae, prior, cond=(1,), depth=d) for d in range(1, 5)]
    assert [s.header.payload_len for s in sizes] == sorted(s.header.payload_len for s in sizes)
    assert sizes[-1].header.payload_len > sizes[0].header.payload_len


def test_most_likely_class_minimises_the_size(vae, codes):
    prior = _prior(vae, "class")
    best = most_likely_class(codes, prior, depth=4)
    bits = [compress_codes(codes, vae, prior, cond=(k,)).nll_bits for k in range(3)]
    assert best == int(np.argmin(bits))


def test_damaged_foreign_and_mismatched_files_are_user_errors(vae, codes):
    prior = _prior(vae, "class")
    data = compress_codes(codes, vae, prior, cond=(0,)).data
    header_len = len(data) - rqv.unpack(data)[1].__len__()
    flipped = bytearray(data)
    flipped[header_len + 2] ^= 0x5A  # a payload byte
    cases = {
        "checksum|damaged": bytes(flipped),
        "truncated": data[:-3],
        "not an .rqv": b"\x89PNG\r\n\x1a\n" + data[8:],
        "corrupt header": data[:20] + bytes([data[20] ^ 1]) + data[21:],
    }
    for message, bad in cases.items():
        with pytest.raises(UserError, match=message):
            decompress_codes(bad, vae, prior)
    with pytest.raises(UserError, match="another RQ-VAE"):
        decompress_codes(data, _vae(seed=9), prior)
    with pytest.raises(UserError, match="another RQ-Transformer"):
        decompress_codes(data, vae, _prior(vae, "class", seed=7))
    with pytest.raises(UserError, match="--prior"):
        decompress_codes(data, vae, None)
    with pytest.raises(UserError, match="depth"):
        compress_codes(codes, vae, prior, cond=(0,), depth=5)


def test_prior_of_another_tokenizer_is_refused(vae, codes):
    other = _prior(_vae(seed=3), "uncond")
    with pytest.raises(UserError, match="codebook differs"):
        compress_codes(codes, vae, other)


def _png(path, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_cli_compress_decompress(tmp_path, vae, capsys):
    vae.save_pretrained(tmp_path / "vae")
    prior = _prior(vae, "class")
    prior.save_pretrained(tmp_path / "prior")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _png(imgs / "a.png")
    _png(imgs / "big.png", size=(3000, 2000), seed=1)  # a large input is resized like any other
    for d, prior_args in [(2, ["--prior", str(tmp_path / "prior")]), (4, [])]:
        out, rec = tmp_path / f"rqv{d}", tmp_path / f"png{d}"
        assert main(["compress", str(imgs), "--vae", str(tmp_path / "vae"), *prior_args, "--depth", str(d),
                     "-o", str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["a.rqv", "big.rqv"]
        assert main(["decompress", str(out), "--vae", str(tmp_path / "vae"), *prior_args,
                     "-o", str(rec)]) == 0
        x = load_images([imgs / "a.png"], 3, 32)
        with torch.no_grad():
            want = decode_image(vae, vae.encode(x)[0][..., :d].numpy())
        save_image(want, tmp_path / "want.png")
        got = np.asarray(Image.open(rec / "a.png"))
        assert np.array_equal(got, np.asarray(Image.open(tmp_path / "want.png")))


def test_cli_errors_are_one_line(tmp_path, vae, capsys):
    vae.save_pretrained(tmp_path / "vae")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compress", str(empty), "--vae", str(tmp_path / "vae"), "-o", str(tmp_path / "o")]) == 2
    (tmp_path / "zero.png").write_bytes(b"")
    assert main(["compress", str(tmp_path / "zero.png"), "--vae", str(tmp_path / "vae"),
                 "-o", str(tmp_path / "o")]) == 2
    (tmp_path / "bad.rqv").write_bytes(b"hello")
    assert main(["decompress", str(tmp_path / "bad.rqv"), "--vae", str(tmp_path / "vae"),
                 "-o", str(tmp_path / "o")]) == 2
    _png(tmp_path / "ok.png")
    assert main(["compress", str(tmp_path / "ok.png"), "--vae", str(tmp_path / "vae"), "--class", "1",
                 "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("rqvae ") and "error:" in line for line in err)
