"""The RQ-Transformer (Lee et al., CVPR 2022, Sec. 3.2): a spatial transformer over the H*W positions
and a depth transformer over the D residual codes of each position.

Notation: codes S (B, H, W, D) with T = H*W positions in raster order, code embeddings e(k) = the
frozen RQ-VAE codebook row k (n_z wide).

Spatial transformer (Eq. 10-11). The condition tokens c_1..c_L are prepended; the input at the
image slot for position t is ``u(S_t) = sum_d input_mlp(e(S_{t,d}))`` plus ``PE_T(t)`` and the
sequence is shifted by one, so the output h_t that predicts position t sees the condition and S_{<t} only::

    seq = [cond_emb(c_1) + PE_c(1), ..., cond_emb(c_L) + PE_c(L),
           u(S_0) + PE_T(0), ..., u(S_{T-2}) + PE_T(T-2)]
    h_t = SpatialTransformer(seq)[L - 1 + t]                      t = 0..T-1

The learned PE of an image slot is the PE of the code that fills it, and input_mlp is applied to
each depth's embedding before the sum (its bias counts D times): both as in the official code, checked
against its logits; a learned table makes this the same family as the paper's PE_T(t) + e(S_{t-1}).

Depth transformer (Eq. 12-13). For each position t, with the cumulative sum over depth
E_{t,d} = sum_{d' <= d} e(S_{t,d'}) (the partial RQ-VAE reconstruction)::

    v_{t,0} = h_t + PE_D(0),   v_{t,d} = head_mlp(E_{t,d-1}) + PE_D(d)   (d = 1..D-1)

(head_mlp acts on the cumulative sum, so its bias counts once).
    p(S_{t,d} | S_{<t}, S_{t,<d}) = softmax(Linear(LN(DepthTransformer(v_t)[d])))

The output head is shared by all depths. Both stacks are pre-LN GPT blocks with causal masks.
Text models also predict the next text token from the spatial outputs at the condition slots.

Sampling (:meth:`RQTransformer.generate`) keeps static key/value caches in both stacks (:class:`KVCache`),
so each step runs one new token through each layer. The reference decode here (``_generate_reference``:
``setup_caches``, ``spatial_step``, ``decode_one_position``) uses the blocks above; the optimised one in
:mod:`rqvae.models.generate_fast` packs the same weights for speed, and tests/models/test_generate.py
keeps the two drawing identical codes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from rqvae.errors import UserError
from rqvae.models.generate_fast import generate_fast
from rqvae.models.generate_graphs import graph_sampler
from rqvae.models.hub import PretrainedMixin
from rqvae.models.sampling import Sampler, default_dtype
from rqvae.models.transformer_blocks import Block, KVCache, OutputHead
from rqvae.models.transformer_config import AR_PRESETS, RQTransformerConfig


class RQTransformer(PretrainedMixin, nn.Module):
    """Stage-2 model. ``RQTransformer(config, codebook)`` with the RQ-VAE codebook (K, n_z).

    The codebook is stored as a (frozen) buffer, so a saved model is self-contained; without one the
    buffer is zeros, to be filled by ``from_pretrained`` / ``load_state_dict``. With
    ``config.per_depth_codebooks`` it is (D, K, n_z), one codebook per depth.
    """

    config_class: ClassVar[type] = RQTransformerConfig
    model_type: ClassVar[str] = "rqtransformer"

    def __init__(self, config: RQTransformerConfig, codebook: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        H, W, D = c.code_shape
        if codebook is None:
            codebook = torch.zeros(c.codebook_shape)
        codebook = codebook.detach().float()
        if codebook.dim() == 3 and codebook.shape[0] == 1:  # a shared ResidualQuantizer codebook (1, K, n_z)
            codebook = codebook[0]
        if tuple(codebook.shape) != c.codebook_shape:
            raise UserError(f"codebook has shape {tuple(codebook.shape)}, the config expects "
                            f"{'(depth, ' if c.per_depth_codebooks else '('}vocab_size, embed_dim) = "
                            f"{c.codebook_shape}; pass the RQ-VAE that the codes come from")
        self.register_buffer("codebook", codebook.clone())  # (K, n_z) or (D, K, n_z), frozen

        n_cond = c.cond_vocab + (1 if c.has_null_cond else 0)
        self.cond_emb = nn.Embedding(n_cond, c.width)
        self.pos_cond = nn.Parameter(torch.zeros(c.cond_len, c.width))
        self.pos_spatial = nn.Parameter(torch.zeros(H * W, c.width))
        self.pos_depth = nn.Parameter(torch.zeros(D, c.width))
        if c.input_emb == "codebook":
            self.input_mlp = nn.Linear(c.embed_dim, c.width)  # spatial input: project each depth, then sum
        if c.depth_emb == "codebook":
            self.head_mlp = nn.Linear(c.embed_dim, c.width)  # depth input: cumulative sum, then project
        if c.learned_tok_emb:  # learned code embeddings; per depth: depth d's K_d rows follow those of d - 1
            self.tok_emb = nn.Embedding(sum(c.depth_vocab) if c.per_depth_tok_emb else c.vocab_size, c.width)
            offsets = [sum(c.depth_vocab[:d]) for d in range(D)]
            self.register_buffer("tok_offsets", torch.tensor(offsets), persistent=False)  # (D,)
        self.drop = nn.Dropout(c.dropout)
        drop = (c.attn_dropout, c.dropout)
        self.spatial_blocks = nn.ModuleList(  # biases and GELU per stack
            Block(c.width, c.n_heads, *drop, **c.block_options("spatial")) for _ in range(c.n_spatial_layers))
        self.depth_blocks = nn.ModuleList(
            Block(c.width, c.depth_heads, *drop, **c.block_options("depth")) for _ in range(c.n_depth_layers))
        self.head = OutputHead(c.width, c.vocab_size, depth=D if c.per_depth_head else None,
                               sizes=c.codebook_sizes)
        self.text_head = OutputHead(c.width, c.text_vocab_size) if c.cond_type == "text" else None
        if self.codebook.device.type != "meta":  # nothing to initialise when only counting parameters
            self.apply(self._init_weights)
            for p in (self.pos_cond, self.pos_spatial, self.pos_depth):
                nn.init.normal_(p, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @classmethod
    def from_preset(cls, name: str, codebook: torch.Tensor | None = None, **overrides) -> RQTransformer:
        if name not in AR_PRESETS:
            raise UserError(f"unknown RQ-Transformer preset {name!r}; choose one of {sorted(AR_PRESETS)}")
        return cls(replace(AR_PRESETS[name], **overrides), codebook=codebook)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------------------------------- checks
    # Value-range checks read tensors back (int(t.min())): free on a CPU, a device sync on a GPU. The
    # entry points (generate, the CLI) check values; forward checks them only for CPU tensors.
    def check_codes(self, codes: torch.Tensor, *, values: bool = True) -> None:
        """Codes (B, H, W, d) with 1 <= d <= D (the first d depths: the codec's entropy model of a prefix)."""
        c = self.config
        H, W, D = c.code_shape
        if codes.dim() != 4 or tuple(codes.shape[1:3]) != (H, W) or not 1 <= codes.shape[3] <= D:
            raise UserError(f"codes have shape {tuple(codes.shape)}, the model expects (B, *{c.code_shape}); "
                            "encode with the RQ-VAE this model was trained on")
        if codes.dtype.is_floating_point:
            raise UserError("codes must be integer tensors")
        if values and codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= c.vocab_size):
            raise UserError(f"codes must lie in [0, {c.vocab_size}), got range "
                            f"[{int(codes.min())}, {int(codes.max())}]")
        sizes = torch.tensor(c.depth_vocab[:codes.shape[3]], device=codes.device)
        if values and c.codebook_sizes and bool((codes >= sizes).any()):
            raise UserError(f"codes of depth d must lie in [0, K_d), K = {list(c.depth_vocab)}; encode with "
                            "the RQ-VAE this model was trained on")

    def check_cond(self, cond: torch.Tensor | int | None, batch_size: int | None = None,
                   allow_null: bool = False, *, values: bool = True) -> torch.Tensor:
        """Validate (and build) the condition: (B,) class ids, (B, L) text ids, or None / zeros for uncond."""
        c = self.config
        device = self.codebook.device
        if c.cond_type == "uncond":
            if values and torch.is_tensor(cond) and cond.numel() and int(cond.abs().max()) != 0:
                raise UserError("this model is unconditional; do not pass a class or text")
            if batch_size is None:
                batch_size = cond.shape[0] if torch.is_tensor(cond) else 1
            return torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        if cond is None:
            raise UserError(f"this model is {c.cond_type}-conditional; pass a "
                            f"{'class id' if c.cond_type == 'class' else 'text'}")
        cond = torch.as_tensor(cond, device=device)
        if cond.dtype.is_floating_point:
            raise UserError("conditions must be integer ids")
        hi = c.cond_vocab + (1 if (allow_null and c.has_null_cond) else 0)
        if c.cond_type == "class":
            if cond.dim() == 0:
                cond = cond.expand(batch_size or 1)
            if cond.dim() == 2 and cond.shape[1] == 1:
                cond = cond[:, 0]
            if cond.dim() != 1:
                raise UserError(f"class conditions must have shape (B,), got {tuple(cond.shape)}")
            if values and cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= hi):
                raise UserError(f"class id out of range: the model has classes 0..{c.num_classes - 1}")
            cond = cond[:, None]
        else:
            if cond.dim() == 1:
                cond = cond[None].expand(batch_size or 1, -1)
            if cond.dim() != 2 or cond.shape[1] != c.cond_len:
                raise UserError(f"text conditions must have shape (B, {c.cond_len}), "
                                f"got {tuple(cond.shape)}; encode the text with the model's tokenizer.json")
            if values and cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= hi):
                raise UserError(f"text token ids must lie in [0, {c.text_vocab_size})")
        if batch_size is not None and cond.shape[0] != batch_size:
            raise UserError(f"got {cond.shape[0]} conditions for a batch of {batch_size}")
        return cond.long()  # (B, L)

    def null_cond(self, batch_size: int) -> torch.Tensor:
        """The null condition (B, L) for classifier-free guidance."""
        return torch.full((batch_size, self.config.cond_len), self.config.null_id, dtype=torch.long,
                          device=self.codebook.device)

    # ---------------------------------------------------------------------------------------- forward
    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """e(S): (..., d) -> (..., d, n_z), rows of the frozen codebook (of depth 0..d-1 with per-depth
        codebooks)."""
        if self.config.per_depth_codebooks:
            return self.codebook[torch.arange(codes.shape[-1], device=codes.device), codes]
        return F.embedding(codes, self.codebook)

    def _tok_emb(self, codes: torch.Tensor) -> torch.Tensor:
        """Learned embeddings of codes (..., d) of depths 0..d-1 -> (..., d, C)."""
        if self.config.per_depth_tok_emb:
            codes = codes + self.tok_offsets[:codes.shape[-1]]
        return self.tok_emb(codes)

    def input_embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Spatial-input terms of codes (..., d) -> (..., d, C), to be summed over depth."""
        if self.config.input_emb == "learned":
            return self._tok_emb(codes)
        return self.input_mlp(self.embed_codes(codes))

    def depth_embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Depth-input terms (..., d) -> (..., d, C): the entry d feeds depth slot d + 1 (head_mlp(E_{t,d}),
        head_mlp(e(S_{t,d})) without cumsum_depth, or the learned embedding of S_{t,d})."""
        if self.config.depth_emb == "learned":
            return self._tok_emb(codes)
        emb = self.embed_codes(codes)
        return self.head_mlp(emb.cumsum(dim=-2) if self.config.cumsum_depth else emb)

    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None,
                return_cond_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits.

        codes (B, H, W, D) int64, cond: (B,) class ids, (B, L) text ids, or None for unconditional models.
        Returns logits (B, H*W, D, K); codes of only the first d < D depths give (B, H*W, d, K), the
        spatial inputs then summing those d depths (an entropy model of the depth prefix). With
        ``return_cond_logits=True`` (text models) also the next-token logits of the text,
        (B, L-1, text_vocab): position i predicts text token i+1.
        In training mode with ``cfg_dropout > 0`` each condition is replaced by the null condition with
        that probability (classifier-free guidance training).
        """
        c = self.config
        on_cpu = codes.device.type == "cpu"
        self.check_codes(codes, values=on_cpu)
        B, H, W, D = codes.shape  # D: the config's depth, or a prefix of it
        T, L = H * W, c.cond_len
        cond = self.check_cond(cond, batch_size=B, allow_null=True, values=on_cpu)  # (B, L)
        if self.training and c.cfg_dropout > 0:
            drop = torch.rand(B, 1, device=cond.device) < c.cfg_dropout
            cond = torch.where(drop, torch.full_like(cond, c.null_id), cond)

        codes = codes.reshape(B, T, D)
        x_img = self.input_embed(codes).sum(dim=2) + self.pos_spatial  # (B, T, C)
        x = torch.cat([self.cond_emb(cond) + self.pos_cond, x_img[:, :-1]], dim=1)  # (B, L+T-1, C)
        x = self.drop(x)
        for blk in self.spatial_blocks:
            x = blk(x)
        h = x[:, L - 1:]  # (B, T, C): h_t predicts position t

        ctx = self.depth_embed(codes[:, :, :-1])  # (B, T, D-1, C): e.g. head_mlp(E_{t,d-1}) at slot d
        v = torch.cat([h[:, :, None], ctx], dim=2) + self.pos_depth[:D]  # (B, T, D, C)
        v = self.drop(v).reshape(B * T, D, -1)
        for blk in self.depth_blocks:
            v = blk(v)
        logits = self.head(v).reshape(B, T, D, -1)  # (B, T, D, K)
        if not return_cond_logits:
            return logits
        if self.text_head is None:
            raise UserError("return_cond_logits needs a text-conditional model")
        return logits, self.text_head(x[:, :L - 1])  # (B, L-1, text_vocab)

    # --------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, cond: torch.Tensor | int | None = None, batch_size: int | None = None, *,
                 temperature: float | list[float] = 1.0, top_k: int | list[int | None] | None = None,
                 top_p: float | list[float | None] | None = None, cfg_scale: float = 1.0,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                 impl: str = "auto") -> torch.Tensor:
        """Sample codes (B, H, W, D) autoregressively: raster order over positions, then depth.

        cond: (B,) class ids / (B, L) text ids / an int class id with ``batch_size`` / None (uncond).
        temperature, top_k, top_p: a scalar or a list with one value per depth.
        cfg_scale: classifier-free guidance, logits = l_uncond + s * (l_cond - l_uncond); the conditional
        and null-conditional batches run together (needs a model trained with cfg_dropout).
        generator: a torch.Generator on the model's device for reproducible samples.
        dtype: compute dtype of the matmuls. Default (None): bfloat16 on CUDA; on a CPU the faster of
        float32 and bfloat16, measured once per machine (per weight shape on the fast path, see
        :mod:`rqvae.models.step_linear`; bf16 only where the CPU has bf16 instructions and it wins).
        LayerNorm, softmax and the residual stream stay float32 (as autocast does).
        impl: "reference" runs :meth:`_generate_reference` (this module's blocks with KV caches), "fast"
        the optimised :func:`rqvae.models.generate_fast.generate_fast` (same maths, packed weights, 1.1-3x
        faster on a CPU at batch 8); "auto" picks the fast one. Both draw the same codes in fp32.
        "graphs" (CUDA only): the fast sampler with every step recorded as a CUDA graph and replayed
        (:mod:`rqvae.models.generate_graphs`), kept for later calls with the same batch size and weights.
        """
        if impl not in ("auto", "reference", "fast", "graphs"):
            raise UserError(f"impl must be 'auto', 'reference', 'fast' or 'graphs', got {impl!r}")
        device = self.codebook.device
        cond = self.check_cond(cond, batch_size=batch_size)  # (B, L)
        B = cond.shape[0]
        sampler = Sampler.build(self.config.depth, B, temperature=temperature, top_k=top_k, top_p=top_p,
                                cfg_scale=cfg_scale, generator=generator)
        if generator is not None and generator.device.type != device.type:
            raise UserError(f"the generator is on {generator.device} but the model is on {device}; "
                            f"create it with torch.Generator(device={str(device)!r})")
        if sampler.guided:
            cond = torch.cat([cond, self.null_cond(B)], dim=0)  # (2B, L): conditional, then null
        with torch.inference_mode():
            if impl == "reference":
                out = self._generate_reference(cond, sampler, dtype or default_dtype(device))
            elif impl == "graphs":
                out = generate_fast(self, cond, sampler, dtype,
                                    fs=graph_sampler(self, dtype, cond.shape[0]))  # (Bx, T, D)
            else:
                out = generate_fast(self, cond, sampler, dtype)  # (Bx, T, D)
        return out[:B].reshape(B, *self.config.code_shape).clone()  # clone: a normal tensor, not an
        # inference tensor (those cannot be used in autograd later)

    def setup_caches(self, batch_size: int, dtype: torch.dtype) -> tuple[list[KVCache], list[KVCache]]:
        """Static caches for one generate call: L + T - 1 slots per spatial layer (the condition and every
        image slot but the last), D slots per depth layer (reused at every position)."""
        c = self.config
        kw = dict(dtype=dtype, device=self.codebook.device)
        slots = c.cond_len + c.num_positions - 1
        spatial = [KVCache(batch_size, c.n_heads, slots, c.width // c.n_heads, **kw)
                   for _ in self.spatial_blocks]
        depth = [KVCache(batch_size, c.depth_heads, c.depth, c.width // c.depth_heads, **kw)
                 for _ in self.depth_blocks]
        return spatial, depth

    def spatial_step(self, x: torch.Tensor, caches: list[KVCache], pos: int) -> torch.Tensor:
        """Spatial stack on the tokens of slots pos..pos+n-1: x (B, n, C) -> (B, n, C)."""
        for blk, cache in zip(self.spatial_blocks, caches):
            x = blk(x, cache, pos)
        return x

    def decode_one_position(self, h: torch.Tensor, caches: list[KVCache], sampler: Sampler) -> torch.Tensor:
        """Depth transformer at one position: h_t (B, C) -> codes S_t (B, D), each depth sampled before the
        next one's input v_{t,d} = head_mlp(E_{t,d-1}) + PE_D(d) is built."""
        B, D = h.shape[0], self.config.depth
        codes = torch.empty(B, D, dtype=torch.long, device=h.device)
        v = h + self.pos_depth[0]  # (B, C): v_{t,0}
        for d in range(D):
            y = v[:, None]  # (B, 1, C) at depth slot d
            for blk, cache in zip(self.depth_blocks, caches):
                y = blk(y, cache, d)
            codes[:, d] = sampler.draw(self.head.at_depth(y[:, 0], d), d)  # logits (B, K) -> (B,)
            if d + 1 < D:
                v = self.depth_embed(codes[:, :d + 1])[:, d] + self.pos_depth[d + 1]  # (B, C): v_{t,d+1}
        return codes

    def _generate_reference(self, cond: torch.Tensor, sampler: Sampler, dt: torch.dtype) -> torch.Tensor:
        """The readable sampler: codes (Bx, T, D) for a checked condition (Bx, L), in eval mode.

        Prefill the L condition tokens, then per position t: sample S_t with the depth stack from h_t, and
        run the image slot L + t (input u(S_t) + PE_T(t)) through the spatial stack to get h_{t+1}.
        Matmuls run in ``dt`` under autocast; LayerNorm and softmax stay fp32.
        """
        c = self.config
        T, L = c.num_positions, c.cond_len
        device = self.codebook.device
        spatial_caches, depth_caches = self.setup_caches(cond.shape[0], dt)
        with torch.autocast(device.type, dtype=dt, enabled=dt != torch.float32):
            x = self.cond_emb(cond) + self.pos_cond  # (Bx, L, C)
            h = self.spatial_step(x, spatial_caches, 0)[:, -1].float()  # prefill -> h_0 (Bx, C)
            out = []
            for t in range(T):
                codes = self.decode_one_position(h, depth_caches, sampler)  # (Bx, D)
                out.append(codes)
                if t + 1 < T:
                    x = self.input_embed(codes).sum(dim=1) + self.pos_spatial[t]  # (Bx, C)
                    h = self.spatial_step(x[:, None], spatial_caches, L + t)[:, 0].float()  # h_{t+1}
        return torch.stack(out, dim=1)  # (Bx, T, D)


def count_sampling_flops(config: RQTransformerConfig, batch_size: int, cfg: bool = False) -> int:
    """Multiply-add FLOPs (2 per MAC) of :meth:`RQTransformer.generate` for one batch: the matmuls of all
    blocks (projections, MLP, attention scores and values over the cached prefix) and the output head."""
    c = config
    H, W, D = c.code_shape
    T, L, C = H * W, c.cond_len, c.width
    Bx = batch_size * (2 if cfg else 1)
    per_token_block = 2 * 12 * C * C  # qkv 3C^2 + proj C^2 + MLP 8C^2
    flops = 0
    # spatial: tokens at slots 0..L+T-2, each attends to slots 0..itself
    for slot in range(L + T - 1):
        flops += c.n_spatial_layers * (per_token_block + 2 * 2 * (slot + 1) * C)
    for d in range(D):
        flops += T * c.n_depth_layers * (per_token_block + 2 * 2 * (d + 1) * C)
    flops += T * 2 * C * sum(c.depth_vocab)
    return Bx * flops


__all__ = ["AR_PRESETS", "RQTransformer", "RQTransformerConfig", "count_sampling_flops"]
