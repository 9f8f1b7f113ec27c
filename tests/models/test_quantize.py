"""Tests of the residual quantizer (rqvae.models.quantize): small sizes, fixed seeds, seconds in total."""

from __future__ import annotations

import itertools

import pytest
import torch

from rqvae.errors import UserError
from rqvae.models.quantize import QuantizerOutput, ResidualQuantizer


def make(dim=8, K=16, depth=3, shared=True, seed=0, **kw) -> ResidualQuantizer:
    torch.manual_seed(seed)
    return ResidualQuantizer(dim, K, depth, shared_codebook=shared, **kw)


def book(rq: ResidualQuantizer, d: int) -> torch.Tensor:
    return rq.codebook[0 if rq.shared_codebook else d]


def brute_force_greedy(rq: ResidualQuantizer, z: torch.Tensor) -> torch.Tensor:
    """Eq. 4 with an explicit distance matrix per depth: (N, dim) -> (N, depth)."""
    r, out = z.clone(), []
    for d in range(rq.depth):
        e = book(rq, d)
        k = torch.cdist(r.double(), e.double()).argmin(dim=1)
        out.append(k)
        r = r - e[k]
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("shared", [True, False])
def test_greedy_equals_brute_force_argmin(shared):
    rq = make(shared=shared)
    z = torch.randn(5, 7, 8)
    codes = rq.encode(z)
    assert codes.shape == (5, 7, 3) and codes.dtype == torch.int64
    assert torch.equal(codes.reshape(-1, 3), brute_force_greedy(rq, z.reshape(-1, 8)))


def test_encode_chunking_matches(monkeypatch):
    rq = make(K=16)
    z = torch.randn(300, 8)
    full = rq.encode(z)
    monkeypatch.setattr("rqvae.models.quantize._CHUNK_ELEMENTS", 16 * 7)  # chunks of 7 rows
    assert torch.equal(rq.encode(z), full)
    assert torch.equal(rq.encode(z, beam_size=3), rq.encode(z, beam_size=3))


@pytest.mark.parametrize("shared", [True, False])
def test_embed_and_partial_sums(shared):
    rq = make(shared=shared)
    codes = torch.randint(0, 16, (4, 3))
    emb = rq.embed(codes)
    assert emb.shape == (4, 3, 8)
    for d in range(3):
        assert torch.equal(emb[:, d], book(rq, d)[codes[:, d]])
    for d in range(0, 4):
        want = sum((book(rq, i)[codes[:, i]] for i in range(d)), torch.zeros(4, 8))
        torch.testing.assert_close(rq.decode(codes[:, :d]), want)
    # with a codebook fitted to the data, the partial sums get closer to z as the depth grows (Eq. 5)
    z = torch.randn(2000, 8)
    rq.fit(z, kmeans_iters=3, refine_iters=0)
    c = rq.encode(z)
    errs = [((z - rq.decode(c[:, :d])) ** 2).mean().item() for d in range(4)]
    assert errs == sorted(errs, reverse=True)


def test_forward_straight_through_and_commitment():
    rq = make().eval()
    z = torch.randn(6, 5, 8, requires_grad=True)
    out = rq(z)
    assert isinstance(out, QuantizerOutput)
    assert torch.equal(out.codes, rq.encode(z))
    torch.testing.assert_close(out.quantized, rq.decode(out.codes))
    partial = rq.embed(out.codes).cumsum(dim=-2)  # (6, 5, D, dim)
    per_depth = ((z.detach()[..., None, :] - partial) ** 2).mean(dim=(0, 1, 3))
    torch.testing.assert_close(out.commitment_loss, per_depth.mean())
    rq_sum = make(commitment_reduction="sum").eval()
    torch.testing.assert_close(rq_sum(z).commitment_loss, per_depth.sum())
    # straight-through: d quantized / d z is the identity; the loss pulls z to the partial sums
    g = torch.randn(6, 5, 8)
    (out.quantized * g).sum().backward()
    torch.testing.assert_close(z.grad, g)
    z.grad = None
    out.commitment_loss.backward()
    want = 2 * (z.detach()[..., None, :] - partial).sum(-2) / (6 * 5 * 8) / 3
    torch.testing.assert_close(z.grad, want)
    assert not any(p.requires_grad for p in rq.parameters()) and not rq.codebook.requires_grad
    assert set(rq.state_dict()) == {"codebook", "ema_count", "ema_sum"}


