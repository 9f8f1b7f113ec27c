"""Converting official (kakaobrain/rq-vae-transformer) RQ-Transformer checkpoints into :class:`RQTransformer`.

The official stage-2 model embeds codes with the paired RQ-VAE's codebook, which its checkpoint does not
hold, so conversion needs that RQ-VAE (ours or an official folder). Name map (official -> ours)::

    pos_emb_cond (1, L, C) / pos_emb_hw (1, T, C) / pos_emb_d (1, D, C) -> pos_cond / pos_spatial / pos_depth
    cond_emb, input_mlp, head_mlp                                       -> same names
    body_transformer.blocks.N.{ln1, ln2, attn.{query,key,value,proj}, mlp.{0,2}} -> spatial_blocks.N.(same)
    head_transformer.blocks.N.(same)                                    -> depth_blocks.N.(same)
    classifier.{layer_norm, linear}                                     -> head.{ln, linear}
      (shared_cls_emb false: linear is a BatchLinear, weight (D, C, K) -> our DepthLinear (D, K, C))
    cond_classifier.{layer_norm, linear} (text models)                  -> text_head.{ln, linear}

Our forward reproduces the official logits to ~1e-6 (tests/official/test_official_transformer.py), which
settled two details: input_mlp is applied to each depth's embedding before the sum over depth, and head_mlp is
applied after the cumulative sum over depth.

Architecture options (official name -> ours): ``body.block.{attn_bias, mlp_bias}`` -> attn_bias / mlp_bias,
``gelu`` v1 (exact erf GELU) / v2 (``x * sigmoid(1.702 x)``) -> gelu "exact" / "sigmoid"; the ``head.block``
values (and ``n_head``) -> depth_attn_bias / depth_mlp_bias / depth_gelu / n_depth_heads where they differ;
``cumsum_depth_ctx`` -> cumsum_depth, ``shared_cls_emb: false`` -> per_depth_head, an RQ-VAE with
``shared_codebook: false`` -> per_depth_codebooks. ``scaled_head_emb_vqvae``, ``use_padding_emb`` and
``ar_hierarchy`` are declared by the official config but read by no model code, so any value converts.
Missing options take the official defaults. Dropout rates act only in training: the body's ``resid_pdrop`` /
``attn_pdrop`` become ours; the head stack's own rates and ``embd_pdrop`` are not kept.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from rqvae.errors import UserError
from rqvae.models.hub import load_state_dict_checked
from rqvae.models.transformer import RQTransformer, RQTransformerConfig
from rqvae.official.load import load_official
from rqvae.official.vae import load_rqvae

# options the official model code declares but never reads (any value builds the same network)
_UNUSED = ("scaled_head_emb_vqvae", "use_padding_emb", "ar_hierarchy")
_GELU = {"v1": "exact", "v2": "sigmoid"}  # official AttentionBlockConfig.gelu -> ours


def _block_options(arch: dict[str, Any]) -> dict[str, Any]:
    """Options of the official ``body`` / ``head`` stacks -> RQTransformerConfig fields.

    The official code builds each stack from its own block config: the head stack's head count, biases and
    GELU become the depth_* fields when they differ from the body's (None: the same).
    """
    width = int(arch["embed_dim"])
    blocks = {name: {"mlp_bias": True, "attn_bias": True, "gelu": "v1", "embed_dim": width,
                     **arch[name]["block"]} for name in ("body", "head")}
    for name, b in blocks.items():
        if int(b["embed_dim"]) != width:  # its stacks then get inputs of the wrong width and fail
            raise UserError(f"official config {name}.block.embed_dim={b['embed_dim']} differs from "
                            f"embed_dim={width}; the official model cannot run such a config either")
        if b["gelu"] not in _GELU:
            raise UserError(f"official config {name}.block.gelu={b['gelu']!r} is not one of {sorted(_GELU)}; "
                            "the official code rejects it too")
    body, head = blocks["body"], blocks["head"]

    def own(key: str, convert=bool) -> Any:  # the head stack's value where it differs from the body's
        return convert(head[key]) if convert(head[key]) != convert(body[key]) else None

    return dict(n_heads=int(body["n_head"]), n_depth_heads=own("n_head", int),
                attn_bias=bool(body["attn_bias"]), mlp_bias=bool(body["mlp_bias"]),
                gelu=_GELU[body["gelu"]], depth_attn_bias=own("attn_bias"), depth_mlp_bias=own("mlp_bias"),
                depth_gelu=own("gelu", _GELU.get), dropout=float(body.get("resid_pdrop", 0.1)),
                attn_dropout=float(body.get("attn_pdrop", 0.0)))


def _cond_options(arch: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Text when the checkpoint has ``cond_classifier`` weights, unconditional when the condition vocabulary
    and length are 1, else class-conditional."""
    n_cond, cond_len = int(arch["vocab_size_cond"]), int(arch["block_size_cond"])
    if any(k.startswith("cond_classifier.") for k in state_dict):
        return dict(cond_type="text", num_classes=1, text_vocab_size=n_cond, cond_len=cond_len)
    if max(n_cond, 1) == 1 and max(cond_len, 1) == 1:
        return dict(cond_type="uncond", num_classes=1)
    return dict(cond_type="class", num_classes=n_cond, cond_len=cond_len)


