"""Small RQ-Transformers with random weights for the sampling and forward tests."""

from __future__ import annotations

from dataclasses import replace

import torch

from rqvae.models.transformer import AR_PRESETS, RQTransformer

TINY = AR_PRESETS["tiny"]  # (4, 4, 2) codes, K 16, width 32, 2 + 1 layers


def make(cond_type: str = "class", seed: int = 0, scale: float = 0.3, **kw) -> RQTransformer:
    torch.manual_seed(seed)
    extra = {"text": dict(text_vocab_size=20, cond_len=3)}.get(cond_type, {})
    cfg = replace(TINY, cond_type=cond_type, **{**extra, **kw})
    model = RQTransformer(cfg, codebook=torch.randn(cfg.codebook_shape))
    # random (not the init's near-zero) weights, so that every path changes the logits visibly
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
    return model.eval()


# architecture variants (official checkpoints can have them); each must keep both samplers equal
VARIANTS = {
    "depth-heads": dict(n_depth_heads=2),
    "no-bias": dict(attn_bias=False, mlp_bias=False),
    "sigmoid-gelu": dict(gelu="sigmoid"),
    "no-cumsum": dict(code_shape=(2, 2, 3), cumsum_depth=False),  # D 3: E_{t,1} != e(S_{t,1})
    "per-depth-head": dict(per_depth_head=True),
    "per-depth-codebooks": dict(per_depth_codebooks=True),
    "learned-emb": dict(code_shape=(2, 2, 3), input_emb="learned", depth_emb="learned"),
    "learned-input": dict(input_emb="learned", per_depth_tok_emb=True, cumsum_depth=False),
    "learned-depth": dict(code_shape=(2, 2, 3), depth_emb="learned", per_depth_tok_emb=True),
    "all": dict(code_shape=(3, 3, 3), n_depth_heads=1, attn_bias=False, mlp_bias=False, gelu="sigmoid",
                cumsum_depth=False, per_depth_head=True, per_depth_codebooks=True),
}


def cond_for(model: RQTransformer, B: int) -> torch.Tensor | None:
    c = model.config
    if c.cond_type == "class":
        return torch.arange(B) % c.num_classes
    if c.cond_type == "text":
        g = torch.Generator().manual_seed(1)
        return torch.randint(0, c.text_vocab_size, (B, c.cond_len), generator=g)
    return None
