"""Running pieces of work in parallel worker processes (one torch thread each), saving each result row as
soon as it finishes: an interrupted run keeps every finished row and a rerun does only the rest."""

from __future__ import annotations

import argparse
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from claims.store import save

Piece = Callable[[str, argparse.Namespace, Path], dict]


def _one_thread() -> None:
    torch.set_num_threads(1)  # N workers x 1 thread use N cores without oversubscribing them


def run_pieces(piece: Piece, names: list[str], rows: dict, *, args: argparse.Namespace, out: Path,
               results: dict, describe: Callable[[str, dict], str]) -> None:
    """``rows[name] = piece(name, args, out)`` for every name not in ``rows``, in ``args.workers``
    processes (in this process for one worker); ``results`` is saved to ``out/results.json`` after each."""
    todo = [n for n in names if n not in rows]
    failed: list[str] = []

    def done(name: str, row: dict) -> None:
        rows[name] = row
        save(out / "results.json", results)
        print(describe(name, row), flush=True)

    if args.workers <= 1 or len(todo) <= 1:
        for name in todo:
            done(name, piece(name, args, out))
        return
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx, initializer=_one_thread) as pool:
        futures = {pool.submit(piece, name, args, out): name for name in todo}
        for future in as_completed(futures):
            name = futures[future]
            try:
                done(name, future.result())
            except Exception as e:  # report, keep the other pieces' rows, fail at the end
                print(f"{name} failed: {type(e).__name__}: {e}", flush=True)
                failed.append(name)
    if failed:
        raise SystemExit(f"{len(failed)} pieces failed: {', '.join(failed)}; rerun to retry them")
