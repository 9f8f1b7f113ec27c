"""Offline fitting of a :class:`~rqvae.models.quantize.ResidualQuantizer`'s codebooks (k-means, then least
squares on beam-search codes), and the nearest-code kernels it shares with encoding.

This module does not import :mod:`rqvae.models.quantize` (which imports it): the quantizer ``q`` (an
``nn.Module``, a ResidualQuantizer) is passed in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rqvae.errors import UserError

# Elements of one (rows x codes) distance matrix; encode works on row chunks of this size to bound memory.
# Measured for greedy encode on one CPU thread (d=64, K=256): 2048 to 8192 rows per chunk are equally
# fast, 1024 rows ~12% slower (per-call overhead).
CHUNK_ELEMENTS = 1 << 20
# Codes per block of the two-level argmin (argmin_rows): the smallest width at which torch's amin over
# the last dimension is vectorised on CPU (16 is several times slower per element).
ARGMIN_BLOCK = 32


@torch.no_grad()
def fit_codebooks(q: nn.Module, vectors: Tensor, *, kmeans_iters: int = 10, refine_iters: int = 3,
                  beam_size: int = 8, holdout: float = 0.1, seed: int = 0, verbose: bool = False) -> float:
    """Warm-start the codebooks from data (offline); returns the MSE per element on ``vectors``.

    1. Initialisation. One codebook per depth: depth by depth, k-means (progressive-dimension, see
       ``kmeans``, ``kmeans_iters`` Lloyd steps per stage) on the residuals of the ``beam_size``
       best partial paths found by beam search with the codebooks fitted so far (for
       ``beam_size=1``, the greedy residuals). Shared codebook: k-means on the vectors, then
       ``kmeans_iters`` pooled Lloyd steps (encode greedily, move each code to the mean of every
       residual it quantizes at any depth; the batch form of the EMA update).
    2. ``refine_iters`` passes of: encode with beam search (``beam_size``), then solve for all
       codebook rows jointly by least squares, ``min_E || Z - A E ||^2`` where ``A[n, k]`` counts the
       times code k is on vector n's path (a (n_books K)^2 normal system). The refinement fits a
       ``1 - holdout`` part of the vectors and keeps the codebook with the lowest MSE on the other
       part (initialisation included), so it cannot overfit (no hold-out below 1000 vectors).
    3. The EMA statistics are reset to match the fit: ``ema_count`` proportional to the code usage
       with a mean of 1 per code (a weak prior that training batches soon outweigh), ``ema_sum =
       codebook * ema_count``.
    """
    x = vectors.detach().reshape(-1, q.dim).float().contiguous()  # (N, dim)
    if len(set(q.book_sizes)) > 1:
        raise UserError(f"fit does not support codebooks of different sizes per depth "
                        f"({list(q.book_sizes)}); train the RQ-VAE instead")
    if x.shape[0] < q.codebook_size:
        raise UserError(f"fit needs at least codebook_size={q.codebook_size} vectors, "
                        f"got {x.shape[0]}; pass more vectors")
    g = torch.Generator().manual_seed(seed)
    K = q.codebook_size
    n_val = int(x.shape[0] * holdout) if x.shape[0] * holdout >= 1000 and refine_iters > 0 else 0
    perm = torch.randperm(x.shape[0], generator=g).to(x.device)
    val = x[perm[:n_val]] if n_val else x  # (N_val, dim) held out for choosing the refinement step
    train = x[perm[n_val:]] if n_val else x  # (N_train, dim)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if q.shared_codebook:
            book = kmeans(train, K, kmeans_iters, g)
            q.codebook[0] = book
            for _ in range(kmeans_iters):
                codes = q._greedy(train)
                partial = q._embed(codes).cumsum(dim=1)
                res = (train[:, None] - F.pad(partial[:, :-1], (0, 0, 1, 0))).reshape(-1, q.dim)
                counts = torch.bincount(codes.reshape(-1), minlength=K).float()
                sums = torch.zeros(K, q.dim, device=x.device).index_add_(0, codes.reshape(-1), res)
                q.codebook[0] = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None],
                                            q.codebook[0])
        else:
            for d in range(q.depth):
                if d == 0:
                    r = train
                else:  # the residuals of all beam_size partial paths over depths < d
                    beams = min(beam_size, K ** d)
                    res = torch.empty(train.shape[0], beams, q.dim, device=x.device)
                    q._beam(train, beams, 0.0, n_depths=d, residuals_out=res)
                    r = res.reshape(-1, q.dim)
                q.codebook[d] = kmeans(r, K, kmeans_iters, g)
        # refinement: least squares on the training part; the best codebook by held-out MSE wins
        best_err = _mse(q, val, q.encode(val, beam_size=beam_size))
        best_book = q.codebook.clone()
        if verbose:
            print(f"fit: init, held-out mse {best_err:.6f}")
        for it in range(refine_iters):
            least_squares_codebook(q, train, q.encode(train, beam_size=beam_size))
            err = _mse(q, val, q.encode(val, beam_size=beam_size))
            if verbose:
                print(f"fit: refine {it + 1}, held-out mse {err:.6f}")
            if err < best_err:
                best_err, best_book = err, q.codebook.clone()
        q.codebook.copy_(best_book)
        codes = q.encode(x, beam_size=beam_size).reshape(-1, q.depth)
        flat = (codes + q.book_of_depth * K).reshape(-1)
        counts = torch.bincount(flat, minlength=q.n_books * K).float().view(q.n_books, K)
        q.ema_count.copy_(counts / counts.mean(dim=1, keepdim=True))
        q.ema_sum.copy_(q.codebook * q.ema_count[..., None])
        q.depth_count.zero_()
    return _mse(q, x, codes)


def _mse(q: nn.Module, x: Tensor, codes: Tensor) -> float:
    return float(((x - q.decode(codes)) ** 2).mean())


def least_squares_codebook(q: nn.Module, x: Tensor, codes: Tensor, ridge: float = 1.0) -> None:
    """Joint least-squares codebook for fixed codes: (A^T A + ridge I) E = A^T Z + ridge E_old.

    A direct solve of the (n_books K)^2 system when it is small, conjugate gradients otherwise.
    """
    M = q.n_books * q.codebook_size
    f = codes + q.book_of_depth * q.codebook_size  # (N, D) rows of E on each path
    old = q.codebook.reshape(M, q.dim).double()
    rhs = torch.zeros(M, q.dim, dtype=torch.float64, device=x.device)
    rhs.index_add_(0, f.reshape(-1), x.double().repeat_interleave(q.depth, dim=0))  # A^T Z
    rhs += ridge * old
    if M <= 4096:
        pairs = (f[:, :, None] * M + f[:, None, :]).reshape(-1)  # all (d, d') pairs on a path
        gram = torch.bincount(pairs, minlength=M * M).view(M, M).double()  # A^T A
        gram.diagonal().add_(ridge)
        new = torch.linalg.solve(gram, rhs)
    else:
        def normal_op(e: Tensor) -> Tensor:  # (A^T A + ridge I) e without forming A^T A
            ae = e[f].sum(dim=1)  # (N, dim) = A e
            return torch.zeros_like(e).index_add_(0, f.reshape(-1), ae.repeat_interleave(
                q.depth, dim=0)) + ridge * e
        new = old.clone()
        res = rhs - normal_op(new)
        p, rr = res.clone(), (res * res).sum()
        for _ in range(100):
            ap = normal_op(p)
            alpha = rr / (p * ap).sum()
            new += alpha * p
            res -= alpha * ap
            rr_new = (res * res).sum()
            if rr_new.sqrt() < 1e-6 * rhs.norm():
                break
            p, rr = res + (rr_new / rr) * p, rr_new
    q.codebook.copy_(new.view_as(q.codebook).float())


def argmin_rows(dist: Tensor, block: int = ARGMIN_BLOCK) -> Tensor:
    """(n, K) -> (n,) index of the first minimum of each row: ``dist.min(dim=1).indices``, faster on CPU.

    torch's index-returning row minimum is a scalar loop on CPU, while ``amin`` (no index) is
    vectorised. So, with the K codes cut into blocks of ``block``: the minimum of every block (amin),
    the first block holding the row minimum (min with index over K/block values), then the first
    minimum inside that block. The result is identical to ``min(dim=1).indices``, ties (the first index
    wins) and NaN (the first NaN wins) included. Other devices, and K that does not split into at least
    three blocks (below that the plain ``min`` is as fast), use ``min`` directly.
    """
    n, K = dist.shape
    if dist.device.type != "cpu" or K % block or K < 3 * block or not dist.is_contiguous():
        return dist.min(dim=1).indices
    n_blocks = K // block
    first_block = dist.view(n, n_blocks, block).amin(dim=2).min(dim=1).indices  # (n,)
    rows = torch.arange(0, n * n_blocks, n_blocks, device=dist.device)  # (n,) each row's block 0
    inside = dist.view(n * n_blocks, block).index_select(0, rows + first_block)  # (n, block)
    return first_block * block + inside.min(dim=1).indices


def _nearest(x: Tensor, book: Tensor) -> Tensor:
    """(N, dim), (K, dim) -> (N,) index of the nearest row of ``book``, chunked over rows."""
    sq = (book * book).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    chunk = max(1, CHUNK_ELEMENTS // book.shape[0])
    for s in range(0, x.shape[0], chunk):
        out[s:s + chunk] = torch.addmm(sq, x[s:s + chunk], book.t(), alpha=-2.0).min(dim=1).indices
    return out


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator, progressive_steps: int = 10,
            max_points_per_code: int = 256) -> Tensor:
    """k-means of (N, dim) into k centres, with progressive dimensions (as faiss's ProgressiveDimClustering).

    The vectors are rotated onto their principal axes; Lloyd's algorithm (``iters`` steps) runs first on
    the leading ``dim^(1/S)`` principal coordinates, then on more and more of them (``dim^(s/S)``, s = 1..S),
    each stage starting from the previous centres, and the last stage on all coordinates. Starting in
    the few high-variance directions finds better optima than random starts in full dimension. At most
    ``max_points_per_code * k`` random vectors are used. Empty clusters are re-seeded from random vectors.
    """
    n, dim = x.shape
    if n > max_points_per_code * k:
        x = x[torch.randperm(n, generator=generator)[:max_points_per_code * k].to(x.device)]
        n = x.shape[0]
    mean = x.mean(dim=0)
    xc = (x - mean).double()
    evals, evecs = torch.linalg.eigh(xc.t() @ xc / n)  # ascending
    rot = evecs.flip(1).float()  # (dim, dim) principal axes, largest variance first
    y = (x - mean) @ rot  # (N, dim) principal coordinates
    steps = max(1, progressive_steps)
    dims = sorted({max(1, int(dim ** ((s + 1) / steps))) for s in range(steps - 1)} | {dim})
    centers = y[torch.randperm(n, generator=generator)[:k].to(x.device), :dims[0]].clone()  # (k, d_0)
    assign = None
    for di in dims:
        ys = y[:, :di].contiguous()
        if centers.shape[1] < di:  # extend the centres by the means of their clusters in the new coordinates
            counts = torch.bincount(assign, minlength=k).float().clamp_min(1)[:, None]
            extra = torch.zeros(k, di - centers.shape[1], device=x.device)
            extra.index_add_(0, assign, ys[:, centers.shape[1]:])
            centers = torch.cat([centers, extra / counts], dim=1)
        for _ in range(iters):
            assign = _nearest(ys, centers)
            counts = torch.bincount(assign, minlength=k).float()
            sums = torch.zeros_like(centers).index_add_(0, assign, ys)
            centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
            empty = (counts == 0).nonzero().squeeze(1)
            if empty.numel():
                centers[empty] = ys[torch.randint(n, (empty.numel(),), generator=generator).to(x.device)]
        if assign is None:  # iters == 0
            assign = _nearest(ys, centers)
    return centers @ rot.t() + mean  # back to the input coordinates
