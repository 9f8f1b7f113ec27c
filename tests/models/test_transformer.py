"""RQ-Transformer: causality, cached sampling vs full forward passes, filters, presets, save/load."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rqvae.errors import UserError
from rqvae.models.sampling import guide, per_depth, sample_from_logits, top_k_filter, top_p_filter
from rqvae.models.transformer import AR_PRESETS, RQTransformer, RQTransformerConfig, count_sampling_flops
from tests.helpers.ar_fixtures import TINY, cond_for, make


@pytest.mark.parametrize("cond_type", ["class", "text"])
def test_causality_raster_then_depth(cond_type):
    model = make(cond_type)
    H, W, D = model.config.code_shape
    T, K = H * W, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, K, (2, H, W, D), generator=g)
    cond = cond_for(model, 2)
    base = model(codes, cond)  # (B, T, D, K)
    for t, d in [(0, 0), (0, 1), (5, 0), (5, 1), (T - 1, 0)]:
        changed = codes.clone()
        changed.view(2, T, D)[:, t, d] = (changed.view(2, T, D)[:, t, d] + 1) % K
        out = model(changed, cond)
        diff = (out - base).abs().amax(dim=(0, 3))  # (T, D)
        order = torch.arange(T * D).view(T, D)
        here = t * D + d
        assert diff[order <= here].max() == 0, f"logits at or before ({t}, {d}) depend on code ({t}, {d})"
        if here + 1 < T * D:  # and the next prediction does depend on it
            assert diff.view(-1)[here + 1] > 1e-4


def full_forward_greedy(model: RQTransformer, cond, B: int, cfg_scale: float) -> torch.Tensor:
    """Greedy decoding without caches: a full teacher-forced forward pass for every (t, d)."""
    H, W, D = model.config.code_shape
    codes = torch.zeros(B, H * W, D, dtype=torch.long)
    null = model.null_cond(B)[:, 0] if cfg_scale != 1.0 else None
    with torch.no_grad():
        for t in range(H * W):
            for d in range(D):
                logits = model(codes.view(B, H, W, D), cond)[:, t, d]
                if null is not None:
                    logits = guide(logits, model(codes.view(B, H, W, D), null)[:, t, d], cfg_scale)
                codes[:, t, d] = logits.argmax(-1)
    return codes.view(B, H, W, D)


@pytest.mark.parametrize("cond_type,cfg_scale",
                         [("class", 1.0), ("uncond", 1.0), ("text", 1.0), ("class", 2.5)])
def test_cached_greedy_equals_full_forward_greedy(cond_type, cfg_scale):
    model = make(cond_type, cfg_dropout=0.1 if cfg_scale != 1.0 else 0.0)
    H, W, D = model.config.code_shape
    B = 3
    cond = cond_for(model, B)
    got = model.generate(cond, batch_size=B, top_k=1, cfg_scale=cfg_scale, dtype=torch.float32)
    assert got.shape == (B, H, W, D) and got.dtype == torch.long

    assert torch.equal(got, full_forward_greedy(model, cond, B, cfg_scale))


def test_sampled_codes_lie_in_top_k_of_teacher_forced_logits():
    model = make("class")
    B = 4
    g = torch.Generator().manual_seed(3)
    codes = model.generate(torch.arange(B), top_k=[3, 2], temperature=[1.5, 0.7], generator=g,
                           dtype=torch.float32)
    logits = model(codes, torch.arange(B))  # (B, T, D, K)
    flat = codes.view(B, -1, model.config.depth)
    for d, k in enumerate([3, 2]):
        top = logits[:, :, d].topk(k, dim=-1).indices  # (B, T, k)
        assert (top == flat[:, :, d, None]).any(-1).all()
    assert len(torch.unique(flat)) > 2  # really sampled, not greedy


def test_generate_is_reproducible_with_a_generator():
    model = make("class")
    run = lambda seed: model.generate(2, batch_size=4, generator=torch.Generator().manual_seed(seed),
                                      top_p=0.9, dtype=torch.float32)
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bf16_generate_runs_and_tracks_fp32():
    model = make("class")
    a = model.generate(torch.arange(2), top_k=1, dtype=torch.float32)
    b = model.generate(torch.arange(2), top_k=1, dtype=torch.bfloat16)
    assert b.shape == a.shape
    assert (a == b).float().mean() > 0.5  # bf16 rounding may flip near-ties, not most greedy choices


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[2.0, 1.0, 3.0, 0.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[False, True, False, True]]
    assert torch.equal(top_k_filter(logits, None), logits) and torch.equal(top_k_filter(logits, 10), logits)
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    lp = probs.log()
    keep = lambda p: (~torch.isinf(top_p_filter(lp, p))).tolist()[0]
    assert keep(0.4) == [False, True, False, False]  # the top entry is always kept
    assert keep(0.75) == [False, True, False, True]
    assert keep(0.85) == [True, True, False, True]
    assert keep(1.0) == [True, True, True, True]
    with pytest.raises(UserError):
        top_p_filter(lp, 0.0)
    with pytest.raises(UserError):
        top_k_filter(lp, -1)
    g = torch.Generator().manual_seed(0)
    draws = sample_from_logits(lp.expand(2000, 4), top_p=0.75, generator=g)
    assert set(draws.tolist()) == {1, 3}
    frac = (draws == 1).float().mean().item()
    assert abs(frac - 0.5 / 0.8) < 0.05  # renormalised over the nucleus
    assert per_depth(0.5, 3, "top_p") == [0.5, 0.5, 0.5]
    with pytest.raises(UserError, match="code depths"):
        per_depth([1, 2], 3, "top_k")


def test_presets_match_the_papers_parameter_counts():
    paper = {"imagenet-480m": 480.9, "imagenet-821m": 820.9, "imagenet-1.4b": 1387.5, "imagenet-3.8b": 3822.5,
             "cc3m-654m": 654.1, "ffhq-355m": 355.4, "lsun-church-370m": 370.1, "lsun-catbedroom-612m": 612.1}
    for name, millions in paper.items():
        with torch.device("meta"):
            model = RQTransformer.from_preset(name)
        assert abs(model.num_parameters() / 1e6 - millions) / millions < 0.005, name


def test_save_load_roundtrip(tmp_path):
    model = make("text")
    model.save_pretrained(tmp_path / "ar")
    loaded = RQTransformer.from_pretrained(tmp_path / "ar").eval()
    assert loaded.config == model.config
    codes = torch.randint(0, model.config.vocab_size, (2, *model.config.code_shape))
    cond = cond_for(model, 2)
    a, at = model(codes, cond, return_cond_logits=True)
    b, bt = loaded(codes, cond, return_cond_logits=True)
    assert torch.equal(a, b) and torch.equal(at, bt) and torch.equal(loaded.codebook, model.codebook)


def test_training_mode_cfg_dropout_and_gradients():
    model = make("class", cfg_dropout=0.5).train()
    codes = torch.randint(0, model.config.vocab_size, (4, *model.config.code_shape))
    logits = model(codes, torch.arange(4))
    logits.logsumexp(-1).mean().backward()
    assert model.cond_emb.weight.grad[model.config.null_id].abs().sum() > 0  # the null row was used
    assert not model.codebook.requires_grad


def test_user_errors():
    model = make("class")
    codes = torch.zeros(1, *model.config.code_shape, dtype=torch.long)
    with pytest.raises(UserError, match="class id out of range"):
        model(codes, torch.tensor([10]))
    with pytest.raises(UserError, match="codes must lie"):
        model(codes + 99, torch.tensor([0]))
    with pytest.raises(UserError, match="shape"):
        model(codes[:, :2], torch.tensor([0]))
    with pytest.raises(UserError, match="null condition"):
        model.generate(torch.tensor([0]), cfg_scale=2.0)
    with pytest.raises(UserError, match="unconditional"):
        make("uncond").generate(torch.tensor([3]))
    with pytest.raises(UserError, match="generator"):
        fake_cuda_generator = SimpleNamespace(device=torch.device("cuda"))  # no GPU needed to test the check
        model.generate(torch.tensor([0]), generator=fake_cuda_generator)
    with pytest.raises(UserError, match="temperature"):
        model.generate(torch.tensor([0]), temperature=0.0)
    with pytest.raises(UserError, match="codebook"):
        RQTransformer(TINY, codebook=torch.zeros(3, 3))
    with pytest.raises(UserError, match="divisible"):
        RQTransformerConfig(width=30, n_heads=4)


def test_flop_count_scales_with_batch_and_guidance():
    cfg = AR_PRESETS["fmnist-small"]
    one = count_sampling_flops(cfg, 1)
    assert count_sampling_flops(cfg, 8) == 8 * one and count_sampling_flops(cfg, 8, cfg=True) == 16 * one
    # dominated by the 12 C^2 per token and layer: 2 * 12 * C^2 * (4 * 64 + 2 * 256) plus the head
    approx = 2 * 12 * 256**2 * (4 * 64 + 2 * 64 * 4) + 2 * 256 * 256 * 64 * 4
    assert 1.0 <= one / approx < 1.1


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_cached_greedy_with_wide_layers_equals_full_forward_greedy(cfg_scale, monkeypatch):
    """Width 512 puts the sampler's large matmuls on its packed-weight (oneDNN) fp32 path."""
    import rqvae.models.step_linear as step_linear

    packed = []
    init = step_linear.StepLinear.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        packed.append(self.onednn)

    monkeypatch.setattr(step_linear.StepLinear, "__init__", spy)
    model = make("class", width=512, n_heads=8, code_shape=(2, 2, 2), cfg_dropout=0.1)
    with torch.no_grad():  # smaller weights keep the 512-wide logits well separated from ties
        for p in model.parameters():
            p.mul_(0.2)
    H, W, D = model.config.code_shape
    B = 2
    cond = cond_for(model, B)
    got = model.generate(cond, batch_size=B, top_k=1, cfg_scale=cfg_scale, dtype=torch.float32)
    if step_linear.onednn_linear_available():
        assert any(packed), "no layer took the packed-weight path"
    assert torch.equal(got, full_forward_greedy(model, cond, B, cfg_scale))


