"""Converting official (kakaobrain/rq-vae-transformer) RQ-VAE checkpoints into :class:`RQVAE`.

Official folders are read by :mod:`rqvae.official.load`. The encoder/decoder/quant_conv/post_quant_conv
tensors keep their names.  The official quantizer stores, per depth d, ``quantizer.codebooks.{d}.weight``
with K + 1 rows (the last row is a padding vector that quantization never selects; dropped here),
``cluster_size_ema`` (K) and ``embed_ema`` (K, n_z); with a shared codebook all depths hold the same
tensors.  They become our quantizer's buffers ``codebook`` (n_books, K, n_z), ``ema_count`` (n_books, K)
and ``ema_sum`` (n_books, K, n_z). Without a shared codebook, ``hparams.n_embed`` can give each depth its
own size K_d (a list): ours keeps the books padded to K = max K_d rows (``codebook_sizes``, see
:mod:`rqvae.models.quantize_books`), and ``hparams.decay`` its own EMA decay (a list -> ``decays``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rqvae.errors import UserError
from rqvae.models.hub import load_state_dict_checked
from rqvae.models.vae import RQVAE, RQVAEConfig
from rqvae.official.load import check_supported, is_official_folder, load_official

# ddconfig fields we map, and the values we require for fields whose other values we do not implement
_DDCONFIG_FIELDS = {"double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                    "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv", "give_pre_end"}
_HPARAM_FIELDS = {"loss_type", "restart_unused_codes", "use_padding_idx", "masked_dropout", "bottleneck_type",
                  "embed_dim", "n_embed", "latent_shape", "code_shape", "shared_codebook", "decay",
                  "latent_loss_weight"}
_ARCH_FIELDS = {"type", "ema", "hparams", "ddconfig", "checkpointing", "code_hier"}


def _decays(hp: dict[str, Any], depth: int) -> dict[str, Any]:
    """hparams.decay: gamma, or a list with one per depth (the official RQBottleneck gives depth d's codebook
    the EMA decay decay[d] when shared_codebook is false) -> ema_decay, and decays when they differ."""
    value = hp.get("decay", 0.99)
    if not isinstance(value, (list, tuple)):
        return dict(ema_decay=float(value))
    decays = tuple(float(g) for g in value)
    if len(decays) != depth:  # the official RQBottleneck asserts this
        raise UserError(f"official hparams.decay={list(decays)} has {len(decays)} values for {depth} code "
                        "depths; the official code cannot build it either")
    if len(set(decays)) == 1:
        return dict(ema_decay=decays[0])
    if hp.get("shared_codebook", True):
        raise UserError(f"official hparams.decay={list(decays)} differs between depths with shared_codebook "
                        "true; the official code cannot build it either (set it false)")
    return dict(ema_decay=decays[0], decays=decays)


def _codebook_sizes(hp: dict[str, Any], depth: int) -> tuple[int, tuple[int, ...] | None]:
    """hparams.n_embed: K, or a list with K_d per depth (the official RQBottleneck builds one codebook of
    size K_d per depth when shared_codebook is false) -> (max K_d, the sizes or None when all equal)."""
    n_embed = hp.get("n_embed")
    if n_embed is None:
        raise UserError("official rq-vae config lacks 'hparams.n_embed'")
    if not isinstance(n_embed, (list, tuple)):
        return int(n_embed), None
    sizes = tuple(int(k) for k in n_embed)
    if len(sizes) != depth:  # the official RQBottleneck asserts this
        raise UserError(f"official hparams.n_embed={list(sizes)} has {len(sizes)} sizes for {depth} code "
                        "depths; the official code cannot build it either")
    if len(set(sizes)) > 1 and hp.get("shared_codebook", True):
        raise UserError(f"official hparams.n_embed={list(sizes)} differs between depths with "
                        "shared_codebook true; the official code cannot build it either (set it false)")
    return max(sizes), sizes if len(set(sizes)) > 1 else None


def rqvae_config_from_official(arch: dict[str, Any]) -> RQVAEConfig:
    """Map an official ``arch`` section (type rq-vae: ``ddconfig`` + ``hparams``) to :class:`RQVAEConfig`."""
    if arch.get("type") != "rq-vae":
        raise UserError(f"arch.type is {arch.get('type')!r}, not 'rq-vae'")
    unknown = sorted(set(arch) - _ARCH_FIELDS)
    dd, hp = arch.get("ddconfig"), arch.get("hparams")
    if not isinstance(dd, dict) or not isinstance(hp, dict):
        raise UserError("official rq-vae config lacks arch.ddconfig or arch.hparams")
    unknown += [f"ddconfig.{k}" for k in sorted(set(dd) - _DDCONFIG_FIELDS)]
    unknown += [f"hparams.{k}" for k in sorted(set(hp) - _HPARAM_FIELDS)]
    if unknown:
        raise UserError(f"official config has fields this converter does not know: {unknown}")
    checks = [("arch.code_hier", arch.get("code_hier", 1), 1),
              ("ddconfig.double_z", dd.get("double_z", False), False),
              ("ddconfig.resamp_with_conv", dd.get("resamp_with_conv", True), True),
              ("ddconfig.give_pre_end", dd.get("give_pre_end", False), False),
              ("hparams.bottleneck_type", hp.get("bottleneck_type", "rq"), "rq"),
              ("hparams.loss_type", hp.get("loss_type", "mse"), "mse"),
              ("hparams.use_padding_idx", hp.get("use_padding_idx", False), False),
              ("hparams.masked_dropout", float(hp.get("masked_dropout", 0.0)), 0.0)]
    for what, value, want in checks:
        check_supported(what, value, want)
    check_supported("ddconfig.out_ch", dd.get("out_ch", dd["in_channels"]), dd["in_channels"])
    try:
        code_shape, latent_shape = list(hp["code_shape"]), list(hp["latent_shape"])
        n_embed, sizes = _codebook_sizes(hp, int(code_shape[-1]))
        n = len(dd["ch_mult"])
        cfg = RQVAEConfig(image_size=int(dd["resolution"]), in_channels=int(dd["in_channels"]),
                          ch=int(dd["ch"]), ch_mult=tuple(dd["ch_mult"]),
                          num_res_blocks=int(dd["num_res_blocks"]),
                          attn_resolutions=tuple(dd.get("attn_resolutions", ())),
                          z_channels=int(dd["z_channels"]), embed_dim=int(hp["embed_dim"]),
                          codebook_size=n_embed, depth=int(code_shape[-1]),
                          shared_codebook=bool(hp.get("shared_codebook", True)), codebook_sizes=sizes,
                          **_decays(hp, int(code_shape[-1])),
                          restart_dead_codes=bool(hp.get("restart_unused_codes", True)),
                          commitment_weight=float(hp.get("latent_loss_weight", 0.25)),
                          dropout=float(dd.get("dropout", 0.0)))
    except KeyError as e:
        raise UserError(f"official rq-vae config lacks {e.args[0]!r}") from None
    h = cfg.image_size // 2 ** (n - 1)
    if latent_shape != [h, h, cfg.embed_dim] or code_shape[:2] != [h, h]:
        # the official bottleneck can regroup latents (latent_shape != code_shape); we quantize per position
        raise UserError(f"official latent_shape {latent_shape} / code_shape {code_shape} regroup latent "
                        f"positions, which is not supported (need [{h}, {h}, {cfg.embed_dim}] / "
                        f"[{h}, {h}, D])")
    return cfg


def convert_official_rqvae(state_dict: dict[str, torch.Tensor], arch: dict[str, Any]) -> RQVAE:
    """Build an :class:`RQVAE` from an official config ``arch`` section and its state dict."""
    cfg = rqvae_config_from_official(arch)
    model = RQVAE(cfg)
    D, K = cfg.depth, cfg.codebook_size
    n_books = 1 if cfg.shared_codebook else D
    state = {k: v for k, v in state_dict.items() if not k.startswith("quantizer.")}

    def get(name: str) -> torch.Tensor:
        if name not in state_dict:
            raise UserError(f"official state dict lacks {name!r}; does model.pt belong to config.yaml?")
        return state_dict[name]

    books, counts, sums = [], [], []
    for d in range(D):
        k = (cfg.codebook_sizes or (K,) * D)[d]  # K_d; depth d's tensors are padded to K rows (zeros)
        w = get(f"quantizer.codebooks.{d}.weight")
        if w.shape != (k + 1, cfg.embed_dim):
            raise UserError(f"quantizer.codebooks.{d}.weight has shape {tuple(w.shape)}, config expects "
                            f"({k + 1}, {cfg.embed_dim}) (K codes + 1 padding row)")
        books.append(F.pad(w[:k], (0, 0, 0, K - k)))  # drop the official padding row
        counts.append(F.pad(get(f"quantizer.codebooks.{d}.cluster_size_ema"), (0, K - k)))
        sums.append(F.pad(get(f"quantizer.codebooks.{d}.embed_ema"), (0, 0, 0, K - k)))
    if cfg.shared_codebook and not all(torch.equal(books[0], b) for b in books[1:]):
        raise UserError("config says shared_codebook but the official codebooks differ between depths")
    names = ("weight", "cluster_size_ema", "embed_ema")
    known = {f"quantizer.codebooks.{d}.{n}" for d in range(D) for n in names}
    extra = sorted(k for k in state_dict if k.startswith("quantizer.") and k not in known)
    if extra:
        raise UserError(f"official state dict has quantizer tensors this converter does not know: "
                        f"{extra[:3]}")
    state["quantizer.codebook"] = torch.stack(books[:n_books]).float().contiguous()  # (n_books, K, n_z)
    state["quantizer.ema_count"] = torch.stack(counts[:n_books]).float().contiguous()  # (n_books, K)
    state["quantizer.ema_sum"] = torch.stack(sums[:n_books]).float().contiguous()  # (n_books, K, n_z)
    # buffers of ours that the official layout has no counterpart for keep their initial values
    own = model.state_dict()
    for k, v in own.items():
        if k.startswith("quantizer.") and k not in state:
            state[k] = v
    load_state_dict_checked(model, state, source="official state dict")
    return model.eval()


def load_rqvae(path: str | os.PathLike) -> RQVAE:
    """An RQ-VAE folder: ours (config.json + model.safetensors) or an official one (model.pt +
    config.yaml, converted in memory)."""
    path = Path(path)
    if is_official_folder(path):
        return convert_official_rqvae(*load_official(path))
    return RQVAE.from_pretrained(path)