def _embedding_options(arch: dict[str, Any]) -> dict[str, Any]:
    """``input_emb_vqvae`` / ``head_emb_vqvae`` false: that side embeds codes with a learned table (tok_emb),
    one for all depths (``shared_tok_emb``) or one per depth; the depth side then has no cumulative sum."""
    kinds = {side: "codebook" if arch.get(f"{side}_emb_vqvae", False) else "learned"
             for side in ("input", "head")}
    learned = "learned" in kinds.values()
    return dict(input_emb=kinds["input"], depth_emb=kinds["head"],
                per_depth_tok_emb=learned and not arch.get("shared_tok_emb", False))


def needs_codebook(arch: dict[str, Any]) -> bool:
    """Whether the official model embeds codes with its RQ-VAE's codebook (on either input side)."""
    return bool(arch.get("input_emb_vqvae", False) or arch.get("head_emb_vqvae", False))


def _vocab_sizes(arch: dict[str, Any], depth: int) -> dict[str, Any]:
    """``vocab_size``: K, or a list with K_d per depth -> vocab_size (max K_d) and codebook_sizes.

    The official model builds different sizes only with ``shared_cls_emb`` and ``shared_tok_emb`` false (it
    asserts so): a BatchLinear of max K_d outputs and a TupleEmbedding of K_0 + ... + K_{D-1} rows. Its
    LogitMask, meant to mask depth d's logits beyond K_d, indexes the wrong axes (its forward fails when
    D > H and its sampler always fails); ours masks them as intended.
    """
    vocab = arch["vocab_size"]
    if not isinstance(vocab, (list, tuple)):
        return dict(vocab_size=int(vocab))
    sizes = tuple(int(k) for k in vocab)
    if len(sizes) != depth:
        raise UserError(f"official config vocab_size={list(sizes)} has {len(sizes)} sizes for {depth} code "
                        "depths; the official code cannot build it either")
    if len(set(sizes)) == 1:
        return dict(vocab_size=sizes[0])
    shared = [k for k in ("shared_cls_emb", "shared_tok_emb") if arch.get(k, False)]
    if shared:
        raise UserError(f"official config vocab_size={list(sizes)} differs between depths with {shared[0]} "
                        "true; the official code cannot build it either")
    return dict(vocab_size=max(sizes), codebook_sizes=sizes)


def rqtransformer_config_from_official(arch: dict[str, Any], state_dict: dict[str, torch.Tensor],
                                       per_depth_codebooks: bool = False) -> RQTransformerConfig:
    """Map an official ``arch`` section (type rq-transformer) to :class:`RQTransformerConfig`.

    ``per_depth_codebooks``: the paired RQ-VAE has one codebook per depth (its ``shared_codebook: false``).
    """
    if arch.get("type") != "rq-transformer":
        raise UserError(f"arch.type is {arch.get('type')!r}, not 'rq-transformer'")
    try:
        H, W, D = (int(s) for s in arch["block_size"])
        return RQTransformerConfig(
            code_shape=(H, W, D), **_vocab_sizes(arch, D),
            embed_dim=int(arch.get("input_embed_dim") or 1),
            width=int(arch["embed_dim"]), n_spatial_layers=int(arch["body"]["n_layer"]),
            n_depth_layers=int(arch["head"]["n_layer"]), cfg_dropout=0.0,
            cumsum_depth=bool(arch.get("cumsum_depth_ctx", False)),
            per_depth_head=not arch.get("shared_cls_emb", False), per_depth_codebooks=per_depth_codebooks,
            **_embedding_options(arch),
            **_block_options(arch), **_cond_options(arch, state_dict))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"official rq-transformer config is missing or has a malformed field ({e!r}); "
                        "is it the arch section of an official stage-2 config?") from None


_POS_NAMES = {"pos_emb_cond": "pos_cond", "pos_emb_hw": "pos_spatial", "pos_emb_d": "pos_depth"}


def _rename(key: str) -> str:
    if key.startswith("pos_emb_"):
        return _POS_NAMES.get(key, key)
    for old, new in (("body_transformer.blocks.", "spatial_blocks."),
                     ("head_transformer.blocks.", "depth_blocks."),
                     ("classifier.layer_norm.", "head.ln."), ("classifier.linear.", "head.linear.")):
        if key.startswith("cond_" + old):  # cond_classifier.*: the text head
            return "text_" + new + key[len("cond_" + old):]
        if key.startswith(old):
            return new + key[len(old):]
    return key