def test_forward_reads_back_values_only_on_a_cpu():
    """On a GPU int(codes.min()) would sync every training step; forward leaves value checks to CPU tensors.
    A meta tensor has no values: reading one back raises, so this forward must not try."""
    with torch.device("meta"):
        model = RQTransformer(TINY)
        codes = torch.zeros(2, *TINY.code_shape, dtype=torch.long)
        logits = model(codes, torch.zeros(2, dtype=torch.long))
    assert logits.shape == (2, 16, 2, TINY.vocab_size) and logits.device.type == "meta"
    with pytest.raises(UserError, match="codes must lie"):  # a CPU tensor is checked
        make("class")(torch.full((1, *TINY.code_shape), 99), torch.tensor([0]))


def test_forward_on_a_depth_prefix():
    """Codes of the first d depths: the depth stack's logits at depths < d do not see later depths, so they
    equal the full model's when the spatial stack sees the same inputs (one position, T = 1 slot)."""
    model = make("class", code_shape=(1, 1, 3))
    codes = torch.randint(0, model.config.vocab_size, (2, 1, 1, 3))
    full = model(codes, torch.arange(2))  # (B, 1, 3, K): position 0 sees only the condition
    for d in (1, 2):
        part = model(codes[..., :d], torch.arange(2))
        assert part.shape == (2, 1, d, model.config.vocab_size)
        torch.testing.assert_close(part, full[:, :, :d], rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="shape"):
        model(torch.zeros(2, 1, 1, 4, dtype=torch.long), torch.arange(2))
