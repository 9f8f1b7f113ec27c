import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rqvae.cli import main
from rqvae.errors import UserError
from rqvae.models.vae import RQVAE
from rqvae.official.load import load_official
from rqvae.official.vae import convert_official_rqvae, rqvae_config_from_official
from tests.helpers.paths import OFFICIAL

SRC = OFFICIAL / "rqvae_tiny"
# The float64 model matches the official float32 outputs to 1e-5; in float32 our own rounding adds up to
# ~1e-5 more (measured: float32 vs float64 of the same weights differ by up to 1.0e-5), hence 3e-5 there.
TOL64 = dict(atol=1e-5, rtol=0.0)
TOL32 = dict(atol=3e-5, rtol=0.0)


@pytest.fixture(scope="module")
def io():
    return load_file(str(SRC / "io.safetensors"))


@pytest.fixture(scope="module")
def converted():
    state, arch = load_official(SRC)
    return convert_official_rqvae(state, arch)


def check_against_reference(model: RQVAE, io: dict[str, torch.Tensor]) -> None:
    dtype = model.quant_conv.weight.dtype
    TOL = TOL64 if dtype == torch.float64 else TOL32
    io = {k: v.to(dtype) if v.is_floating_point() else v for k, v in io.items()}
    x = io["images"]
    with torch.no_grad():
        z = model.encode_latent(x)
        torch.testing.assert_close(z, io["latent"], **TOL)
        assert torch.equal(model.encode(x), io["codes"])
        torch.testing.assert_close(model.decode(io["codes"]), io["decoded"], **TOL)
        for d in range(1, 5):
            torch.testing.assert_close(model.decode(io["codes"], depth=d), io[f"decoded_depth{d}"], **TOL)
        torch.testing.assert_close(model(x).reconstruction.to(dtype), io["recon_eval"], **TOL)
        probs, codes = model.quantizer.soft_codes(z, temperature=0.5, stochastic=False)
        torch.testing.assert_close(probs.to(dtype), io["soft_codes_t05"], **TOL)
        assert torch.equal(codes, io["codes"])


def test_config_mapping():
    _, arch = load_official(SRC)
    cfg = rqvae_config_from_official(arch)
    assert (cfg.image_size, cfg.in_channels, cfg.ch, cfg.ch_mult) == (32, 3, 32, (1, 1, 2))
    assert cfg.num_res_blocks == 1
    assert (cfg.z_channels, cfg.embed_dim, cfg.codebook_size, cfg.depth) == (32, 16, 64, 4)
    assert cfg.attn_resolutions == (8,) and cfg.shared_codebook and cfg.commitment_weight == 0.25


def test_per_depth_lists_of_one_value_map_to_numbers():
    _, arch = load_official(SRC)
    hp = {**arch["hparams"], "shared_codebook": False, "n_embed": [64] * 4, "decay": [0.9] * 4}
    cfg = rqvae_config_from_official({**arch, "hparams": hp})
    assert (cfg.codebook_size, cfg.ema_decay, cfg.shared_codebook) == (64, 0.9, False)
    assert cfg.codebook_sizes is None and cfg.decays is None


def test_per_depth_decays_convert_and_drive_each_depths_ema(tmp_path, io):
    """hparams.decay [0.9, 0.99, 0.95, 0.5] with shared_codebook false (the official RQBottleneck gives
    codebook d the decay decay[d]): converted, saved, loaded, and one training step of the quantizer moves
    depth d's EMA counts with decay[d]."""
    decays = [0.9, 0.99, 0.95, 0.5]
    src = _copy(tmp_path, lambda c: c["arch"]["hparams"].update(shared_codebook=False, decay=decays))
    assert main(["convert-official", str(src), str(tmp_path / "ours")]) == 0
    model = RQVAE.from_pretrained(tmp_path / "ours")
    assert model.config.decays == tuple(decays) and model.quantizer.book_decays == tuple(decays)
    q = model.quantizer
    q.restart_dead_codes = False
    latent = io["latent"].reshape(-1, 16)
    count0, codes = q.ema_count.clone(), q.encode(latent)
    q.train()(latent)
    for d, g in enumerate(decays):
        counts = torch.bincount(codes[:, d], minlength=64).float()
        torch.testing.assert_close(q.ema_count[d], g * count0[d] + (1 - g) * counts)