def convert_official_rqtransformer(state_dict: dict[str, torch.Tensor], arch: dict[str, Any],
                                   codebook: torch.Tensor | None = None, *,
                                   vae_sizes: tuple[int, ...] | None = None) -> RQTransformer:
    """Official stage-2 state dict + arch + the paired RQ-VAE codebook -> RQTransformer (eval mode). A model
    with learned code embeddings on both sides (``input_emb_vqvae`` and ``head_emb_vqvae`` false) needs none.

    ``codebook``: (K, n_z), the official (K + 1, n_z) tensor whose last row is padding, or our quantizer's
    (n_books, K, n_z) buffer: one codebook per depth when n_books = D and they differ (see
    :func:`load_codebook`). ``vae_sizes``: the RQ-VAE's codebook size per depth (see
    :func:`load_vae_codebook`), which must equal the RQ-Transformer's.
    """
    uses_codebook = needs_codebook(arch)
    if uses_codebook and codebook is None:
        raise UserError("an official RQ-Transformer embeds codes with its RQ-VAE's codebook, which its "
                        "checkpoint lacks; pass the paired RQ-VAE folder (--vae DIR)")
    if not uses_codebook:  # learned embeddings on both sides: the official model never reads a codebook
        arch = {**arch, "input_embed_dim": 1}
    per_depth = uses_codebook and _codebooks_differ(codebook)
    config = rqtransformer_config_from_official(arch, state_dict, per_depth_codebooks=per_depth)
    codebook = _as_codebook(codebook, config.vocab_size, config.depth) if uses_codebook \
        else torch.zeros(config.codebook_shape)
    if vae_sizes is not None and tuple(vae_sizes) != config.depth_vocab:
        raise UserError(f"the RQ-VAE's codebook sizes per depth {list(vae_sizes)} differ from the "
                        f"RQ-Transformer's vocab_size {list(config.depth_vocab)}; pass the RQ-VAE it was "
                        "trained with")
    state = {}
    for k, v in state_dict.items():
        if k == "tok_emb.offsets":  # TupleEmbedding: depth d's rows from K_0 + ... + K_{d-1}, as ours
            continue
        name = _rename(k)
        if name in ("pos_cond", "pos_spatial", "pos_depth"):
            v = v[0]
        elif name == "head.linear.weight" and config.per_depth_head:
            v = v.transpose(1, 2)  # official BatchLinear (D, C, K) -> ours (D, K, C)
        state[name] = v
    state["codebook"] = codebook
    model = RQTransformer(config, codebook=codebook)
    load_state_dict_checked(model, state, source="official rq-transformer state dict")
    return model.eval()


def _codebooks_differ(codebook: torch.Tensor) -> bool:
    """True for (n_books, K, n_z) codebooks that are not all the same (an RQ-VAE with one per depth)."""
    return codebook.dim() == 3 and not all(torch.equal(codebook[0], c) for c in codebook[1:])


def _as_codebook(codebook: torch.Tensor, vocab_size: int, depth: int) -> torch.Tensor:
    """-> (K, n_z) for a shared codebook, (D, K, n_z) for per-depth ones; official padding rows dropped."""
    cb = codebook.detach().float()
    if cb.dim() == 3 and not _codebooks_differ(cb):  # (n_books, K, n_z): one codebook shared by all depths
        cb = cb[0]
    if cb.dim() not in (2, 3) or (cb.dim() == 3 and cb.shape[0] != depth):
        raise UserError(f"a codebook must be (K, n_z) or ({depth}, K, n_z) (one per depth), got shape "
                        f"{tuple(codebook.shape)}")
    if cb.shape[-2] == vocab_size + 1:  # official layout: the last row is padding
        cb = cb[..., :-1, :]
    if cb.shape[-2] != vocab_size:
        raise UserError(f"the RQ-VAE codebook has {cb.shape[-2]} codes but the RQ-Transformer has vocab_size "
                        f"{vocab_size}; pass the RQ-VAE it was trained with")
    return cb.contiguous()


def load_codebook(vae_dir: str | os.PathLike) -> torch.Tensor:
    """The codebook of an RQ-VAE folder, ours (config.json + model.safetensors) or an official one (model.pt
    + config.yaml): (K, n_z) when shared by all depths, else (D, K, n_z)."""
    return load_vae_codebook(vae_dir)[0]


def load_vae_codebook(vae_dir: str | os.PathLike) -> tuple[torch.Tensor, tuple[int, ...]]:
    """:func:`load_codebook` and the RQ-VAE's codebook size per depth (K_0, ..., K_{D-1})."""
    q = load_rqvae(vae_dir).quantizer
    cb = q.codebook.detach()  # (n_books, K, n_z)
    sizes = tuple(q.book_sizes[0 if q.shared_codebook else d] for d in range(q.depth))
    return (cb if _codebooks_differ(cb) else cb[0].contiguous()), sizes


def convert_official_rqtransformer_dir(src_dir: str | os.PathLike, vae_dir: str | os.PathLike,
                                       weights: str = "auto") -> RQTransformer:
    """Read an official stage-2 folder and its paired RQ-VAE folder -> RQTransformer."""
    state, arch = load_official(src_dir, weights)
    return convert_official_rqtransformer(state, arch, load_codebook(vae_dir))
