"""The optimised sampler behind :meth:`rqvae.models.transformer.RQTransformer.generate`.

It computes exactly what the reference decode in ``models/transformer.py`` computes (``_generate_reference``:
the model's own Block modules with a KV cache), only faster for the few rows of one sampling step:

- weights packed once per call: q, k, v fused into one matmul with the outputs grouped per head (so one
  token's q, k, v of a head are adjacent and attention needs no transposes), the softmax scale folded into
  the query, each linear in its dtype (:class:`rqvae.models.step_linear.StepLinear`; ``dtype=None`` picks
  the faster of fp32 and bf16 per weight shape from a one-time measurement cached per machine);
- the codebook projected through input_mlp / head_mlp once, so embedding a sampled code is a row lookup;
- one static cache per layer, keys and values in one tensor (B * heads, 2, slots, head_dim): one copy
  writes a token's key and value, and the filled prefix of each is a plain strided matrix for ``bmm``
  (keys and values interleaved per slot would make ``bmm`` copy the whole prefix at every step);
- the attention over the cache in fp32 on a CPU, also when the linears run in bf16 (a bf16 ``bmm`` of
  these shapes is slower there);
- bf16 weights and large fp32 weights on a CPU go through oneDNN's packed-weight linear with a fused GELU.
  That op is private (``torch.ops.mkldnn._linear_pointwise``), so it is used only when
  :func:`~rqvae.models.step_linear.onednn_linear_available` says this torch build has it; otherwise the
  plain ``addmm`` path runs.

tests/models/test_generate.py checks that this path and the reference draw identical codes (greedy and seeded
sampling, with and without guidance). A change to the model's block maths must be made in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from rqvae.models.sampling import Sampler, default_dtype
from rqvae.models.step_linear import StepLinear, step_dtype


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, dt: torch.dtype | None, rows: int,
            gelu: str | None = None) -> StepLinear:
    """A StepLinear in ``dt``; ``dt`` None: the faster dtype for this shape (:func:`step_dtype`, CPU) or
    the device's default (bf16 on CUDA)."""
    if dt is None:
        dt = step_dtype(*weight.shape, rows, gelu) if weight.device.type == "cpu" \
            else default_dtype(weight.device)
    return StepLinear(weight, bias, dt, rows, gelu)


