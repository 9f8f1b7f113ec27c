import dataclasses
import json

import pytest
import torch

from rqvae.errors import UserError
from rqvae.models.hub import PretrainedMixin


@dataclasses.dataclass
class TinyConfig:
    width: int = 4
    sizes: tuple[int, ...] = (1, 2)


class Tiny(torch.nn.Module, PretrainedMixin):
    config_class = TinyConfig
    model_type = "tiny"

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.lin = torch.nn.Linear(config.width, 2)
        self.register_buffer("stat", torch.arange(3.0))


def test_roundtrip(tmp_path):
    m = Tiny(TinyConfig(width=5, sizes=(3, 4)))
    m.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "tiny"
    m2 = Tiny.from_pretrained(tmp_path / "m")
    assert m2.config == m.config
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])


def test_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a model folder"):
        Tiny.from_pretrained(tmp_path / "nope")
    Tiny(TinyConfig()).save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["width"] = 7
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="does not match its config"):
        Tiny.from_pretrained(tmp_path / "m")
    cfg["model_type"] = "other"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="holds a 'other' model"):
        Tiny.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    cfg["model_type"] = "tiny"
    cfg["width"] = 4
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="corrupt"):
        Tiny.from_pretrained(tmp_path / "m")
