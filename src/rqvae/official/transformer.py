"""Converting official (kakaobrain/rq-vae-transformer) RQ-Transformer checkpoints into :class:`RQTransformer`.

The official stage-2 model embeds codes with the paired RQ-VAE's codebook, which its checkpoint does not
hold, so conversion needs that RQ-VAE (ours or an official folder). Name map (official -> ours)::

    pos_emb_cond (1, L, C) / pos_emb_hw (1, T, C) / pos_emb_d (1, D, C) -> pos_cond / pos_spatial / pos_depth
    cond_emb, input_mlp, head_mlp                                       -> same names
    body_transformer.blocks.N.{ln1, ln2, attn.{query,key,value,proj}, mlp.{0,2}} -> spatial_blocks.N.(same)
    head_transformer.blocks.N.(same)                                    -> depth_blocks.N.(same)
    classifier.{layer_norm, linear}                                     -> head.{ln, linear}
    cond_classifier.{layer_norm, linear} (text models)                  -> text_head.{ln, linear}

Our forward reproduces the official logits to ~1e-6 (tests/test_official_transformer.py), which settled
two details: input_mlp is applied to each depth's embedding before the sum over depth, and head_mlp is
applied after the cumulative sum over depth.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from rqvae.errors import UserError
from rqvae.models.hub import load_state_dict_checked
from rqvae.models.transformer import RQTransformer, RQTransformerConfig
from rqvae.official.load import check_supported, load_official
from rqvae.official.vae import load_rqvae

# official arch options and the only values our model implements
_REQUIRED = {"input_emb_vqvae": True, "head_emb_vqvae": True, "cumsum_depth_ctx": True,
             "shared_tok_emb": True, "shared_cls_emb": True, "scaled_head_emb_vqvae": False,
             "use_padding_emb": False,
             "ar_hierarchy": None}
_BLOCK_REQUIRED = {"mlp_bias": True, "attn_bias": True, "gelu": "v1"}


def rqtransformer_config_from_official(arch: dict[str, Any], state_dict: dict[str, torch.Tensor]
                                       ) -> RQTransformerConfig:
    """Map an official ``arch`` section (type rq-transformer) to :class:`RQTransformerConfig`.

    The condition kind: text when the checkpoint has ``cond_classifier`` weights, unconditional when the
    condition vocabulary and length are 1, else class-conditional.
    """
    if arch.get("type") != "rq-transformer":
        raise UserError(f"arch.type is {arch.get('type')!r}, not 'rq-transformer'")
    for k, want in _REQUIRED.items():
        check_supported(k, arch.get(k, want), want)
    try:
        H, W, D = (int(s) for s in arch["block_size"])
        body, head = arch["body"], arch["head"]
        for name, part in (("body", body), ("head", head)):
            for k, want in _BLOCK_REQUIRED.items():
                check_supported(f"{name}.block.{k}", part["block"].get(k, want), want)
            check_supported(f"{name}.block.embed_dim", part["block"]["embed_dim"], arch["embed_dim"])
        check_supported("head.block.n_head", head["block"]["n_head"], body["block"]["n_head"])
        check_supported("head.block.resid_pdrop", head["block"]["resid_pdrop"], body["block"]["resid_pdrop"])
        n_cond, cond_len = int(arch["vocab_size_cond"]), int(arch["block_size_cond"])
        if any(k.startswith("cond_classifier.") for k in state_dict):
            cond = dict(cond_type="text", num_classes=1, text_vocab_size=n_cond, cond_len=cond_len)
        elif n_cond == 1 and cond_len == 1:
            cond = dict(cond_type="uncond", num_classes=1)
        else:
            cond = dict(cond_type="class", num_classes=n_cond, cond_len=cond_len)
        return RQTransformerConfig(
            code_shape=(H, W, D), vocab_size=int(arch["vocab_size"]), embed_dim=int(arch["input_embed_dim"]),
            width=int(arch["embed_dim"]), n_spatial_layers=int(body["n_layer"]),
            n_depth_layers=int(head["n_layer"]), n_heads=int(body["block"]["n_head"]),
            dropout=float(body["block"]["resid_pdrop"]), attn_dropout=float(body["block"]["attn_pdrop"]),
            cfg_dropout=0.0, **cond)
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
                                   codebook: torch.Tensor | None = None) -> RQTransformer:
    """Official stage-2 state dict + arch + the paired RQ-VAE codebook (K, n_z) -> RQTransformer (eval mode).

    ``codebook`` may also be our quantizer's (n_books, K, n_z) buffer (shared codebook) or the official
    (K + 1, n_z) tensor whose last row is padding; see :func:`load_codebook`.
    """
    if codebook is None:
        raise UserError("an official RQ-Transformer embeds codes with its RQ-VAE's codebook, which its "
                        "checkpoint lacks; pass the paired RQ-VAE folder (--vae DIR)")
    config = rqtransformer_config_from_official(arch, state_dict)
    codebook = _as_shared_codebook(codebook, config.vocab_size)
    state = {}
    for k, v in state_dict.items():
        name = _rename(k)
        state[name] = v[0] if name in ("pos_cond", "pos_spatial", "pos_depth") else v
    state["codebook"] = codebook
    model = RQTransformer(config, codebook=codebook)
    load_state_dict_checked(model, state, source="official rq-transformer state dict")
    return model.eval()


def _as_shared_codebook(codebook: torch.Tensor, vocab_size: int) -> torch.Tensor:
    cb = codebook.detach().float()
    if cb.dim() == 3:  # (n_books, K, n_z): one codebook shared by all depths
        if cb.shape[0] > 1 and not all(torch.equal(cb[0], cb[i]) for i in range(1, cb.shape[0])):
            raise UserError("the RQ-VAE has a separate codebook per depth; the RQ-Transformer needs one "
                            "shared codebook")
        cb = cb[0]
    if cb.dim() != 2:
        raise UserError(f"a codebook must be (K, n_z), got shape {tuple(codebook.shape)}")
    if cb.shape[0] == vocab_size + 1:  # official layout: the last row is padding
        cb = cb[:-1]
    if cb.shape[0] != vocab_size:
        raise UserError(f"the RQ-VAE codebook has {cb.shape[0]} codes but the RQ-Transformer has vocab_size "
                        f"{vocab_size}; pass the RQ-VAE it was trained with")
    return cb.contiguous()


def load_codebook(vae_dir: str | os.PathLike) -> torch.Tensor:
    """The shared codebook (K, n_z) of an RQ-VAE folder: ours (config.json + model.safetensors) or an
    official one (model.pt + config.yaml)."""
    cb = load_rqvae(vae_dir).quantizer.codebook.detach()  # (n_books, K, n_z)
    return _as_shared_codebook(cb, cb.shape[1])


def convert_official_rqtransformer_dir(src_dir: str | os.PathLike, vae_dir: str | os.PathLike,
                                       weights: str = "auto") -> RQTransformer:
    """Read an official stage-2 folder and its paired RQ-VAE folder -> RQTransformer."""
    state, arch = load_official(src_dir, weights)
    return convert_official_rqtransformer(state, arch, load_codebook(vae_dir))
