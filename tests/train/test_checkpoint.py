import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rqvae.errors import UserError
from rqvae.train import checkpoint as ck
from rqvae.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def _setup(seed: int, width: int = 8):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Dropout(0.3), torch.nn.GELU(),
                                torch.nn.Linear(width, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.5, 0.9), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    return model, opt, sched


def _train(model, opt, sched, steps: int) -> None:
    for _ in range(steps):  # draws from torch, numpy and python RNGs, so all three must be restored
        x = torch.randn(16, 4) * (1 + np.random.rand()) + random.random()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_resume_is_bitwise_identical(tmp_path):
    model, opt, sched = _setup(0)
    np.random.seed(1)
    random.seed(2)
    _train(model, opt, sched, 3)
    save_checkpoint(tmp_path, 3, {"model": model}, {"opt": opt}, {"sched": sched}, extra={"epoch": 1})
    _train(model, opt, sched, 4)

    model2, opt2, sched2 = _setup(123)  # different initial weights
    torch.manual_seed(999)
    extra = load_checkpoint(latest_checkpoint(tmp_path), {"model": model2}, {"opt": opt2}, {"sched": sched2})
    assert extra == {"epoch": 1, "step": 3}
    assert opt2.param_groups[0]["betas"] == (0.5, 0.9)
    _train(model2, opt2, sched2, 4)

    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for pid in s1:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[pid][key], s2[pid][key]), (pid, key)
    assert sched.state_dict()["last_epoch"] == sched2.state_dict()["last_epoch"] == 7
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_layout_latest_and_keep_last(tmp_path):
    model, opt, sched = _setup(0)
    _train(model, opt, sched, 1)
    for step in (10, 20, 30, 40):
        out = save_checkpoint(tmp_path, step, {"model": model}, {"opt": opt}, {"sched": sched}, keep_last=2)
    assert out == tmp_path / "checkpoints" / "step_000040"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000030", "step_000040"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000030",
                                                                             "step_000040"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000040"
    assert set(os.listdir(out)) == {"modules.safetensors", "optim.safetensors", "state.json"}
    state = json.loads((out / "state.json").read_text())
    assert state["step"] == 40 and state["modules"] == ["model"]
    assert len(state["rng"]["python"]["state"]) == 625
    tensors = load_file(out / "optim.safetensors")
    assert "rng.torch" in tensors and tensors["rng.torch"].dtype == torch.uint8
    assert torch.equal(tensors["optimizers.opt.state.0.step"], opt.state_dict()["state"][0]["step"])
    mods = load_file(out / "modules.safetensors")
    assert torch.equal(mods["model.0.weight"], model[0].weight)
    # re-saving the same step replaces it; a stale `latest` falls back to the newest complete folder
    save_checkpoint(tmp_path, 40, {"model": model}, keep_last=2)
    (tmp_path / "checkpoints" / "latest").write_text("step_000999\n")
    assert latest_checkpoint(tmp_path).name == "step_000040"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_extra_round_trip_and_refusals(tmp_path):
    model = torch.nn.Linear(2, 2)
    extra = {"best": float("inf"), "nan": float("nan"), "pair": (1, "a"), "by_id": {3: [1.5, None]},
             "nested": {"__tensor__": "not a tensor ref"}, "t": torch.arange(3), "ok": True}
    save_checkpoint(tmp_path, 1, {"m": model}, extra=extra)
    got = load_checkpoint(tmp_path, {"m": model})
    assert got["best"] == math.inf and math.isnan(got["nan"]) and got["pair"] == (1, "a")
    assert got["by_id"] == {3: [1.5, None]} and got["nested"] == {"__tensor__": "not a tensor ref"}
    assert torch.equal(got["t"], torch.arange(3)) and got["ok"] is True and got["step"] == 1
    with pytest.raises(UserError, match="cannot store a object"):
        save_checkpoint(tmp_path, 2, {"m": model}, extra={"x": object()})
    assert latest_checkpoint(tmp_path).name == "step_000001"


