"""The recorded sampler (rqvae.models.generate_graphs): its bookkeeping (static input buffers, one recording
per cache slot and per depth, reuse across calls, rebuilt after a weight change) checked on a CPU with the
EagerRecorder in place of CUDA graphs, against the reference decode. The CUDA recording itself runs in
benchmarks/gpu_check.py."""

from __future__ import annotations

import pytest
import torch

import rqvae.models.generate_graphs as gg
from rqvae.errors import UserError
from tests.helpers.ar_fixtures import cond_for, make


@pytest.fixture
def recorders(monkeypatch) -> list:
    """generate(impl="graphs") records with EagerRecorders, listed here as they are made."""
    made: list = []

    def eager(device):
        made.append(gg.EagerRecorder())
        return made[-1]

    monkeypatch.setattr(gg, "cuda_recorder", eager)
    return made


def sample(model, cond, seed: int, impl: str, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return model.generate(cond, generator=g, dtype=torch.float32, impl=impl, **kw)


@pytest.mark.parametrize("cond_type,kw", [("class", dict(cfg_scale=2.0, temperature=1.2, top_k=8)),
                                          ("text", dict(top_p=0.9)), ("uncond", dict(top_k=1))])
def test_replayed_steps_draw_the_reference_codes_call_after_call(recorders, cond_type, kw):
    model = make(cond_type, cfg_dropout=0.1 if "cfg_scale" in kw else 0.0)
    c = model.config
    for seed in (0, 1, 2):  # the second and third calls only replay
        cond = cond_for(model, 3) if seed != 1 or cond_type != "class" else torch.tensor([2, 0, 1])
        got = sample(model, cond, seed, "graphs", batch_size=3, **kw)
        assert torch.equal(got, sample(model, cond, seed, "reference", batch_size=3, **kw))
    assert len(recorders) == 1  # one sampler, kept
    assert recorders[0].recorded == c.cond_len + c.num_positions - 1 + c.depth  # one per cache slot and depth


def test_a_weight_change_rebuilds_the_recorded_sampler(recorders):
    model = make("class")
    cond = torch.arange(4) % 10
    sample(model, cond, 0, "graphs")
    with torch.no_grad():
        model.head.linear.weight.mul_(-1.5)  # an in-place update, as an optimizer step makes
    assert torch.equal(sample(model, cond, 0, "graphs"), sample(model, cond, 0, "reference"))
    assert len(recorders) == 2


def test_samplers_are_kept_per_batch_size_and_the_oldest_dropped(recorders):
    model = make("class")
    for B in (2, 3, 2, 4, 2, 3):  # kept: {2} {2,3} {3,2} {2,4} {4,2} {2,3}
        cond = torch.arange(B)
        assert torch.equal(sample(model, cond, B, "graphs"), sample(model, cond, B, "reference"))
    assert len(recorders) == 4  # B = 2 once, 3 twice (dropped when 4 came), 4 once
    assert len(gg._SAMPLERS[model]) == gg.KEEP


def test_graphs_on_a_cpu_model_is_a_user_error():
    with pytest.raises(UserError, match="impl='fast'"):
        make("class").generate(torch.arange(2), impl="graphs")
