"""Files from elsewhere must not run code: a crafted pickle is refused, and our own files hold no pickle."""

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from rqvae.errors import UserError
from rqvae.models.hub import load_torch_file_safely
from rqvae.train.checkpoint import save_checkpoint
from tests.helpers.paths import OFFICIAL


class _Payload:
    """Unpickling this calls os.system, which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _craft(path: Path, marker: Path, legacy: bool = False) -> None:
    obj = {"epoch": 0, "state_dict": {"w": torch.zeros(2)}, "hook": _Payload(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize("legacy", [False, True])
def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path, legacy):
    evil, marker = tmp_path / "model.pt", tmp_path / "pwned"
    _craft(evil, marker, legacy)
    # control: an ordinary unpickler does run the payload (it only creates the marker file)
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UserError, match="refuses to unpickle arbitrary objects"):
        load_torch_file_safely(evil)
    assert not marker.exists()


def test_official_reader_refuses_crafted_pickle(tmp_path):
    official = pytest.importorskip("rqvae.official.load")
    src, marker = tmp_path / "ckpt", tmp_path / "pwned"
    src.mkdir()
    shutil.copy(OFFICIAL / "rqvae_tiny" / "config.yaml", src / "config.yaml")
    _craft(src / "model.pt", marker)
    with pytest.raises(UserError, match="refuses to unpickle"):
        official.load_official(src)
    assert not marker.exists()
    state, arch = official.load_official(OFFICIAL / "rqvae_tiny")  # the real fixture still loads
    assert state and arch["type"] == "rq-vae"


def test_safe_reader_accepts_tensors_and_reports_bad_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(2)}}, good)
    assert torch.equal(load_torch_file_safely(good)["state_dict"]["w"], torch.ones(2))
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:100])
    with pytest.raises(UserError, match="not a readable torch checkpoint"):
        load_torch_file_safely(tmp_path / "cut.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_torch_file_safely(tmp_path / "none.pt")


def _is_safetensors(data: bytes) -> bool:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return isinstance(header, dict) and data[8:9] == b"{"


def test_our_checkpoints_contain_no_pickle(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    sched.step()
    out = save_checkpoint(tmp_path, 5, {"model": model}, {"opt": opt}, {"sched": sched}, extra={"a": (1, 2)})
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"modules.safetensors", "optim.safetensors", "state.json", "latest"}
    for p in files:
        data = p.read_bytes()
        assert not data.startswith(b"PK") and not data.startswith(b"\x80"), p  # no torch.save zip, no pickle
        if p.suffix == ".safetensors":
            assert _is_safetensors(data), p
        elif p.name == "state.json":
            json.loads(data)
        else:
            assert data.decode().strip() == out.name