def test_mismatched_checkpoint_is_a_user_error(tmp_path):
    model, opt, sched = _setup(0)
    _train(model, opt, sched, 1)
    save_checkpoint(tmp_path, 1, {"model": model}, {"opt": opt}, {"sched": sched})
    wide, wide_opt, _ = _setup(0, width=16)
    with pytest.raises(UserError, match=r"module 'model' does not match.*shape of 0\.(weight|bias)"):
        load_checkpoint(tmp_path, {"model": wide})
    with pytest.raises(UserError, match="has no module 'ema'"):
        load_checkpoint(tmp_path, {"ema": model})
    small = torch.nn.Linear(4, 8)
    with pytest.raises(UserError, match="group 0 has 4 parameters, the optimizer has 2"):
        load_checkpoint(tmp_path, {}, {"opt": torch.optim.Adam(small.parameters())})
    with pytest.raises(UserError, match="state exp_avg of parameter 0 has shape"):
        load_checkpoint(tmp_path, {}, {"opt": wide_opt})
    with pytest.raises(UserError, match="has no optimizer 'd_opt'"):
        load_checkpoint(tmp_path, {}, {"d_opt": opt})
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_failure_after_temp_write_keeps_previous(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.fill_(1.0)
    save_checkpoint(tmp_path, 1, {"m": model})
    with torch.no_grad():
        model.weight.fill_(2.0)
    real_rename = os.rename

    def boom(src, dst):
        if ".tmp-" in str(src):
            raise OSError("disk vanished")
        return real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", boom)
    with pytest.raises(OSError, match="disk vanished"):
        save_checkpoint(tmp_path, 2, {"m": model})
    monkeypatch.undo()
    names = os.listdir(tmp_path / "checkpoints")
    assert any(n.startswith(".tmp-step_000002") for n in names)  # the half-done save is left behind...
    assert latest_checkpoint(tmp_path).name == "step_000001"  # ...and ignored
    fresh = torch.nn.Linear(3, 3)
    load_checkpoint(tmp_path, {"m": fresh})
    assert (fresh.weight == 1.0).all()
    save_checkpoint(tmp_path, 3, {"m": model})  # the next save cleans it up
    assert not any(n.startswith(".") for n in os.listdir(tmp_path / "checkpoints"))


SAVER = textwrap.dedent("""
    import sys, torch
    from rqvae.train.checkpoint import save_checkpoint
    model = torch.nn.Linear(1024, 1024)
    step = int(sys.argv[2])
    while True:
        step += 1
        with torch.no_grad():
            model.weight.fill_(step)
        save_checkpoint(sys.argv[1], step, {"m": model}, keep_last=2)
        print(step, flush=True)
""")


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    run = tmp_path / "run"
    rng = random.Random(0)
    start = 0
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, str(script), str(run), str(start)], stdout=subprocess.PIPE,
                                text=True)
        first = int(proc.stdout.readline())  # at least one save of this process is complete
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        printed = [first] + [int(s) for s in proc.stdout.read().split()]
        latest = latest_checkpoint(run)
        step = int(latest.name.split("_")[1])
        assert step >= printed[-1]  # every save it reported finished is visible
        model = torch.nn.Linear(1024, 1024)
        extra = load_checkpoint(latest, {"m": model})
        assert extra["step"] == step and (model.weight == step).all()
        start = step + 1000


def test_no_pickle_is_used_when_loading(tmp_path, monkeypatch):
    import pickle

    model, opt, sched = _setup(0)
    _train(model, opt, sched, 1)
    save_checkpoint(tmp_path, 1, {"model": model}, {"opt": opt}, {"sched": sched})

    def refuse(*a, **k):
        raise AssertionError("unpickling during load_checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    load_checkpoint(tmp_path, {"model": model}, {"opt": opt}, {"sched": sched})


def test_kill_between_rename_and_latest_uses_the_complete_folder(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 1, {"m": model})

    def boom(*a, **k):
        raise OSError("killed before `latest` was updated")

    monkeypatch.setattr(ck, "atomic_write_bytes", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, {"m": model})
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000001"
    assert latest_checkpoint(tmp_path).name == "step_000002"  # renamed into place, so complete
    assert load_checkpoint(tmp_path, {"m": model})["step"] == 2