def test_empty_batch():
    rq = make().train()
    rq(torch.randn(50, 8))
    out = rq(torch.randn(0, 8))  # e.g. an empty last batch: no crash, nothing to restart from
    assert out.codes.shape == (0, 3) and out.quantized.shape == (0, 8)


def test_eval_mode_does_not_update():
    rq = make().eval()
    before = rq.codebook.clone()
    rq(torch.randn(100, 8))
    assert torch.equal(rq.codebook, before) and rq.ema_count.sum() == 0


def test_ema_update_formula_one_step():
    rq = make(K=4, depth=2, restart_dead_codes=False, ema_decay=0.9, eps=1e-5)
    z = torch.randn(50, 8)
    codes = rq.encode(z)
    partial = rq.embed(codes).cumsum(dim=1)
    res = torch.cat([z[:, None], z[:, None] - partial[:, :-1]], dim=1)  # (N, D, dim) inputs per depth
    rq.train()(z)
    counts = torch.bincount(codes.reshape(-1), minlength=4).float()  # pooled over both depths
    sums = torch.zeros(4, 8).index_add_(0, codes.reshape(-1), res.reshape(-1, 8))
    torch.testing.assert_close(rq.ema_count[0], 0.1 * counts)
    torch.testing.assert_close(rq.ema_sum[0], 0.1 * sums)
    n = rq.ema_count[0].sum()
    smoothed = (rq.ema_count[0] + 1e-5) / (n + 4 * 1e-5) * n
    for k in range(4):
        if counts[k] > 0:
            torch.testing.assert_close(rq.codebook[0, k], rq.ema_sum[0, k] / smoothed[k])


def test_ema_moves_codes_towards_assigned_vectors():
    torch.manual_seed(1)
    centers = torch.randn(4, 8) * 3
    rq = make(K=4, depth=1, restart_dead_codes=False)
    rq.codebook[0] = centers + torch.randn(4, 8)  # perturbed; each code still owns its cluster
    rq.train()
    start = (rq.codebook[0] - centers).norm(dim=1)
    for _ in range(200):
        x = centers[torch.randint(0, 4, (256,))] + 0.1 * torch.randn(256, 8)
        rq(x)
    end = (rq.codebook[0] - centers).norm(dim=1)
    assert (end < 0.2 * start).all() and (end < 0.1).all()


def test_shared_codebook_pools_depths_in_one_update():
    rq = make(K=8, depth=4, restart_dead_codes=False).train()
    rq(torch.randn(30, 8))
    torch.testing.assert_close(rq.ema_count.sum(), torch.tensor(0.01 * 30 * 4))
    per = make(K=8, depth=4, shared=False, restart_dead_codes=False).train()
    per(torch.randn(30, 8))
    assert per.codebook.shape == (4, 8, 8)
    torch.testing.assert_close(per.ema_count.sum(dim=1), torch.full((4,), 0.01 * 30))


@pytest.mark.parametrize("relative", [True, False])
def test_dead_codes_are_revived(relative):
    rq = make(K=16, depth=2, dead_code_threshold=0.5 if relative else 1.0, dead_code_relative=relative)
    rq.codebook[0, 8:] = 1e3  # far away: never chosen
    x = torch.randn(400, 8)
    rq.train()
    rq(x)
    # every far code was dead and now holds a residual vector from the batch
    cands = torch.cat([x, x - rq.decode(rq.encode(x)[:, :1])])  # not exact (codebook moved), so check norms
    assert (rq.codebook[0, 8:].abs() < 100).all()
    assert rq.codebook[0, 8:].norm(dim=1).max() <= cands.norm(dim=1).max() * 1.01
    if relative:
        assert (rq.ema_count[0, 8:] > 0).all()
    else:
        torch.testing.assert_close(rq.ema_count[0, 8:], torch.ones(8))
    # the revived codes get used within a few steps
    for _ in range(20):
        rq(torch.randn(400, 8))
    assert rq.usage(torch.randn(2000, 8)).used[0] >= 14
    assert rq.usage().dead == [int(rq.dead_codes().sum())]


