"""Our ResidualQuantizer against faiss's ResidualQuantizer on the same data.

Both are trained on the same vectors (d=64, depth 4, K=256 per depth, i.e. one codebook per depth like
faiss) and evaluated on held-out vectors: MSE per element of greedy and beam-8 encodings, and encode
throughput (vectors/s) with the same number of threads. Each side is trained once for greedy
encoding (ours: ``fit(beam_size=1)``, faiss: ``max_beam_size=1``) and once for beam-8 encoding.

Data: i.i.d. standard Gaussian vectors, and 8x8 patches of Fashion-MNIST images (pixels in [0, 1],
flattened to 64-d; training patches from the training images, held-out ones from the test images).

    .venv/bin/python benchmarks/quantizer_vs_faiss.py            # writes docs/benchmarks.md section
    .venv/bin/python benchmarks/quantizer_vs_faiss.py --n-train 20000 --no-write   # quick look
    .venv/bin/python benchmarks/quantizer_vs_faiss.py --quick     # greedy encode speed only

``--quick`` times only greedy encoding, of both sides with the *same* codebooks: faiss's greedy-trained
ones (cached under ``--cache`` after the first run), copied into our quantizer. It prints the speeds and
how many codes agree, and writes nothing to the docs.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from functools import partial
from pathlib import Path

import faiss
import numpy as np
import torch

from rqvae.data.idx import read_idx
from rqvae.models.quantize import ResidualQuantizer

DIM, DEPTH, K = 64, 4, 256
HEADING = "## Residual quantizer vs faiss"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def gaussian(n_train: int, n_test: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return (rng.standard_normal((n_train, DIM), dtype=np.float32),
            rng.standard_normal((n_test, DIM), dtype=np.float32))


def _patches(images: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    i = rng.integers(0, images.shape[0], n)
    y = rng.integers(0, images.shape[1] - 7, n)
    x = rng.integers(0, images.shape[2] - 7, n)
    offs = np.arange(8)
    rows = (y[:, None] + offs)[:, :, None]  # (n, 8, 1)
    cols = (x[:, None] + offs)[:, None, :]  # (n, 1, 8)
    return (images[i[:, None, None], rows, cols].reshape(n, DIM) / 255.0).astype(np.float32)


def fmnist_patches(n_train: int, n_test: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    train = read_idx(FMNIST / "train-images-idx3-ubyte.gz")
    test = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    return _patches(train, n_train, rng), _patches(test, n_test, rng)


def best_rates(fns: list, n: int, repeats: int) -> list[tuple[float, float]]:
    """(wall-clock, CPU-time) vectors per second of each function, each the best of ``repeats`` runs;
    the functions take turns so that both see the same load on a shared machine. CPU time (of the
    whole process; one thread each) is what a busy shared machine disturbs least."""
    wall, cpu = [float("inf")] * len(fns), [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t, c = time.perf_counter(), time.process_time()
            fn()
            cpu[i] = min(cpu[i], time.process_time() - c)
            wall[i] = min(wall[i], time.perf_counter() - t)
    return [(n / w, n / c) for w, c in zip(wall, cpu)]


def run_faiss(xt: np.ndarray, xv: np.ndarray, beam: int) -> dict:
    rq = faiss.ResidualQuantizer(DIM, DEPTH, 8)  # 8 bits = 256 codes per depth
    rq.max_beam_size = beam
    t = time.perf_counter()
    rq.train(xt)
    train_s = time.perf_counter() - t
    codes = rq.compute_codes(xv)
    mse = float(((rq.decode(codes) - xv) ** 2).mean())
    return {"mse": mse, "encode": lambda: rq.compute_codes(xv), "train_s": train_s}


def run_ours(xt: np.ndarray, xv: np.ndarray, beam: int, shared: bool = False) -> dict:
    torch.manual_seed(0)
    rq = ResidualQuantizer(DIM, K, DEPTH, shared_codebook=shared)
    t = time.perf_counter()
    rq.fit(torch.from_numpy(xt), beam_size=beam)
    train_s = time.perf_counter() - t
    x = torch.from_numpy(xv)
    codes = rq.encode(x, beam_size=beam)
    mse = float(((rq.decode(codes) - x) ** 2).mean())
    return {"mse": mse, "encode": lambda: rq.encode(x, beam_size=beam), "train_s": train_s}


def faiss_codebooks(name: str, xt: np.ndarray, cache: Path) -> np.ndarray:
    """(DEPTH, K, DIM) codebooks of a greedy-trained faiss ResidualQuantizer, cached as .npy."""
    path = cache / f"faiss_greedy_{re.sub(r'[^a-z0-9]+', '_', name.lower())}_{len(xt)}.npy"
    if not path.exists():
        rq = faiss.ResidualQuantizer(DIM, DEPTH, 8)
        rq.max_beam_size = 1
        rq.train(xt)
        cache.mkdir(parents=True, exist_ok=True)
        np.save(path, faiss.vector_to_array(rq.codebooks).reshape(DEPTH, K, DIM))
    return np.load(path)


def quick(args: argparse.Namespace) -> None:
    """Greedy encode throughput of both sides on the same codebooks (see the module docstring)."""
    for name, make in (("Gaussian N(0, I)", gaussian), ("Fashion-MNIST 8x8 patches", fmnist_patches)):
        xt, xv = make(args.n_train, args.n_test, np.random.default_rng(0))
        books = faiss_codebooks(name, xt, args.cache)
        f = faiss.ResidualQuantizer(DIM, DEPTH, 8)
        f.max_beam_size = 1
        faiss.copy_array_to_vector(books.ravel(), f.codebooks)
        f.is_trained = True
        ours = ResidualQuantizer(DIM, K, DEPTH, shared_codebook=False)
        ours.codebook.copy_(torch.from_numpy(books))
        x = torch.from_numpy(xv)
        fc, oc = f.compute_codes(xv), ours.encode(x)
        f_mse = float(((f.decode(fc) - xv) ** 2).mean())
        o_mse = float(((ours.decode(oc) - x) ** 2).mean())
        unpacked = torch.from_numpy(fc.astype(np.int64))  # 8-bit codes: one byte per depth
        same = float((unpacked == oc).all(dim=1).float().mean())
        (fw, fc), (ow, oc) = best_rates([partial(f.compute_codes, xv), partial(ours.encode, x)], len(xv),
                                        args.repeats)
        print(f"{name}: faiss {fw:,.0f} vec/s ({fc:,.0f} per CPU s), ours {ow:,.0f} vec/s ({oc:,.0f} per "
              f"CPU s): {ow / fw:.2f}x wall, {oc / fc:.2f}x CPU; MSE faiss {f_mse:.5f} ours {o_mse:.5f}; "
              f"identical codes for {same:.2%} of vectors", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=30_000)
    ap.add_argument("--n-test", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=1, help="threads for both torch and faiss")
    ap.add_argument("--repeats", type=int, default=5, help="timed encodes; the fastest counts")
    ap.add_argument("--shared", action="store_true", help="also fit our shared-codebook variant")
    ap.add_argument("--no-write", action="store_true", help=f"only print, do not update {DOC.name}")
    ap.add_argument("--quick", action="store_true",
                    help="only time greedy encoding with faiss's (cached) codebooks on both sides")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/rqvae_quantizer_vs_faiss"),
                    help="where --quick keeps faiss's fitted codebooks")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    if args.quick:
        quick(args)
        return

    rows, checks = [], []
    load = os.getloadavg()
    start = time.perf_counter()
    for name, make in (("Gaussian N(0, I)", gaussian), ("Fashion-MNIST 8x8 patches", fmnist_patches)):
        xt, xv = make(args.n_train, args.n_test, np.random.default_rng(0))
        for beam in (1, 8):
            f = run_faiss(xt, xv, beam)
            o = run_ours(xt, xv, beam)
            (f["rate"], f["cpu"]), (o["rate"], o["cpu"]) = best_rates([f["encode"], o["encode"]], len(xv),
                                                                      args.repeats)
            rel = (o["mse"] / f["mse"] - 1) * 100
            rows.append(f"| {name} | {beam} | {f['mse']:.5f} | {o['mse']:.5f} | {rel:+.2f}% | "
                        f"{f['rate']:,.0f} | {o['rate']:,.0f} | {o['rate'] / f['rate']:.2f}x | "
                        f"{f['cpu']:,.0f} | {o['cpu']:,.0f} | {o['cpu'] / f['cpu']:.2f}x | "
                        f"{f['train_s']:.1f} / {o['train_s']:.1f} |")
            print(rows[-1], flush=True)
            if beam == 1:
                ok = o["mse"] <= 1.02 * f["mse"]
                checks.append(f"{name}: greedy MSE within 2% of faiss ({rel:+.2f}%): "
                              f"{'met' if ok else 'MISSED'}")
            else:
                ok = o["mse"] <= f["mse"]
                checks.append(f"{name}: beam-8 MSE no worse than faiss ({rel:+.2f}%): "
                              f"{'met' if ok else 'MISSED'}")
            ok = o["rate"] >= f["rate"]
            checks.append(f"{name}: beam-{beam} encode throughput at least faiss's "
                          f"({o['rate'] / f['rate']:.2f}x wall clock, {o['cpu'] / f['cpu']:.2f}x CPU time): "
                          f"{'met' if ok else 'MISSED'} (wall clock)")
            if args.shared:
                s = run_ours(xt, xv, beam, shared=True)
                s["rate"], s["cpu"] = best_rates([s["encode"]], len(xv), args.repeats)[0]
                rows.append(f"| {name}, ours shared codebook (256 codes in all) | {beam} | | "
                            f"{s['mse']:.5f} | | | {s['rate']:,.0f} | | | {s['cpu']:,.0f} | | "
                            f"- / {s['train_s']:.1f} |")
                print(rows[-1], flush=True)
    total = time.perf_counter() - start

    section = "\n".join([
        HEADING,
        "",
        f"`.venv/bin/python benchmarks/quantizer_vs_faiss.py --n-train {args.n_train} --n-test {args.n_test} "
        f"--threads {args.threads}{' --shared' if args.shared else ''}` "
        f"(faiss {faiss.__version__}, torch {torch.__version__}, {platform.machine()}, "
        f"{args.threads} thread(s) each, on a shared machine; {total:.0f} s in all).",
        "",
        f"d={DIM}, depth {DEPTH}, K={K} codes per depth (one codebook per depth on both sides). Held-out MSE",
        "per element; each side trained separately for the encoding it is evaluated with (beam 1 =",
        "greedy: faiss `max_beam_size=1`, ours `fit(beam_size=1)`; beam 8: `max_beam_size=8`,",
        "`fit(beam_size=8)`). Throughput: encoding the held-out set, fastest of "
        f"{args.repeats} runs (the two sides",
        "take turns), in vectors per second of wall-clock time and per second of process CPU time; the",
        "machine is shared, so the wall clock includes waiting for a core and the CPU-time figures are the",
        f"steadier comparison. Load average (1 min) at the start: {load[0]:.1f}, at the end: "
        f"{os.getloadavg()[0]:.1f} ({os.cpu_count()} cores).",
        "",
        "| data | beam | faiss MSE | ours MSE | ours vs faiss | faiss vec/s | ours vec/s | speed | "
        "faiss vec/CPU s | ours vec/CPU s | speed (CPU) | train s (faiss / ours) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Targets (computed from this run):",
        "",
        *[f"- {c}" for c in checks],
        "",
    ])
    print()
    print(section)
    if not args.no_write:
        text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
        pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
        if pattern.search(text):
            text = pattern.sub(lambda _: section + "\n", text)
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        DOC.write_text(text)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
