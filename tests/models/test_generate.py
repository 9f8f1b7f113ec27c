"""The two samplers of RQTransformer.generate: the reference decode (the model's blocks with KV caches) and
the optimised one (rqvae.models.generate_fast) draw identical codes, and both reproduce the full forward
pass's logits when fed the same codes."""

from __future__ import annotations

import pytest
import torch

import rqvae.models.generate_fast as gf
import rqvae.models.step_linear as step_linear
from rqvae.models.sampling import Sampler
from rqvae.models.transformer import RQTransformer
from tests.helpers.ar_fixtures import VARIANTS, cond_for, make

# variants beyond the shared ones in tests/helpers/ar_fixtures.py
MORE_VARIANTS = {
    "per-stack-blocks": dict(attn_bias=False, depth_attn_bias=True, depth_mlp_bias=False,
                             depth_gelu="sigmoid"),
    # a codebook size per depth: depth d's logits and codes cover its K_d codes only
    "per-depth-sizes": dict(code_shape=(2, 2, 3), codebook_sizes=(16, 5, 9), per_depth_head=True,
                            per_depth_codebooks=True),
    "per-depth-sizes-learned": dict(code_shape=(2, 2, 3), codebook_sizes=(7, 16, 4), per_depth_head=True,
                                    input_emb="learned", depth_emb="learned", per_depth_tok_emb=True),
}
ALL_VARIANTS = {**VARIANTS, **MORE_VARIANTS}
CASES = [("class", 1.0), ("uncond", 1.0), ("text", 1.0), ("class", 3.0), ("text", 2.0)]


def both(model: RQTransformer, cond, B: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for impl in ("reference", "fast"):
        g = torch.Generator().manual_seed(7)
        out.append(model.generate(cond, batch_size=B, generator=g, dtype=torch.float32, impl=impl, **kw))
    return out[0], out[1]


@pytest.mark.parametrize("cond_type,cfg_scale", CASES)
def test_greedy_codes_are_identical(cond_type, cfg_scale):
    model = make(cond_type, cfg_dropout=0.1 if cfg_scale != 1.0 else 0.0)
    ref, fast = both(model, cond_for(model, 3), 3, top_k=1, cfg_scale=cfg_scale)
    assert ref.shape == (3, *model.config.code_shape)
    assert torch.equal(ref, fast)


@pytest.mark.parametrize("cond_type,cfg_scale", CASES)
def test_seeded_sampling_draws_identical_codes(cond_type, cfg_scale):
    model = make(cond_type, cfg_dropout=0.1 if cfg_scale != 1.0 else 0.0)
    ref, fast = both(model, cond_for(model, 4), 4, temperature=[1.3, 0.9], top_k=[0, 8], top_p=[0.95, None],
                     cfg_scale=cfg_scale)
    assert torch.equal(ref, fast)
    greedy = model.generate(cond_for(model, 4), batch_size=4, top_k=1, cfg_scale=cfg_scale,
                            dtype=torch.float32, impl="reference")
    assert not torch.equal(ref, greedy)  # really sampled


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_architecture_variants_draw_identical_codes(variant):
    model = make("class", cfg_dropout=0.1, **ALL_VARIANTS[variant])
    ref, fast = both(model, cond_for(model, 3), 3, top_k=1, cfg_scale=2.0)
    assert torch.equal(ref, fast)
    ref, fast = both(model, cond_for(model, 4), 4, temperature=1.2, top_k=8)
    assert torch.equal(ref, fast)
    assert (ref < torch.tensor(model.config.depth_vocab)).all()


class ForcedSampler(Sampler):
    """Feeds given codes (B, T, D) instead of drawing, and records the logits each step saw."""

    def __init__(self, codes: torch.Tensor, B: int) -> None:
        super().__init__(B, [1.0], [None], [None])
        self.codes, self.logits, self.step = codes.flatten(1, 2), [], 0  # (B, T*D)

    def draw(self, logits: torch.Tensor, d: int) -> torch.Tensor:
        self.logits.append(logits.float())
        code = self.codes[:, self.step]
        self.step += 1
        return code


@pytest.mark.parametrize("cond_type,variant", [("class", None), ("uncond", None), ("text", None)]
                         + [("class", v) for v in ALL_VARIANTS])
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_cached_logits_equal_the_full_forward_pass(cond_type, variant, impl):
    model = make(cond_type, **ALL_VARIANTS.get(variant, {}))
    B, (H, W, D) = 2, model.config.code_shape
    g = torch.Generator().manual_seed(2)
    codes = (torch.rand(B, H, W, D, generator=g) * torch.tensor(model.config.depth_vocab)).long()
    cond = model.check_cond(cond_for(model, B), batch_size=B)
    forced = ForcedSampler(codes.view(B, H * W, D), B)
    with torch.no_grad():
        if impl == "reference":
            got = model._generate_reference(cond, forced, torch.float32)
        else:
            got = gf.generate_fast(model, cond, forced, torch.float32)
        full = model(codes, cond)  # (B, T, D, K)
    assert torch.equal(got, codes.view(B, H * W, D))
    assert len(forced.logits) == H * W * D
    for i, logits in enumerate(forced.logits):  # position t, depth d: (B, K_d)
        t, d = divmod(i, D)
        assert logits.shape[-1] == model.config.depth_vocab[d]
        torch.testing.assert_close(logits, full[:, t, d, :logits.shape[-1]], rtol=1e-5, atol=1e-5)


def test_fast_path_without_the_private_onednn_op(monkeypatch):
    """Width 512 would take oneDNN's packed linear; with the capability check off, plain addmm runs."""
    model = make("class", width=512, n_heads=8, code_shape=(2, 2, 2), cfg_dropout=0.1, scale=0.06)
    cond = cond_for(model, 2)
    with_onednn = both(model, cond, 2, top_k=4, cfg_scale=2.0)
    monkeypatch.setattr(step_linear, "onednn_linear_available", lambda: False)
    used = []
    init = step_linear.StepLinear.__init__
    monkeypatch.setattr(step_linear.StepLinear, "__init__",
                        lambda self, *a, **k: (init(self, *a, **k), used.append(self.onednn))[0])
    ref, fast = both(model, cond, 2, top_k=4, cfg_scale=2.0)
    assert used and not any(used)
    assert torch.equal(ref, fast) and torch.equal(fast, with_onednn[1]) and torch.equal(ref, with_onednn[0])


def test_wide_variant_on_the_packed_weight_path():
    """Biases off and the sigmoid GELU (not fusable) on the layers that take oneDNN's packed linear."""
    model = make("class", width=512, n_heads=8, n_depth_heads=4, code_shape=(2, 2, 2), cfg_dropout=0.1,
                 scale=0.06, attn_bias=False, mlp_bias=False, gelu="sigmoid", per_depth_head=True)
    ref, fast = both(model, cond_for(model, 2), 2, top_k=4, cfg_scale=2.0)
    assert torch.equal(ref, fast)


def test_bf16_reference_and_fast_track_each_other():
    model = make("class")
    ref = model.generate(torch.arange(4), top_k=1, dtype=torch.bfloat16, impl="reference")
    fast = model.generate(torch.arange(4), top_k=1, dtype=torch.bfloat16, impl="fast")
    assert (ref == fast).float().mean() > 0.5  # bf16 rounding may flip near-ties, not most greedy choices


def test_unknown_impl_is_a_user_error():
    from rqvae.errors import UserError

    with pytest.raises(UserError, match="impl"):
        make("class").generate(torch.arange(2), impl="turbo")