def test_soft_codes_match_eq15_by_hand():
    rq = make(K=16, depth=3)
    z = torch.randn(4, 5, 8)
    probs, codes = rq.soft_codes(z, temperature=0.5, stochastic=False)
    assert probs.shape == (4, 5, 3, 16) and torch.equal(codes, rq.encode(z))
    r = z.reshape(-1, 8).double()
    for d in range(3):
        e = book(rq, d).double()
        dist = ((r[:, None] - e[None]) ** 2).sum(-1)  # (N, K)
        want = torch.softmax(-dist / 0.5, dim=1)
        torch.testing.assert_close(probs.reshape(-1, 3, 16)[:, d].double(), want, atol=1e-5, rtol=1e-4)
        r = r - e[codes.reshape(-1, 3)[:, d]]


def test_stochastic_codes_follow_soft_labels():
    rq = make(dim=4, K=8, depth=2)
    rq.codebook.mul_(0.3)  # close codes -> spread-out soft labels
    z = torch.randn(1, 4).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    probs, codes = rq.soft_codes(z, temperature=1.0, stochastic=True, generator=g)
    freq = torch.bincount(codes[:, 0], minlength=8).float() / 20000
    p0 = probs[0, 0]
    assert p0.max() < 0.9  # the test is not trivial
    assert (freq - p0).abs().max() < 0.015
    # the depth-2 labels follow the sampled path: same first code -> same distribution
    for k in codes[:, 0].unique():
        rows = probs[codes[:, 0] == k, 1]
        torch.testing.assert_close(rows, rows[:1].expand_as(rows))
    # reproducible with the same generator, different with another seed
    _, again = rq.soft_codes(z[:100], temperature=1.0, generator=torch.Generator().manual_seed(3))
    _, same = rq.soft_codes(z[:100], temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, same)


@pytest.mark.parametrize("shared", [True, False])
def test_unbounded_beam_equals_exhaustive_search(shared):
    rq = make(dim=3, K=4, depth=3, shared=shared)
    z = torch.randn(50, 3)
    paths = torch.tensor(list(itertools.product(range(4), repeat=3)))  # (64, 3) all code paths
    sums = rq.decode(paths)  # (64, dim)
    err = ((z[:, None] - sums[None]) ** 2).sum(-1)  # (N, 64)
    best = err.min(dim=1).values
    codes = rq.encode(z, beam_size=64)
    got = ((z - rq.decode(codes)) ** 2).sum(-1)
    torch.testing.assert_close(got, best)
    if not shared:  # distinct books: the optimal path is unique
        assert torch.equal(codes, paths[err.argmin(dim=1)])


def test_beam_improves_final_error_and_prefix_weight_helps_coarse_depths():
    rq = make(dim=8, K=16, depth=4)
    z = torch.randn(3000, 8)
    g, b, bp = rq.encode(z), rq.encode(z, beam_size=8), rq.encode(z, beam_size=8, prefix_weight=1.0)

    def mse(c, d=4):
        return ((z - rq.decode(c[:, :d])) ** 2).mean().item()

    assert mse(b) < mse(g)
    assert mse(bp) < mse(g)
    assert sum(mse(bp, d) for d in range(1, 4)) < sum(mse(b, d) for d in range(1, 4))


