"""Entropy models of RQ codes and the range coder that uses them.

Codes are coded position by position in raster order, and within a position from depth 1 to d (the
order in which the RQ-Transformer factorises p(S)). Two probability models:

* :class:`AdaptiveModel`: per-depth code frequencies that start uniform (a count of 1 per code) and
  count every coded symbol. It needs nothing but K and D, so a tokenizer alone compresses.
* :class:`PriorModel`: the RQ-Transformer's p(S_{t,d} | S_{<t}, S_{t,<d}, c). The encoder gets every
  distribution from ONE teacher-forced forward pass; the decoder runs the same forward pass, with the
  codes it has so far and zeros in their place elsewhere, once per code. Causal masking makes the logits
  at (t, d) independent of the codes after it, and a forward pass of one fixed shape computes them with
  the same arithmetic, so both sides see bit-identical float32 logits. They are turned into probabilities
  in float64 and quantised by ``constriction`` (``perfect=False``), identically on both sides.

What must match between the machine that compresses and the one that decompresses (prior only): the
model files, torch's CPU kernels (same torch version and the same instruction set family, e.g. both AVX2
or both AVX-512) and float32 with one thread (set here). A mismatch does not go unnoticed: the codes'
CRC-32 in the header then fails and decompress says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import constriction
import numpy as np
import torch

from rqvae.errors import UserError


@contextlib.contextmanager
def reference_arithmetic() -> Iterator[None]:
    """One thread and inference mode: the fixed arithmetic encoder and decoder share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(threads)


def _categorical() -> constriction.stream.model.Categorical:
    return constriction.stream.model.Categorical(perfect=False)


def nll_bits(probs: np.ndarray, symbols: np.ndarray) -> float:
    """-sum log2 p(symbol) of the symbols (N,) under the rows of probs (N, K)."""
    p = probs[np.arange(len(symbols)), symbols] / probs.sum(axis=1)
    return float(-np.log2(p).sum())


def encode_symbols(symbols: np.ndarray, probs: np.ndarray) -> bytes:
    """Range-code symbols (N,) with one probability row (N, K) each."""
    enc = constriction.stream.queue.RangeEncoder()
    if len(symbols):
        enc.encode(symbols.astype(np.int32), _categorical(), probs.astype(np.float64))
    return enc.get_compressed().astype("<u4").tobytes()


class Decoder:
    """Decodes one symbol at a time, each with the probability row the caller computes next."""

    def __init__(self, payload: bytes) -> None:
        if len(payload) % 4:
            raise UserError("the payload is not a whole number of 32-bit words; the file is damaged")
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        self._dec = constriction.stream.queue.RangeDecoder(words)

    def __call__(self, probs: np.ndarray) -> int:  # probs (K,)
        return int(self._dec.decode(_categorical(), probs[None].astype(np.float64))[0])


# ------------------------------------------------------------------------------------------ adaptive
class AdaptiveModel:
    """Per-depth adaptive frequencies (Laplace counts), the model used without an RQ-Transformer."""

    def __init__(self, codebook_size: int, depth: int) -> None:
        self.counts = np.ones((depth, codebook_size), dtype=np.float64)  # exact integers

    def _row(self, d: int, symbol: int | None) -> np.ndarray:
        row = self.counts[d] / self.counts[d].sum()
        if symbol is not None:
            self.counts[d, symbol] += 1
        return row

    def encode_probs(self, codes: np.ndarray) -> np.ndarray:
        """codes (T, d) -> probability rows (T*d, K) in coding order."""
        T, d = codes.shape
        return np.stack([self._row(j, int(codes[t, j])) for t in range(T) for j in range(d)])

    def decode(self, decoder: Decoder, T: int, d: int) -> np.ndarray:
        codes = np.zeros((T, d), dtype=np.int64)
        for t in range(T):
            for j in range(d):
                row = self.counts[j] / self.counts[j].sum()
                codes[t, j] = decoder(row)
                self.counts[j, codes[t, j]] += 1
        return codes


# --------------------------------------------------------------------------------------------- prior
def _probs64(logits: torch.Tensor) -> np.ndarray:
    """float32 logits (..., K) -> float64 probabilities, computed the same way on both sides."""
    return torch.softmax(logits.double(), dim=-1).numpy()


class PriorModel:
    """The RQ-Transformer as the entropy model of the first ``depth`` codes of every position."""

    def __init__(self, prior: torch.nn.Module, cond: torch.Tensor | None, depth: int) -> None:
        self.prior = prior.eval()
        self.cond = cond  # (1,) class id, (1, L) text ids, or None
        self.depth = depth
        self.h, self.w, self.D = prior.config.code_shape

    def _logits(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (1, h, w, depth) -> logits (T, depth, K) in float32 on the CPU."""
        out = self.prior(codes, self.cond)  # (1, T, depth, K)
        return out[0].float().cpu()

    def encode_probs(self, codes: np.ndarray) -> np.ndarray:
        """codes (T, depth) -> probability rows (T*depth, K) in coding order (one forward pass)."""
        with reference_arithmetic():
            x = torch.as_tensor(codes, dtype=torch.long).reshape(1, self.h, self.w, self.depth)
            probs = _probs64(self._logits(x))  # (T, depth, K)
        return probs.reshape(-1, probs.shape[-1])

    def decode(self, decoder: Decoder, T: int, d: int) -> np.ndarray:
        codes = torch.zeros(1, self.h, self.w, d, dtype=torch.long)
        flat = codes.view(T, d)
        with reference_arithmetic():
            for t in range(T):
                for j in range(d):
                    logits = self._logits(codes)[t, j]  # (K,) depends on the codes before (t, j) only
                    flat[t, j] = decoder(_probs64(logits))
        return flat.numpy().copy()
