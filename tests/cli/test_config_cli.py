"""Configs write the training commands: every field is a flag, old flag spellings work, ``--config`` loads
a whole config (explicit flags win), and a run's saved config reloads to an equal config."""

import argparse
import dataclasses
import json

import pytest

from rqvae.cli import main
from rqvae.cli.main import build_parser
from rqvae.config import config_from_args, flag_name, load_config, save_config
from rqvae.errors import UserError
from rqvae.models.transformer import AR_PRESETS
from rqvae.models.vae import VAE_PRESETS
from rqvae.train.ar import TrainARConfig
from rqvae.train.classifier import TrainClassifierConfig
from rqvae.train.vae import TrainVAEConfig

COMMANDS = {"train-vae": TrainVAEConfig, "train-ar": TrainARConfig, "train-classifier": TrainClassifierConfig}


def _sub(command):
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices[command]


def _parse(command, argv):
    parser, _ = _sub(command)
    return config_from_args(COMMANDS[command], parser.parse_args([command, *argv]))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_field_has_a_flag(command):
    _, sub = _sub(command)
    flags = {s for a in sub._actions for s in a.option_strings}
    for f in dataclasses.fields(COMMANDS[command]):
        assert flag_name(f) in flags, f.name
        if f.type in (bool, "bool"):
            assert "--no-" + flag_name(f)[2:] in flags, f.name
        assert f.metadata.get("help"), f"{f.name} has no help text"
    assert "--config" in flags


def test_old_flags_keep_working():
    vae = _parse("train-vae", ["--data", "d", "--out", "o", "--bf16", "--augment", "--resume", "--ema", "0.9",
                               "--no-progress", "--no-tensorboard", "--model-config", '{"ch": 16}',
                               "--betas", "0.4", "0.8", "--channels", "1"])
    assert vae.bf16 and vae.augment and vae.resume and vae.ema_decay == 0.9 and vae.run_dir == "o"
    assert not vae.progress and not vae.tensorboard and vae.model == {"ch": 16} and vae.betas == (0.4, 0.8)
    ar = _parse("train-ar", ["--vae", "v", "--data", "d", "--out", "o", "--no-bf16", "--no-soft-labels",
                             "--no-stochastic", "--flip", "--cond", "text", "--stop-after", "3"])
    assert not ar.bf16 and not ar.soft_labels and not ar.stochastic and ar.flip and ar.cond == "text"
    assert ar.stop_after == 3 and ar.betas == (0.9, 0.95)  # a default the dataclass holds
    clf = _parse("train-classifier", ["--data", "d", "--out", "o", "--no-flip", "--width", "4"])
    assert not clf.flip and clf.width == 4 and clf.steps == 2000


def test_bf16_is_off_by_default_for_both_stages():
    assert _parse("train-vae", ["--data", "d", "--out", "o"]).bf16 is False
    assert _parse("train-ar", ["--vae", "v", "--data", "d", "--out", "o"]).bf16 is False


def test_config_file_then_explicit_flags(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"data": "fmnist", "run_dir": "runs/x", "steps": 7, "batch_size": 3,
                                "betas": [0.1, 0.2], "model": {"ch": 8}}))
    cfg = _parse("train-vae", ["--config", str(path), "--steps", "9", "--no-tensorboard"])
    assert (cfg.steps, cfg.batch_size, cfg.betas, cfg.model, cfg.tensorboard) == (9, 3, (0.1, 0.2), {"ch": 8},
                                                                                 False)
    assert cfg.data == "fmnist" and cfg.run_dir == "runs/x"
    path.write_text(json.dumps({"data": "fmnist", "run_dir": "r", "stepz": 1}))
    with pytest.raises(UserError, match="stepz"):
        _parse("train-vae", ["--config", str(path)])
    with pytest.raises(UserError, match="missing --data"):
        _parse("train-vae", ["--out", "o"])


@pytest.mark.parametrize("command", list(COMMANDS))
def test_saved_config_reloads_equal(tmp_path, command):
    cls = COMMANDS[command]
    required = {f.name: "x" for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    cfg = cls(**required, steps=5, stop_after=2, seed=3, progress=False)
    if hasattr(cfg, "betas"):
        cfg = dataclasses.replace(cfg, betas=(0.3, 0.7))
    if hasattr(cfg, "model"):
        cfg = dataclasses.replace(cfg, model={"ch": 8, "ch_mult": [1, 2]})
    save_config(cfg, tmp_path / "train_config.json")
    back = load_config(cls, tmp_path / "train_config.json")
    assert back == cfg
    assert _parse(command, ["--config", str(tmp_path / "train_config.json")]) == cfg


def test_preset_help_lists_the_presets_and_unknown_ones_are_refused_first(tmp_path, capsys):
    _, vae = _sub("train-vae")
    _, ar = _sub("train-ar")
    vae_help, ar_help = vae.format_help(), ar.format_help()
    assert all(name in vae_help for name in VAE_PRESETS)
    assert all(name in ar_help for name in AR_PRESETS)
    cache = tmp_path / "cache"
    rc = main(["train-ar", "--vae", str(tmp_path / "no-vae"), "--data", "fmnist", "--out",
               str(tmp_path / "o"), "--preset", "nope", "--feature-cache", str(cache)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown RQ-Transformer preset 'nope'" in err and "no-vae" not in err
    assert not cache.exists() and not (tmp_path / "o").exists()
