"""Residual quantization (RQ), the tokenizer's bottleneck (Lee et al., CVPR 2022, Sec. 3.1).

A vector ``z`` is represented by ``D`` codes ``(k_1, ..., k_D)`` chosen coarse to fine (Eq. 4)::

    r_0 = z
    k_d = argmin_k || r_{d-1} - e(k) ||^2          # nearest code to the current residual
    r_d = r_{d-1} - e(k_d)

and reconstructed by the partial sums ``Z_hat^(d) = sum_{i<=d} e(k_i)`` (Eq. 5); ``Z_hat = Z_hat^(D)``.
One codebook is shared by all depths (the paper's default) or, optionally, each depth has its own.

Training (Sec. 3.1.2): the codebook rows are exponential moving averages of the vectors assigned to
them (no gradient), the encoder gets the straight-through gradient ``z + sg[z_hat - z]`` and the
commitment loss (Eq. 7) ``sum_d || Z - sg[Z_hat^(d)] ||^2``. Codes that go unused are restarted from
vectors of the current (global) batch.

Stage 2 trains on soft labels (Eq. 15): along the residual path, ``Q_tau(k | r_{d-1})`` is the
softmax over codes of ``-|| r_{d-1} - e(k) ||^2 / tau``; :meth:`ResidualQuantizer.soft_codes` returns
these and codes drawn from them (stochastic sampling).

Everything here runs on any device; distances are always computed in float32 with autocast off.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from rqvae.distributed import get_world_size, sample_rows_global
from rqvae.errors import UserError
from rqvae.models import quantize_books as qb  # codebook layout (per-depth sizes / decays), input checks
from rqvae.models.quantize_fit import CHUNK_ELEMENTS as _CHUNK_ELEMENTS
from rqvae.models.quantize_fit import argmin_rows, fit_codebooks


@dataclass
class QuantizerOutput:
    """Result of a training forward pass."""

    quantized: Tensor  # (..., dim) z + sg[z_hat - z]: the value of z_hat, the gradient of z
    codes: Tensor  # (..., depth) int64
    commitment_loss: Tensor  # () float32, Eq. 7 (see ResidualQuantizer for the normalisation)


@dataclass
class CodebookUsage:
    """Code usage per depth (from the vectors given to ``usage``, or from the training EMA counts)."""

    counts: Tensor  # (depth, K) how often each code was chosen at each depth (EMA counts if from training)
    used: list[int]  # per depth: codes with a non-zero count
    perplexity: list[float]  # per depth: exp(entropy of the code distribution); K means uniform usage
    dead: list[int]  # per codebook: codes below the dead-code threshold of the EMA statistics

    def as_dict(self) -> dict[str, list[int] | list[float]]:
        return {"used": self.used, "perplexity": self.perplexity, "dead": self.dead}


@contextmanager
def _float32(device: torch.device) -> Iterator[None]:
    """Autocast off: code distances are compared in float32 (bf16 would flip near-ties)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