@dataclass
class _BlockWeights:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv: StepLinear  # C -> 3C: outputs ordered (head, q/k/v, head_dim), the query scaled by 1/sqrt(hd)
    proj: StepLinear  # C -> C
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc1: StepLinear  # C -> 4C, then the GELU (the exact one fused where the backend can)
    fc2: StepLinear  # 4C -> C

    @classmethod
    def pack(cls, block: nn.Module, n_heads: int, dt: torch.dtype | None, rows: int) -> _BlockWeights:
        """Pack a :class:`~rqvae.models.transformer_blocks.Block` (ln1, attn.{query,key,value,proj}, ln2,
        mlp)."""
        a = block.attn
        C = a.query.weight.shape[1]
        scale = torch.tensor([(C // n_heads) ** -0.5, 1.0, 1.0], device=a.query.weight.device)  # q, k, v
        qkv_w = torch.stack([a.query.weight, a.key.weight, a.value.weight])  # (3, C_out, C_in)
        qkv_w = (qkv_w * scale[:, None, None]).view(3, n_heads, -1, C).transpose(0, 1).reshape(3 * C, C)
        qkv_b = None
        if a.query.bias is not None:
            qkv_b = torch.stack([a.query.bias, a.key.bias, a.value.bias])  # (3, C_out)
            qkv_b = (qkv_b * scale[:, None]).view(3, n_heads, -1).transpose(0, 1).reshape(3 * C)
        fc1, fc2 = block.mlp[0], block.mlp[2]
        return cls(block.ln1.weight, block.ln1.bias, _linear(qkv_w, qkv_b, dt, rows),
                   _linear(a.proj.weight, a.proj.bias, dt, rows), block.ln2.weight, block.ln2.bias,
                   _linear(fc1.weight, fc1.bias, dt, rows, gelu=block.mlp[1].kind),
                   _linear(fc2.weight, fc2.bias, dt, rows))

    def step(self, x: torch.Tensor, kv_cache: torch.Tensor, pos: int, n_heads: int) -> torch.Tensor:
        """One pre-LN block on one new token per row, x (B, C), at cache slot ``pos`` (fp32 residual stream).

        kv_cache (B * heads, 2, slots, head_dim) holds the keys and values of slots 0..pos-1; the token's
        own key and value are written to slot pos and its query attends to slots 0..pos:
        softmax(q K^T / sqrt(hd)) V per head, as two batched matmuls over the filled prefix only.
        """
        B, C = x.shape
        hid = F.layer_norm(x, (C,), self.ln1_w, self.ln1_b)  # each linear casts its input to its dtype
        qkv = self.qkv(hid).view(B * n_heads, 3, -1)  # (B*h, 3, hd), q pre-scaled
        kv_cache[:, :, pos] = qkv[:, 1:]
        k, v = kv_cache[:, 0, :pos + 1], kv_cache[:, 1, :pos + 1]  # (B*h, n, hd) each
        if k.device.type == "cpu":  # fp32 attention (a CPU bf16 bmm is slower); exact: k, v hold bf16 values
            k, v = k.float(), v.float()
        kv_dt = k.dtype
        att = torch.softmax(torch.bmm(qkv[:, :1].to(kv_dt), k.transpose(1, 2)), -1, dtype=torch.float32)
        y = torch.bmm(att.to(kv_dt), v).view(B, C)  # (B*h, 1, hd) -> (B, C)
        x = x + self.proj(y).float()
        hid = F.layer_norm(x, (C,), self.ln2_w, self.ln2_b)
        return x + self.fc2(self.fc1(hid)).float()


def _code_table(model: nn.Module, kind: str, mlp: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias (C,), table (D, K, C)) with the embedding of code k at depth d = bias + table[d, k]: for
    "codebook", ``mlp``(e_d(k)) (e_d: the codebook of depth d, the same for every d unless
    per_depth_codebooks); for "learned", the tok_emb rows of depth d and a zero bias."""
    c = model.config
    D, K = c.depth, c.vocab_size
    if kind == "learned":
        rows = model.tok_emb.weight  # (K, C) or (sum_d K_d, C)
        if not c.per_depth_tok_emb:
            return rows.new_zeros(rows.shape[1]), rows.expand(D, -1, -1)
        sizes = torch.tensor(c.depth_vocab, device=rows.device)[:, None]  # (D, 1)
        k = torch.arange(K, device=rows.device).minimum(sizes - 1)  # (D, K): rows past K_d repeat (unused)
        return rows.new_zeros(rows.shape[1]), rows[model.tok_offsets[:, None] + k]
    books = model.codebook if c.per_depth_codebooks else model.codebook.expand(D, -1, -1)  # (D, K, n_z)
    layer = getattr(model, mlp)
    return layer.bias, books @ layer.weight.t()  # fp32


class FastSampler:
    """The packed weights and static caches of one ``generate`` call on ``rows`` sequences (Bx)."""

    def __init__(self, model: nn.Module, dt: torch.dtype | None, rows: int) -> None:
        c = model.config
        self.config, self.dt, self.rows = c, dt, rows
        H, W, D = c.code_shape
        self.spatial = [_BlockWeights.pack(b, c.n_heads, dt, rows) for b in model.spatial_blocks]
        self.depth = [_BlockWeights.pack(b, c.depth_heads, dt, rows) for b in model.depth_blocks]
        input_bias, self.input_table = _code_table(model, c.input_emb, "input_mlp")  # (C,), (D, K, C)
        self.head_bias, self.head_table = _code_table(model, c.depth_emb, "head_mlp")
        self.cumulative = c.depth_emb == "codebook" and c.cumsum_depth  # head_mlp of the sum: sum the rows
        self.head_ln_w, self.head_ln_b = model.head.ln.weight, model.head.ln.bias
        lin = model.head.linear
        self.heads = ([_linear(lin.weight[d, :k], lin.bias[d, :k], dt, rows)  # depth d: its K_d outputs
                       for d, k in enumerate(c.depth_vocab)] if c.per_depth_head
                      else [_linear(lin.weight, lin.bias, dt, rows)] * D)
        # image-slot inputs before the code rows: PE_T(t) + D * input_mlp.bias (the bias counts D times)
        self.pos_spatial = model.pos_spatial + input_bias * c.depth  # (T, C)
        self.pos_depth = model.pos_depth  # (D, C)
        device = model.codebook.device
        # keys and values kept in the dtype the qkv linear computes them in (bf16 halves the memory read at
        # each step, which bounds the spatial attention at large batch); on a CPU the attention itself runs in
        # fp32 (a bf16 bmm of these shapes copies the strided prefix and is 1.5-3x slower, measured)
        self.s_kv = torch.empty(len(self.spatial), rows * c.n_heads, 2, c.cond_len + H * W - 1,
                                c.width // c.n_heads, dtype=self.spatial[0].qkv.dtype,
                                device=device)  # per spatial layer: L + T - 1 slots
        self.d_kv = torch.empty(len(self.depth), rows * c.depth_heads, 2, D, c.width // c.depth_heads,
                                dtype=self.depth[0].qkv.dtype if self.depth else torch.float32,
                                device=device)  # per depth layer: D slots

    def spatial_step(self, x: torch.Tensor, pos: int) -> torch.Tensor:  # (Bx, C) at slot pos -> (Bx, C)
        for i, blk in enumerate(self.spatial):
            x = blk.step(x, self.s_kv[i], pos, self.config.n_heads)
        return x

    def depth_logits(self, v: torch.Tensor, d: int) -> torch.Tensor:  # (Bx, C) at depth slot d -> (Bx, K_d)
        for i, blk in enumerate(self.depth):
            v = blk.step(v, self.d_kv[i], d, self.config.depth_heads)
        return self.heads[d](F.layer_norm(v, (self.config.width,), self.head_ln_w, self.head_ln_b))

    def decode_position(self, h: torch.Tensor, img_in: torch.Tensor,
                        sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
        """Depth transformer at one position t from h_t (Bx, C) -> codes (Bx, D), and img_in (the slot's
        PE row) plus sum_d input_mlp(e(S_{t,d})): the spatial input (Bx, C) at image slot L + t."""
        D = self.config.depth
        codes = torch.empty(self.rows, D, dtype=torch.long, device=h.device)
        v = h + self.pos_depth[0]  # (Bx, C)
        cum = self.head_bias  # head_mlp(E_{t,d}) accumulated as table rows
        for d in range(D):
            code = sampler.draw(self.depth_logits(v, d), d)  # (Bx,)
            codes[:, d] = code
            img_in = img_in + F.embedding(code, self.input_table[d])  # (Bx, C)
            if d + 1 < D:
                row = F.embedding(code, self.head_table[d])  # e.g. head_mlp(e_d(S_{t,d})) - bias
                cum = cum + row if self.cumulative else self.head_bias + row
                v = cum + self.pos_depth[d + 1]
        return codes, img_in


def generate_fast(model: nn.Module, cond: torch.Tensor, sampler: Sampler, dt: torch.dtype | None,
                  fs: FastSampler | None = None) -> torch.Tensor:
    """Codes (Bx, T, D) for a checked condition (Bx, L) of an RQTransformer; same maths as the reference.
    ``dt``: the matmul dtype; None picks the faster one per weight shape (see :func:`_linear`).
    ``fs``: a prepared sampler for Bx rows of this model (e.g. a
    :class:`~rqvae.models.generate_graphs.GraphSampler` kept across calls); default: a new FastSampler."""
    c = model.config
    T, L = c.num_positions, c.cond_len
    fs = fs if fs is not None else FastSampler(model, dt, cond.shape[0])
    x_cond = model.cond_emb(cond) + model.pos_cond  # (Bx, L, C): the condition tokens, one step each
    for j in range(L):
        h = fs.spatial_step(x_cond[:, j], j)
    out = []
    for t in range(T):  # h (Bx, C) = h_t
        codes, img_in = fs.decode_position(h, fs.pos_spatial[t], sampler)
        out.append(codes)
        if t + 1 < T:
            h = fs.spatial_step(img_in, L + t)  # image slot L + t
    return torch.stack(out, dim=1)  # (Bx, T, D)
