"""Building blocks of the RQ-Transformer: pre-LN GPT blocks with a static KV cache, and the output heads.

Variants that official checkpoints can have are options here: attention and MLP biases off, the sigmoid
GELU approximation ``x * sigmoid(1.702 x)`` (the official ``gelu: v2``; ``v1`` is the exact erf GELU), and
one output Linear per depth (:class:`DepthLinear`, the official ``shared_cls_emb: false``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def sigmoid_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU, x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def activation(gelu: str):
    """The MLP activation named by ``RQTransformerConfig.gelu``: "exact" or "sigmoid"."""
    return F.gelu if gelu == "exact" else sigmoid_gelu


class GELU(nn.Module):
    def __init__(self, kind: str = "exact") -> None:
        super().__init__()
        self.kind = kind
        self.fn = activation(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.kind


class KVCache:
    """Static key/value cache of one attention layer for one ``generate`` call: slots 0..n-1 filled so far."""

    def __init__(self, batch_size: int, n_heads: int, slots: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.k = torch.zeros(batch_size, n_heads, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, h, n, hd) to slots pos..pos+n-1 -> keys and values of slots 0..pos+n-1."""
        n = k.shape[2]
        self.k[:, :, pos:pos + n] = k
        self.v[:, :, pos:pos + n] = v
        return self.k[:, :, :pos + n], self.v[:, :, :pos + n]


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, n_heads: int, attn_dropout: float, dropout: float,
                 bias: bool = True) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Linear(width, width, bias=bias)
        self.key = nn.Linear(width, width, bias=bias)
        self.value = nn.Linear(width, width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        self.attn_dropout = attn_dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        """x (B, L, C) -> (B, L, C). With a cache, x holds the tokens of slots pos..pos+L-1 and attends to
        the cached slots before them too."""
        B, L, C = x.shape
        q, k, v = (m(x).view(B, L, self.n_heads, -1).transpose(1, 2)  # (B, h, L, hd)
                   for m in (self.query, self.key, self.value))
        if cache is not None:
            k, v = cache.update(pos, k, v)  # (B, h, pos + L, hd)
        n = k.shape[2]  # slots attended to
        causal = L > 1 and n == L  # L tokens from slot 0: the plain causal mask
        mask = None  # one new token sees every slot so far
        if 1 < L < n:  # several new tokens after a cached prefix: slot pos+i sees slots <= pos+i
            mask = torch.arange(n, device=x.device) <= pos + torch.arange(L, device=x.device)[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, L, C)))


class Block(nn.Module):
    """Pre-LN GPT block: x + attn(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP."""

    def __init__(self, width: int, n_heads: int, attn_dropout: float, dropout: float, *,
                 attn_bias: bool = True, mlp_bias: bool = True, gelu: str = "exact") -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, n_heads, attn_dropout, dropout, bias=attn_bias)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width, bias=mlp_bias), GELU(gelu),
                                 nn.Linear(4 * width, width, bias=mlp_bias), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, pos)
        return x + self.mlp(self.ln2(x))


class DepthLinear(nn.Module):
    """One Linear(width, n_out) per depth: (..., d, C) -> (..., d, n_out) for the first d depths."""

    def __init__(self, depth: int, width: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(depth, n_out, width))  # (D, n_out, C)
        self.bias = nn.Parameter(torch.zeros(depth, n_out))  # (D, n_out)
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-2]
        return torch.einsum("...dc,dkc->...dk", x, self.weight[:d]) + self.bias[:d]


class OutputHead(nn.Module):
    """LayerNorm + Linear: the classifier over the codebook or the text vocabulary. With ``depth`` the
    Linear is a :class:`DepthLinear` (one per depth), and the input must end in (..., d, C).

    ``sizes`` (with ``depth``): depth d has only sizes[d] <= n_out classes; its logits beyond are masked to
    the dtype's lowest value (probability 0, but finite so that a soft-label loss stays finite)."""

    def __init__(self, width: int, n_out: int, depth: int | None = None,
                 sizes: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.linear = nn.Linear(width, n_out) if depth is None else DepthLinear(depth, width, n_out)
        self.sizes = sizes if sizes is not None and min(sizes) < n_out else None
        if self.sizes is not None:  # (D, n_out): True where depth d has no such class
            self.register_buffer("pad", torch.arange(n_out) >= torch.tensor(sizes)[:, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(self.ln(x))
        if self.sizes is None:
            return logits
        return logits.masked_fill(self.pad[:x.shape[-2]], torch.finfo(logits.dtype).min)

    def at_depth(self, x: torch.Tensor, d: int) -> torch.Tensor:
        """Logits of depth d's tokens: x (B, C) -> (B, n_out), or (B, sizes[d]) with per-depth sizes."""
        x = self.ln(x)
        if isinstance(self.linear, DepthLinear):
            k = self.linear.weight.shape[1] if self.sizes is None else self.sizes[d]
            return F.linear(x, self.linear.weight[d, :k], self.linear.bias[d, :k])
        return self.linear(x)