class ResidualQuantizer(nn.Module):
    """Residual quantizer with EMA codebooks (Sec. 3.1 of the paper).

    Args:
        dim: vector size ``n_z``.
        codebook_size: codes per codebook ``K``.
        depth: number of codes per vector ``D``.
        shared_codebook: one codebook for all depths (paper default) or one per depth.
        codebook_sizes: without a shared codebook, optionally a size K_d per depth (max = codebook_size);
            the books are stored padded to K rows (see :mod:`rqvae.models.quantize_books`).
        ema_decay: decay ``gamma`` of the EMA statistics (official 0.99); without a shared codebook
            optionally one per depth, for that depth's codebook (the official ``decay`` list).
        eps: Laplace smoothing of the EMA counts (official 1e-5).
        restart_dead_codes: restart codes whose EMA count falls below the threshold.
        dead_code_threshold: a code is dead when its EMA count is below this fraction of uniform usage
            (``threshold * total_count / K``), or, with ``dead_code_relative=False``, below this
            absolute EMA count. The official code uses an absolute count of 1 (``1.0, relative=False``),
            which depends on the batch size; the relative form does not.
        dead_code_relative: see ``dead_code_threshold``.
        commitment_reduction: ``"mean"`` (official, default): the loss is the mean over depths of the
            mean squared error ``mean((z - sg[Z_hat^(d)])^2)``; ``"sum"``: the sum over depths of it
            (Eq. 7 as printed, up to the per-element mean).

    Buffers (all float32, all in the state dict): ``codebook`` (n_books, K, dim), ``ema_count``
    (n_books, K), ``ema_sum`` (n_books, K, dim), with ``n_books = 1 if shared_codebook else depth``.
    """

    def __init__(self, dim: int, codebook_size: int, depth: int, shared_codebook: bool = True,
                 ema_decay: float | tuple[float, ...] = 0.99, eps: float = 1e-5,
                 restart_dead_codes: bool = True, dead_code_threshold: float = 0.1,
                 dead_code_relative: bool = True, commitment_reduction: str = "mean",
                 codebook_sizes: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if dim < 1 or codebook_size < 1 or depth < 1:
            raise UserError(f"ResidualQuantizer needs dim, codebook_size and depth >= 1, got "
                            f"{dim}, {codebook_size}, {depth}")
        if commitment_reduction not in ("mean", "sum"):
            raise UserError(f"commitment_reduction must be 'mean' or 'sum', got {commitment_reduction!r}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.depth = depth
        self.shared_codebook = shared_codebook
        self.n_books = 1 if shared_codebook else depth
        self.book_sizes = qb.book_sizes(codebook_size, depth, shared_codebook, codebook_sizes)  # rows/book
        self.ema_decay = ema_decay
        self.book_decays = qb.book_decays(ema_decay, depth, shared_codebook)  # gamma per book
        self.eps = eps
        self.restart_dead_codes = restart_dead_codes
        self.dead_code_threshold = dead_code_threshold
        self.dead_code_relative = dead_code_relative
        self.commitment_reduction = commitment_reduction
        self.register_buffer("valid", qb.valid_rows(self.book_sizes, codebook_size), persistent=False)
        # K / K_b (1 without padding): turns a mean over a book's K rows into the mean over its K_b used rows
        self.register_buffer("pad_scale", torch.tensor([[codebook_size / k] for k in self.book_sizes]),
                             persistent=False)
        # N(0, 1) like the official nn.Embedding (padding rows 0); rows never used keep it until restarted.
        init = torch.randn(self.n_books, codebook_size, dim) * self.valid[..., None]
        self.register_buffer("codebook", init)
        self.register_buffer("ema_count", torch.zeros(self.n_books, codebook_size))
        self.register_buffer("ema_sum", torch.zeros(self.n_books, codebook_size, dim))
        # Per-depth EMA code counts for usage(); bookkeeping only, so not saved.
        self.register_buffer("depth_count", torch.zeros(depth, codebook_size), persistent=False)
        # Which codebook each depth reads.
        self.register_buffer("book_of_depth", torch.arange(depth) if not shared_codebook
                             else torch.zeros(depth, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, depth={self.depth}, "
                f"shared_codebook={self.shared_codebook}, ema_decay={self.ema_decay}")

    # ------------------------------------------------------------------ checks
    def _check_codes(self, codes: Tensor) -> None:
        qb.check_codes(codes, [self.book_sizes[b] for b in self.book_of_depth.tolist()])

    # ------------------------------------------------------------------ basic maps
    def _book(self, d: int) -> Tensor:
        return self.codebook[0 if self.shared_codebook else d].float()  # (K, dim)

    def embed(self, codes: Tensor) -> Tensor:
        """(..., d) int codes -> (..., d, dim) float32 code embeddings ``e(k_1), ..., e(k_d)``."""
        self._check_codes(codes)
        return self._embed(codes.long())

    def _embed(self, codes: Tensor) -> Tensor:
        """``embed`` without the range check (which synchronises a GPU), for codes made here."""
        books = self.book_of_depth[:codes.shape[-1]].expand_as(codes)  # (..., d)
        return self.codebook[books, codes].float()  # (..., d, dim)

    def decode(self, codes: Tensor) -> Tensor:
        """(..., d) codes -> (..., dim) partial sum ``Z_hat^(d)`` of their embeddings (Eq. 5)."""
        return self.embed(codes).sum(dim=-2)

    @torch.no_grad()
    def encode(self, z: Tensor, beam_size: int = 1, prefix_weight: float = 0.0) -> Tensor:
        """(..., dim) vectors -> (..., depth) int64 codes.

        ``beam_size=1``: greedy residual quantization (Eq. 4). ``beam_size>1``: beam search over code
        paths, keeping the ``beam_size`` partial paths with the lowest score at each depth and returning
        the path with the lowest final score. The default score is the squared error of the path's
        partial sum, so the final error is usually lower than greedy's (not guaranteed: the greedy path
        can be pruned), but the coarse partial sums ``Z_hat^(d), d < D`` of the chosen path can be
        worse than greedy's, which hurts generation stopped at a coarse depth and the AR model's
        coarse-to-fine order.
        ``prefix_weight > 0`` adds ``prefix_weight * sum_{i<d} ||r_i||^2`` to the score, favouring paths
        whose coarse partial sums are also good (0 = plain final error; large = close to greedy).
        """
        qb.check_vectors(z, self.dim)
        if beam_size < 1:
            raise UserError(f"beam_size must be >= 1, got {beam_size}")
        lead = z.shape[:-1]
        with _float32(z.device):
            x = z.detach().reshape(-1, self.dim).float()  # (N, dim)
            if beam_size == 1:
                codes = self._greedy(x)
            else:
                codes = self._beam(x, beam_size, prefix_weight)
        return codes.reshape(*lead, self.depth)

    def _greedy(self, x: Tensor) -> Tensor:
        """(N, dim) float32 -> (N, depth) greedy codes; one matmul per depth and row chunk."""
        n = x.shape[0]
        codes = torch.empty(n, self.depth, dtype=torch.long, device=x.device)
        books = [self._book(d) for d in range(self.n_books)]
        sq = qb.code_norms(books, self.valid)  # ||e_k||^2 per book, (K,); +inf on padding rows
        chunk = max(1, _CHUNK_ELEMENTS // self.codebook_size)
        buf = torch.empty(min(chunk, n), self.codebook_size, device=x.device)  # distances, reused
        for s in range(0, n, chunk):
            r = x[s:s + chunk].clone()  # (n, dim) residual r_{d-1}
            dist_ = buf[:r.shape[0]]  # (n, K)
            for d in range(self.depth):
                b = 0 if self.shared_codebook else d
                # ||r - e||^2 = ||r||^2 - 2 r.e + ||e||^2; ||r||^2 is constant per row, so dropped.
                torch.addmm(sq[b], r, books[b].t(), alpha=-2.0, out=dist_)
                k = argmin_rows(dist_)  # (n,) first minimum
                codes[s:s + chunk, d] = k
                if d + 1 < self.depth:  # the last residual is not needed
                    r -= books[b].index_select(0, k)
        return codes

    def _beam(self, x: Tensor, beam_size: int, prefix_weight: float, n_depths: int | None = None,
              residuals_out: Tensor | None = None) -> Tensor:
        """(N, dim) -> (N, n_depths) codes of the best path found by beam search over the first
        ``n_depths`` depths (all by default); the residuals of all final beams are written to
        ``residuals_out`` (N, B, dim) if given (training on beam residuals, as faiss does)."""
        n, K, dim = x.shape[0], self.codebook_size, self.dim
        n_depths = self.depth if n_depths is None else n_depths
        out = torch.empty(n, n_depths, dtype=torch.long, device=x.device)
        books = [self._book(d) for d in range(self.n_books)]
        sq = qb.code_norms(books, self.valid)
        chunk = max(1, _CHUNK_ELEMENTS // (K * beam_size))
        for s in range(0, n, chunk):
            r = x[s:s + chunk][:, None, :]  # (n, B=1, dim) residual of each partial path
            m = r.shape[0]
            rows = torch.arange(m, device=x.device)[:, None]  # (n, 1)
            score0 = (r * r).sum(-1)  # (n, B) ||r||^2 (+ prefix terms, see encode)
            prefix = torch.zeros_like(score0)  # (n, B) prefix_weight * errors of the coarser partial sums
            paths = torch.zeros(m, 1, 0, dtype=torch.long, device=x.device)  # (n, B, d)
            for d in range(n_depths):
                b = 0 if self.shared_codebook else d
                B = r.shape[1]
                # ||r - e_k||^2 + prefix = (||r||^2 + prefix) - 2 r.e_k + ||e_k||^2, one matmul for all beams
                cand = torch.addmm(sq[b], r.reshape(m * B, dim), books[b].t(), alpha=-2.0)  # (n B, K)
                cand = cand.view(m, B, K).add_((score0 + prefix)[..., None]).view(m, B * K)
                keep = min(beam_size, B * self.book_sizes[b])
                top = cand.topk(keep, dim=1, largest=False).indices  # (n, B')
                parent, k = top // K, top % K
                r = r[rows, parent] - books[b].index_select(0, k.reshape(-1)).view(m, keep, dim)
                score0 = (r * r).sum(-1)  # the new error, recomputed exactly
                prefix = prefix[rows, parent] + prefix_weight * score0
                paths = torch.cat([paths[rows, parent], k[..., None]], dim=-1)
            best = (score0 + prefix - prefix_weight * score0).argmin(dim=1)  # final: err + earlier prefix
            out[s:s + chunk] = paths[rows[:, 0], best]
            if residuals_out is not None:
                residuals_out[s:s + chunk] = r
        return out

    # ------------------------------------------------------------------ training forward
    def forward(self, z: Tensor) -> QuantizerOutput:
        """Greedy RQ of ``z`` (..., dim) with the straight-through estimator and the commitment loss.

        In train mode the EMA statistics are updated once per call from the residuals of all depths
        (pooled when the codebook is shared) after the codes have been chosen with the current codebook.
        """
        qb.check_vectors(z, self.dim)
        lead = z.shape[:-1]
        with _float32(z.device):
            x = z.reshape(-1, self.dim).float()  # (N, dim), keeps the graph to z
            codes = self._greedy(x.detach())  # (N, D)
            partial = self._embed(codes).cumsum(dim=1)  # (N, D, dim) Z_hat^(1..D), no gradient
            # Eq. 7: || Z - sg[Z_hat^(d)] ||^2 per depth, as a per-element mean.
            per_depth = ((x[:, None, :] - partial) ** 2).mean(dim=(0, 2)) if x.shape[0] else \
                x.new_zeros(self.depth)  # (D,)
            loss = per_depth.mean() if self.commitment_reduction == "mean" else per_depth.sum()
            quantized = x + (partial[:, -1] - x).detach()  # straight-through
            if self.training:
                residuals = x.detach()[:, None, :] - F.pad(partial[:, :-1], (0, 0, 1, 0))  # (N, D, dim)
                self._ema_update(residuals, codes)
        return QuantizerOutput(quantized=quantized.reshape(*lead, self.dim).to(z.dtype),
                               codes=codes.reshape(*lead, self.depth), commitment_loss=loss)

    @torch.no_grad()
    def _ema_update(self, residuals: Tensor, codes: Tensor) -> None:
        """EMA codebook update from residuals (N, D, dim) and their codes (N, D).

        Per codebook b and code k, with counts ``n_k`` and sums ``s_k`` of the vectors assigned to k in
        this step (summed over depths for a shared codebook and over ranks under torch.distributed)::

            N_k <- gamma N_k + (1 - gamma) n_k ;  S_k <- gamma S_k + (1 - gamma) s_k
            e_k  = S_k / ((N_k + eps) / (sum_j N_j + K eps) * sum_j N_j)    # Laplace-smoothed mean

        with the decay ``gamma`` of book b. Codes never used (N_k == 0) keep their current vector.
        """
        K, D, dim = self.codebook_size, self.depth, self.dim
        flat_codes = codes + self.book_of_depth * K  # (N, D) index into n_books * K
        counts = torch.bincount(flat_codes.reshape(-1), minlength=self.n_books * K).float()
        sums = torch.zeros(self.n_books * K, dim, device=residuals.device)
        sums.index_add_(0, flat_codes.reshape(-1), residuals.reshape(-1, dim))
        depth_counts = torch.bincount((codes + torch.arange(D, device=codes.device) * K).reshape(-1),
                                      minlength=D * K).float()
        if get_world_size() > 1:  # one all-reduce for all statistics
            packed = torch.cat([counts, sums.reshape(-1), depth_counts])
            dist.all_reduce(packed)
            counts, sums, depth_counts = packed.split([counts.numel(), sums.numel(), depth_counts.numel()])
        g = self.book_decays
        qb.ema_(self.ema_count, counts.view(self.n_books, K), g)
        qb.ema_(self.ema_sum, sums.view(self.n_books, K, dim), g)
        qb.ema_(self.depth_count, depth_counts.view(D, K), g * D if self.shared_codebook else g)
        if self.restart_dead_codes:
            self._restart(residuals)
        n = self.ema_count.sum(dim=1, keepdim=True)  # (n_books, 1)
        smoothed = (self.ema_count + self.eps) / (n + K * self.eps / self.pad_scale) * n  # (n_books, K)
        used = self.ema_count > 0
        new = self.ema_sum / smoothed.clamp_min(1e-30)[..., None]
        self.codebook.copy_(torch.where(used[..., None], new, self.codebook))

    def dead_codes(self) -> Tensor:
        """(n_books, K) bool: codes whose EMA count is below the dead-code threshold."""
        thr = self.dead_code_threshold
        if self.dead_code_relative:  # fraction of uniform usage
            thr = thr * self.ema_count.mean(dim=1, keepdim=True) * self.pad_scale
        return (self.ema_count < thr) & self.valid  # padding rows are never dead

    def _restart(self, residuals: Tensor) -> None:
        """Restart dead codes from random vectors of the global batch; reset their EMA statistics.

        The candidates are the residuals the codebook quantized (all depths for a shared codebook).
        Under torch.distributed, rank 0 draws indices into the concatenation of all ranks' candidates
        (in rank order) and broadcasts them; the ranks then sum their parts, so every rank restarts the
        same codes with the same vectors, exactly as one process would on the concatenated batch.
        A restarted code gets the count of a uniformly used code (the official count 1 in absolute mode)
        so that it is not restarted again before it had a chance to be used.
        """
        dead = self.dead_codes()  # (n_books, K)
        n_dead = dead.sum(dim=1).tolist()
        if not any(n_dead):
            return
        for b in range(self.n_books):
            if not n_dead[b]:
                continue
            cand = residuals.reshape(-1, self.dim) if self.shared_codebook else residuals[:, b]
            vectors = sample_rows_global(cand, int(n_dead[b]))  # (n_dead, dim)
            if vectors is None:  # an empty global batch: nothing to restart from
                return
            if self.dead_code_relative:
                reset = (self.ema_count[b].mean() * self.pad_scale[b, 0]).clamp_min(1e-3)
            else:
                reset = torch.tensor(max(self.dead_code_threshold, 1e-3), device=vectors.device)
            idx = dead[b].nonzero().squeeze(1)
            self.ema_count[b, idx] = reset
            self.ema_sum[b, idx] = vectors * reset

    # ------------------------------------------------------------------ soft labels (Eq. 15)
    @torch.no_grad()
    def soft_codes(self, z: Tensor, temperature: float = 0.5, stochastic: bool = True,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Soft labels and codes along a residual path (Eq. 15).

        At each depth ``Q_tau(k | r_{d-1}) = softmax_k(-||r_{d-1} - e(k)||^2 / tau)``; the code ``k_d`` is
        drawn from it (``stochastic=True``) or is its argmax (then the codes equal ``encode(z)``), and
        the next residual is ``r_d = r_{d-1} - e(k_d)``.

        Returns ``probs`` (..., depth, K) float32 and ``codes`` (..., depth) int64.
        """
        qb.check_vectors(z, self.dim)
        if not temperature > 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        lead, K = z.shape[:-1], self.codebook_size
        with _float32(z.device):
            x = z.detach().reshape(-1, self.dim).float()
            n = x.shape[0]
            probs = torch.empty(n, self.depth, K, device=x.device)
            codes = torch.empty(n, self.depth, dtype=torch.long, device=x.device)
            books = [self._book(d) for d in range(self.n_books)]
            sq = qb.code_norms(books, self.valid)
            chunk = max(1, _CHUNK_ELEMENTS // K)
            for s in range(0, n, chunk):
                r = x[s:s + chunk].clone()
                for d in range(self.depth):
                    b = 0 if self.shared_codebook else d
                    # the same expression as _greedy, so argmax == encode exactly; the dropped ||r||^2
                    # is constant over k and cancels in the softmax.
                    dist_ = torch.addmm(sq[b], r, books[b].t(), alpha=-2.0)  # (n, K)
                    p = torch.softmax(-dist_ / temperature, dim=1)
                    probs[s:s + chunk, d] = p
                    if stochastic:
                        gen_device = generator.device if generator is not None else r.device
                        u = torch.rand(r.shape[0], 1, generator=generator, device=gen_device).to(r.device)
                        k = (p.cumsum(dim=1) < u).sum(dim=1).clamp_max(self.book_sizes[b] - 1)  # inverse CDF
                    else:
                        k = dist_.min(dim=1).indices
                    codes[s:s + chunk, d] = k
                    r -= books[b].index_select(0, k)
        return probs.reshape(*lead, self.depth, K), codes.reshape(*lead, self.depth)

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def usage(self, z: Tensor | None = None) -> CodebookUsage:
        """Code usage per depth: of ``encode(z)`` when vectors are given, else of the training EMA counts.

        ``used`` counts codes chosen at least once (vectors) or not below the dead-code threshold (EMA);
        ``perplexity`` is ``exp(H(p_d))`` of the per-depth code distribution; ``dead`` is per codebook.
        """
        if z is not None:
            codes = self.encode(z).reshape(-1, self.depth)
            offs = torch.arange(self.depth, device=codes.device) * self.codebook_size
            counts = torch.bincount((codes + offs).reshape(-1), minlength=self.depth * self.codebook_size)
            counts = counts.view(self.depth, self.codebook_size).float()
            used = (counts > 0).sum(1)
        else:
            counts = self.depth_count.clone()
            thr = self.dead_code_threshold
            if self.dead_code_relative:
                thr = thr * counts.mean(dim=1, keepdim=True)
            used = ((counts >= thr) & (counts > 0)).sum(1)
        p = counts / counts.sum(dim=1, keepdim=True).clamp_min(1e-30)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=1)
        return CodebookUsage(counts=counts.cpu(), used=used.tolist(), perplexity=entropy.exp().tolist(),
                             dead=self.dead_codes().sum(dim=1).tolist())

    # ------------------------------------------------------------------ offline fit
    @torch.no_grad()
    def fit(self, vectors: Tensor, kmeans_iters: int = 10, refine_iters: int = 3, beam_size: int = 8,
            holdout: float = 0.1, seed: int = 0, verbose: bool = False) -> float:
        """Warm-start the codebooks from data (offline); returns the MSE per element on ``vectors``.

        k-means initialisation depth by depth, then least-squares refinement on beam-search codes, then
        EMA statistics matching the fit; see :func:`rqvae.models.quantize_fit.fit_codebooks`.
        """
        qb.check_vectors(vectors, self.dim, "vectors")
        return fit_codebooks(self, vectors, kmeans_iters=kmeans_iters, refine_iters=refine_iters,
                             beam_size=beam_size, holdout=holdout, seed=seed, verbose=verbose)
