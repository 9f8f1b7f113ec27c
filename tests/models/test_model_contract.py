"""The contract every saveable model keeps (the idea of diffusers' ModelTesterMixin), checked for EVERY
:class:`PretrainedMixin` subclass found by walking ``rqvae.models``: a new model is covered automatically
and fails here until it has an entry in EXAMPLES (a small instance and an input for its forward pass)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
from collections.abc import Callable
from typing import Any

import pytest
import torch

import rqvae.models
from rqvae.errors import UserError
from rqvae.models.classifier import Classifier, ClassifierConfig
from rqvae.models.hub import CONFIG_NAME, WEIGHTS_NAME, PretrainedMixin, config_from_dict, config_to_dict
from rqvae.models.transformer import AR_PRESETS, RQTransformer
from rqvae.models.vae import RQVAE, VAE_PRESETS, RQVAEConfig


def pretrained_classes() -> list[type]:
    found = set()
    for info in pkgutil.walk_packages(rqvae.models.__path__, "rqvae.models."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            own = obj.__module__ == info.name  # defined here, not imported
            if own and issubclass(obj, PretrainedMixin) and obj is not PretrainedMixin:
                found.add(obj)
    return sorted(found, key=lambda c: c.__name__)


def _rqtransformer() -> tuple[torch.nn.Module, tuple]:
    cfg = AR_PRESETS["tiny"]
    model = RQTransformer(cfg, codebook=torch.randn(cfg.vocab_size, cfg.embed_dim))
    codes = torch.randint(0, cfg.vocab_size, (2, *cfg.code_shape))
    return model, (codes, torch.tensor([1, 7]))


def _rqvae() -> tuple[torch.nn.Module, tuple]:
    cfg = RQVAEConfig(**{**VAE_PRESETS["tiny"], "ch": 8, "z_channels": 8, "codebook_size": 16})
    return RQVAE(cfg), (torch.rand(2, cfg.in_channels, cfg.image_size, cfg.image_size) * 2 - 1,)


def _classifier() -> tuple[torch.nn.Module, tuple]:
    cfg = ClassifierConfig(width=8, class_names=tuple("abcdefghij"))
    return Classifier(cfg), (torch.rand(2, 1, 32, 32),)


# model class -> a builder of (small instance with non-trivial weights, example input of its forward)
EXAMPLES: dict[type, Callable[[], tuple[torch.nn.Module, tuple]]] = {
    RQTransformer: _rqtransformer, RQVAE: _rqvae, Classifier: _classifier}
CLASSES = pretrained_classes()


def build(cls: type) -> tuple[torch.nn.Module, tuple]:
    if cls not in EXAMPLES:
        pytest.fail(f"{cls.__module__}.{cls.__name__} is a PretrainedMixin without an entry in EXAMPLES of "
                    "tests/models/test_model_contract.py; add a small instance and an input for it")
    torch.manual_seed(0)
    model, inputs = EXAMPLES[cls]()
    with torch.no_grad():  # perturb every float tensor, so a tensor lost in the round trip shows
        for t in model.state_dict().values():
            if t.dtype.is_floating_point:
                t.add_(torch.randn_like(t) * 0.01)
    return model.eval(), inputs


def tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (a tensor, a tuple/list, a dict or a dataclass)."""
    if torch.is_tensor(out):
        return [out]
    if dataclasses.is_dataclass(out):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    elif isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in tensors(o)]
    return []


def test_every_model_is_found():
    assert {RQTransformer, RQVAE, Classifier} <= set(CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_round_trip_gives_identical_state_and_outputs(cls, tmp_path):
    model, inputs = build(cls)
    model.save_pretrained(tmp_path / "m")
    loaded = cls.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is cls and loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with torch.no_grad():
        out_a, out_b = tensors(model(*inputs)), tensors(loaded(*inputs))
    assert out_a and len(out_a) == len(out_b)
    for x, y in zip(out_a, out_b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_config_json_names_the_model_type(cls, tmp_path):
    model, _ = build(cls)
    model.save_pretrained(tmp_path / "m")
    data = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert data.pop("model_type") == cls.model_type
    assert config_from_dict(cls.config_class, data) == model.config


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_loading_with_the_wrong_class_is_a_one_line_user_error(cls, tmp_path):
    build(cls)[0].save_pretrained(tmp_path / "m")
    others = [o for o in CLASSES if o.model_type != cls.model_type]
    assert others
    for other in others:
        with pytest.raises(UserError, match=f"holds a '{cls.model_type}' model") as e:
            other.from_pretrained(tmp_path / "m")
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_missing_or_corrupt_weights_are_user_errors(cls, damage, tmp_path):
    build(cls)[0].save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_NAME
    if damage == "missing":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="missing" if damage == "missing" else "corrupt") as e:
        cls.from_pretrained(tmp_path / "m")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_config_is_a_dataclass_that_round_trips_through_json(cls):
    config = build(cls)[0].config
    assert dataclasses.is_dataclass(config) and type(config) is cls.config_class
    text = json.dumps(config_to_dict(config))
    again = config_from_dict(cls.config_class, json.loads(text))
    assert again == config and type(again) is type(config)
    assert cls.config_class(**dataclasses.asdict(config)) == config  # every field a keyword
    with pytest.raises(UserError, match="unknown fields"):
        config_from_dict(cls.config_class, {**json.loads(text), "no_such_field": 1})
