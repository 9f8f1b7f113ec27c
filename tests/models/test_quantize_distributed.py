"""Two gloo processes train the quantizer on different data and must end with identical codebooks,
equal to one process training on the concatenated batches (EMA all-reduce + global dead-code restarts).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rqvae.models.quantize import ResidualQuantizer

STEPS = 6
DIM, K, DEPTH = 8, 32, 3


def global_batches() -> list[torch.Tensor]:
    """Per step, the global batch; rank 0 gets the first 40 rows, rank 1 the other 24 (unequal sizes)."""
    g = torch.Generator().manual_seed(123)
    return [torch.randn(64, DIM, generator=g) * 2 + 1 for _ in range(STEPS)]


SPLIT = (40, 24)


def train(shared: bool, batches: list[torch.Tensor]) -> tuple[ResidualQuantizer, int]:
    """Returns the quantizer and how many code restarts happened."""
    torch.manual_seed(0)  # same initial codebook and the same restart draws on rank 0 / the single run
    rq = ResidualQuantizer(DIM, K, DEPTH, shared_codebook=shared, dead_code_threshold=0.5).train()
    rq.codebook.mul_(5.0)  # a poor start: many dead codes
    restarts = 0
    for x in batches:
        restarts += int(rq.dead_codes().sum()) if rq.ema_count.sum() > 0 else 0
        rq(x)
    return rq, restarts


def _worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        lo = sum(SPLIT[:rank])
        local = [b[lo:lo + SPLIT[rank]] for b in global_batches()]
        for shared in (True, False):
            rq, _ = train(shared, local)
            torch.save({k: v.clone() for k, v in rq.state_dict().items()},
                       os.path.join(out_dir, f"rank{rank}_shared{int(shared)}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    torch.set_num_threads(1)
    for shared in (True, False):
        r0 = torch.load(tmp_path / f"rank0_shared{int(shared)}.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"rank1_shared{int(shared)}.pt", weights_only=True)
        for key in r0:
            assert torch.equal(r0[key], r1[key]), f"{key} differs between ranks (shared={shared})"
        single, restarts = train(shared, global_batches())
        assert restarts > 0  # the run exercised the global dead-code restarts
        for key, value in single.state_dict().items():
            torch.testing.assert_close(r0[key], value, rtol=1e-5, atol=1e-5,
                                       msg=f"{key} differs from one process (shared={shared})")
        # a rank that only saw its own data would end elsewhere
        alone, _ = train(shared, [b[:SPLIT[0]] for b in global_batches()])
        assert not torch.allclose(alone.codebook, single.codebook, atol=1e-3)
