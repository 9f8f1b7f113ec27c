"""The demo's work that does not need the RQ-VAE, run in a second process while stages 1 and 2 train.

The demo's models are small, and small models use a second CPU thread poorly: on a 2-core machine an RQ-VAE
step is about 1.5x faster on two threads than on one, while the FID network (InceptionV3 at 299x299) is
1.9x faster. Two processes of one thread each therefore finish sooner than one process of two threads
doing everything in turn. :class:`SideJobs` trains the classifier and computes the Inception statistics
of the real images (the held-out reference and the floor's training images) in a spawned process with
half of the threads, while the main process trains stage 1 and stage 2 with the rest. The side process
writes the same files the main process would (``OUT/classifier``, ``OUT/cache``), and the main process
then reads them through the same functions, so the report is the one a sequential run gives (up to the
summation order of floating point in the classifier's training).
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import torch

from rqvae.demo.config import DemoConfig
from rqvae.demo.stages import train_or_load_classifier
from rqvae.eval.fid import reference_stats
from rqvae.eval.inception import InceptionFeatures

# Subset seeds of the real images' statistics: the held-out reference, and the floor's training images
# (seed 1, so they are not the first n training images the models saw first). The evaluation reads the
# same cache entries, so both must use these.
REFERENCE_SEED, FLOOR_SEED = 0, 1


def fid_reference_count(cfg: DemoConfig, n_test: int) -> int:
    """How many held-out images FID is measured against (and training images the floor uses)."""
    return min(cfg.fid_ref_count or n_test, n_test)


def real_image_stats(cfg: DemoConfig, net: InceptionFeatures, n: int) -> None:
    """The held-out reference statistics and the floor's training-image statistics, cached in OUT/cache."""
    for split, seed in (("test", REFERENCE_SEED), ("train", FLOOR_SEED)):
        reference_stats(cfg.data, net, cfg.image_size, cfg.channels, split, n,
                        cache_dir=Path(cfg.out) / "cache", seed=seed, progress=False)


def _side(cfg: DemoConfig, threads: int, n_ref: int) -> dict[str, float]:
    """The child process: the classifier (saved to OUT/classifier), then the real images' statistics;
    returns the wall time of each."""
    torch.set_num_threads(threads)
    side = DemoConfig(**{**cfg.__dict__, "progress": False})
    times = {}
    print("[side process] training the classifier", flush=True)
    t = time.time()
    train_or_load_classifier(side, Path(cfg.out), evaluate=False)  # the main process scores it
    times["classifier (side process)"] = time.time() - t
    if cfg.eval_samples > 0:
        print(f"[side process] Inception statistics of {n_ref} test and {n_ref} training images", flush=True)
        t = time.time()
        real_image_stats(side, InceptionFeatures(cfg.inception), n_ref)
        times["real images' FID statistics (side process)"] = time.time() - t
    print("[side process] done", flush=True)
    return times


class SideJobs:
    """Runs :func:`_side` in a spawned process and lends the main process the other threads meanwhile.

    ``start`` returns None (run everything in order) with fewer than two threads or when
    ``cfg.parallel`` is off."""

    def __init__(self, pool: ProcessPoolExecutor, future: Future, threads: int):
        self.pool, self.future, self.threads = pool, future, threads

    @classmethod
    def start(cls, cfg: DemoConfig, n_ref: int) -> SideJobs | None:
        threads = torch.get_num_threads()
        if not cfg.parallel or threads < 2:
            return None
        side_threads = threads // 2
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        future = pool.submit(_side, cfg, side_threads, n_ref)
        torch.set_num_threads(threads - side_threads)
        return cls(pool, future, threads)

    def reclaim_if_done(self) -> None:
        """At a stage boundary: once the side process has finished, the main process takes all threads."""
        if self.future.done():
            torch.set_num_threads(self.threads)

    def wait(self) -> dict[str, float]:
        """The side process's stage times, once it has finished (its errors re-raised)."""
        try:
            return self.future.result()
        finally:
            self.close()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self.threads)
