"""Stage-2 losses (paper Eq. 14 with the soft labels of Eq. 15) and the random stream of a micro-batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ar_image_loss(logits: torch.Tensor, probs: torch.Tensor, codes: torch.Tensor,
                  soft_labels: bool = True) -> torch.Tensor:
    """Eq. 14: mean over (B, T, D) of the cross-entropy between targets and the predicted distribution.

    logits (B, T, D, K); probs (B, T, D, K) = Q_tau (soft targets); codes (B, T, D) (one-hot targets).
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, D, K)
    if soft_labels:
        return -(probs.to(logp.dtype) * logp).sum(-1).mean()
    return F.nll_loss(logp.reshape(-1, logp.shape[-1]), codes.reshape(-1))


def ar_text_loss(text_logits: torch.Tensor, tokens: torch.Tensor, pad: int) -> torch.Tensor:
    """Next-token NLL of the caption: text_logits (B, L-1, V) predict tokens[:, 1:]; [PAD] is ignored."""
    target = tokens[:, 1:].reshape(-1)  # (B (L-1),)
    nll = F.cross_entropy(text_logits.float().reshape(target.shape[0], -1), target, reduction="sum",
                          ignore_index=pad)
    return nll / (target != pad).sum().clamp_min(1)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The random stream of one training micro-batch on one rank (codes): a function of (seed, micro-batch
    index, rank) only, so a resumed run draws exactly what an uninterrupted run would."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