def test_errors():
    rq = make()
    with pytest.raises(UserError, match="last dimension"):
        rq.encode(torch.randn(3, 7))
    with pytest.raises(UserError, match="last dimension"):
        rq(torch.randn(3, 9))
    with pytest.raises(UserError, match="floating-point"):
        rq.encode(torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(UserError, match=r"\[0, 16\)"):
        rq.decode(torch.tensor([[0, 16, 1]]))
    with pytest.raises(UserError, match=r"\[0, 16\)"):
        rq.embed(torch.tensor([[-1]]))
    with pytest.raises(UserError, match="4 depths"):
        rq.decode(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(UserError, match="integer"):
        rq.decode(torch.zeros(2, 3))
    with pytest.raises(UserError, match="beam_size"):
        rq.encode(torch.randn(2, 8), beam_size=0)
    with pytest.raises(UserError, match="temperature"):
        rq.soft_codes(torch.randn(2, 8), temperature=0)
    with pytest.raises(UserError, match="at least"):
        rq.fit(torch.randn(5, 8))
    with pytest.raises(UserError, match="commitment_reduction"):
        ResidualQuantizer(8, 16, 3, commitment_reduction="max")


def test_bf16_autocast():
    rq = make(dim=8, K=32, depth=4)
    z = torch.randn(64, 8)
    ref = rq.encode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(rq.encode(z), ref)
        out = rq.eval()(z)
        probs, codes = rq.soft_codes(z, stochastic=False)
    assert torch.equal(out.codes, ref) and torch.equal(codes, ref)
    assert out.commitment_loss.dtype == torch.float32 and probs.dtype == torch.float32
    zb = z.bfloat16().requires_grad_()
    out = rq(zb)  # bf16 input: distances in float32, the output back in the input dtype
    assert out.quantized.dtype == torch.bfloat16 and torch.equal(out.codes, rq.encode(zb.float()))
    out.quantized.float().sum().backward()
    assert zb.grad is not None and zb.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("shared", [True, False])
def test_fit_beats_random_init_and_sets_ema(shared):
    torch.manual_seed(0)
    x = torch.randn(3000, 8) @ torch.randn(8, 8)
    rq = make(dim=8, K=16, depth=3, shared=shared)
    before = ((x - rq.decode(rq.encode(x))) ** 2).mean().item()
    err = rq.fit(x, kmeans_iters=5, refine_iters=2, beam_size=4)
    torch.testing.assert_close(torch.tensor(err), ((x - rq.decode(rq.encode(x, beam_size=4))) ** 2).mean())
    greedy = ((x - rq.decode(rq.encode(x))) ** 2).mean().item()
    assert err < 0.5 * before and greedy < 0.5 * before
    torch.testing.assert_close(rq.ema_count.mean(dim=1), torch.ones(rq.n_books))
    torch.testing.assert_close(rq.ema_sum, rq.codebook * rq.ema_count[..., None])


def test_usage_from_vectors():
    rq = make(K=16, depth=3)
    u = rq.usage(torch.randn(500, 8))
    assert u.counts.shape == (3, 16) and u.counts.sum(dim=1).tolist() == [500.0] * 3
    assert all(1 <= n <= 16 for n in u.used) and all(1.0 <= p <= 16.0 for p in u.perplexity)
    assert set(u.as_dict()) == {"used", "perplexity", "dead"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rq = make(K=32, depth=4)
    z = torch.randn(1000, 8)
    ref, ref_beam = rq.encode(z), rq.encode(z, beam_size=4)
    rq_cuda = rq.cuda()
    assert torch.equal(rq_cuda.encode(z.cuda()).cpu(), ref)
    assert torch.equal(rq_cuda.encode(z.cuda(), beam_size=4).cpu(), ref_beam)
    g = torch.Generator(device="cuda").manual_seed(0)
    probs, codes = rq_cuda.soft_codes(z.cuda(), generator=g)
    assert probs.is_cuda and codes.is_cuda
    rq_cuda.train()(z.cuda())


def test_fast_row_argmin_matches_torch_with_ties():
    """The blocked row-argmin of the encode hot path (K >= 96) picks the first minimum, like torch."""
    from rqvae.models.quantize_fit import argmin_rows as _argmin_rows

    g = torch.Generator().manual_seed(0)
    for k in (96, 256, 1024):
        d = torch.randint(0, 5, (3000, k), generator=g).float()  # many ties
        d[5] = float("inf")
        d[7, 100 % k] = -1.0
        assert torch.equal(_argmin_rows(d), d.min(dim=1).indices)


def test_greedy_large_codebook_with_duplicate_rows_equals_brute_force():
    torch.manual_seed(0)
    rq = ResidualQuantizer(dim=8, codebook_size=256, depth=3)
    book = rq.codebook[0]
    book[128:] = book[:128]  # duplicated rows: ties must resolve to the first index
    z = torch.randn(500, 8)
    codes = rq.encode(z)
    r = z.clone()
    for d in range(3):
        dist = ((r[:, None, :] - book[None]) ** 2).sum(-1)  # (N, K)
        expect = dist.argmin(dim=1)
        assert torch.equal(codes[:, d], expect)
        assert int(codes[:, d].max()) < 128
        r = r - book[expect]


def test_per_depth_codebook_sizes_never_use_padding_rows():
    """codebook_sizes (6, 2, 4): books padded to 6 rows; depth d's codes, soft labels, beam paths and EMA
    updates stay within its K_d rows, and padding rows are neither updated nor restarted."""
    torch.manual_seed(0)
    q = ResidualQuantizer(3, 6, 3, shared_codebook=False, codebook_sizes=(6, 2, 4), dead_code_threshold=0.5)
    sizes = torch.tensor([6, 2, 4])
    pad = torch.arange(6) >= sizes[:, None]  # (3, 6)
    assert not q.codebook[pad].any()
    z = torch.randn(500, 3) * 2
    q.train()
    for _ in range(3):
        out = q(z)
        assert (out.codes < sizes).all()
    assert not q.codebook[pad].any() and not q.ema_count[pad].any()  # padding: no update, no restart
    assert q.codebook[~pad].abs().sum(-1).gt(0).all()
    q.eval()
    assert (q.encode(z, beam_size=4) < sizes).all()
    probs, codes = q.soft_codes(z, temperature=10.0, generator=torch.Generator().manual_seed(0))
    assert (codes < sizes).all() and not probs[:, pad].any()
    greedy = q.encode(z)
    full = ResidualQuantizer(3, 6, 3, shared_codebook=False)
    full.codebook.copy_(q.codebook)
    assert not torch.equal(full.encode(z), greedy)  # the padding rows (zero vectors) would be chosen
    with pytest.raises(UserError, match="different sizes per depth"):
        q.fit(z)
    with pytest.raises(UserError, match="set shared_codebook false"):
        ResidualQuantizer(3, 6, 3, codebook_sizes=(6, 2, 4))


@pytest.mark.parametrize("sizes", [None, (5, 3, 4)])
def test_per_depth_ema_decays_one_step(sizes):
    """ema_decay (0.9, 0.5, 0.99), one per depth's codebook: one training step equals the EMA of each depth's
    counts and sums with its own decay, then the Laplace-smoothed mean over that book's K_d codes."""
    decays, eps = (0.9, 0.5, 0.99), 1e-5
    rq = make(dim=4, K=5, depth=3, shared=False, restart_dead_codes=False, ema_decay=decays, eps=eps,
              codebook_sizes=sizes)
    k_d = torch.tensor(sizes or (5, 5, 5))
    valid = torch.arange(5) < k_d[:, None]  # (D, K)
    g = torch.Generator().manual_seed(3)
    rq.ema_count.copy_((torch.rand(3, 5, generator=g) * 4 + 0.5) * valid)  # earlier statistics
    rq.ema_sum.copy_(torch.randn(3, 5, 4, generator=g) * valid[..., None])
    count0, sum0, book0 = rq.ema_count.clone(), rq.ema_sum.clone(), rq.codebook.clone()
    z = torch.randn(40, 4, generator=g) * 2
    codes = rq.encode(z)
    rq.train()(z)
    r = z.clone()
    for d, gamma in enumerate(decays):
        counts = torch.bincount(codes[:, d], minlength=5).float()
        sums = torch.zeros(5, 4).index_add_(0, codes[:, d], r)
        r = r - book0[d, codes[:, d]]  # the residual the next depth quantizes
        count = gamma * count0[d] + (1 - gamma) * counts
        total = gamma * sum0[d] + (1 - gamma) * sums
        torch.testing.assert_close(rq.ema_count[d], count)
        torch.testing.assert_close(rq.ema_sum[d], total)
        n = count.sum()
        smoothed = (count + eps) / (n + int(k_d[d]) * eps) * n  # Laplace smoothing over K_d codes
        want = torch.where((count > 0)[:, None], total / smoothed[:, None], book0[d])
        torch.testing.assert_close(rq.codebook[d], want)
        torch.testing.assert_close(rq.depth_count[d], (1 - gamma) * counts)
    for bad, message in [(dict(ema_decay=(0.9, 0.5)), "one decay per depth \\(3\\)"),
                         (dict(ema_decay=(0.9, 1.0, 0.5)), "must be in \\[0, 1\\)"),
                         (dict(ema_decay=(0.9, 0.5, 0.9), shared=True), "set shared_codebook false")]:
        with pytest.raises(UserError, match=message):
            make(dim=4, K=5, depth=3, **{"shared": False, **bad})
    assert make(shared=True, ema_decay=(0.9,) * 3).book_decays == (0.9,)  # equal values: one book