def test_converted_matches_official_outputs(converted, io):
    assert not converted.training
    assert converted.quantizer.codebook.shape == (1, 64, 16)  # padding row dropped
    check_against_reference(converted, io)
    state, arch = load_official(SRC)
    check_against_reference(convert_official_rqvae(state, arch).double(), io)


def test_cli_convert_then_load_roundtrip(converted, io, tmp_path, capsys):
    assert main(["convert-official", str(SRC), str(tmp_path / "ours")]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = RQVAE.from_pretrained(tmp_path / "ours").eval()
    assert loaded.config == converted.config
    for k, v in converted.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    check_against_reference(loaded, io)
    with torch.no_grad():
        assert torch.equal(loaded.decode(io["codes"]), converted.decode(io["codes"]))


def _copy(tmp_path: Path, edit=None) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(SRC, dst)
    if edit is not None:
        cfg = yaml.safe_load((dst / "config.yaml").read_text())
        edit(cfg)
        (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["arch"].update(type="vq-gan"), "arch.type 'vq-gan' is not supported"),
    (lambda c: c["arch"]["hparams"].update(loss_type="l1"), "loss_type='l1' is not supported"),
    (lambda c: c["arch"]["ddconfig"].update(double_z=True), "double_z=True is not supported"),
    (lambda c: c["arch"]["ddconfig"].update(fancy=1), "does not know: \\['ddconfig.fancy'\\]"),
    (lambda c: c["arch"]["hparams"].update(latent_shape=[4, 4, 64]), "regroup latent positions"),
    (lambda c: c["arch"]["hparams"].update(n_embed=32), "config expects \\(33, 16\\)"),
    (lambda c: c["arch"]["ddconfig"].update(ch=64), "does not match its config"),
    (lambda c: c["arch"]["hparams"].update(n_embed=[64, 64, 32, 32]),  # shared_codebook true
     "n_embed=\\[64, 64, 32, 32\\] differs between depths with shared_codebook true; the official code"),
    (lambda c: c["arch"]["hparams"].update(shared_codebook=False, n_embed=[64, 64, 64]), "3 sizes for 4"),
    (lambda c: c["arch"]["hparams"].update(decay=[0.9, 0.99, 0.99, 0.5]),  # shared_codebook true
     "decay=\\[0.9, 0.99, 0.99, 0.5\\] differs between depths with shared_codebook true; the official code"),
    (lambda c: c["arch"]["hparams"].update(shared_codebook=False, decay=[0.9, 0.5]), "2 values for 4 code"),
])
def test_bad_configs_exit_2(tmp_path, capsys, edit, message):
    src = _copy(tmp_path, edit)
    assert main(["convert-official", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("rqvae convert-official: error:")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_missing_files_and_pickled_objects(tmp_path, capsys):
    assert main(["convert-official", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    src = _copy(tmp_path)
    (src / "config.yaml").unlink()
    with pytest.raises(UserError, match="config.yaml is missing"):
        load_official(src)
    shutil.copy(SRC / "config.yaml", src / "config.yaml")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": Path("/tmp")}, src / "model.pt")
    with pytest.raises(UserError, match="refuses to unpickle"):
        load_official(src)
    with pytest.raises(UserError, match="no 'state_dict_ema'"):
        shutil.copy(SRC / "model.pt", src / "model.pt")
        load_official(src, weights="ema")


def test_prefers_ema_weights(tmp_path):
    src = _copy(tmp_path)
    ckpt = torch.load(SRC / "model.pt", weights_only=True)
    ema = {"module." + k: v + 1.0 if k == "quant_conv.bias" else v for k, v in ckpt["state_dict"].items()}
    torch.save({**ckpt, "state_dict_ema": ema}, src / "model.pt")
    state, _ = load_official(src)  # auto: EMA, with the "module." prefix removed
    torch.testing.assert_close(state["quant_conv.bias"], ckpt["state_dict"]["quant_conv.bias"] + 1.0)
    raw, _ = load_official(src, weights="raw")
    assert torch.equal(raw["quant_conv.bias"], ckpt["state_dict"]["quant_conv.bias"])

