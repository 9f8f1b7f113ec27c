"""The paper's claims at small scale, on Fashion-MNIST, on this CPU. Writes ``docs/results.md`` + PNGs.

1. Table 4 at small scale: rFID and PSNR of VQ (D = 1) at 8x8 with K = 256, 1024, 4096, VQ at 16x16
   with K = 256, and RQ at 8x8 with K = 256 and D = 2, 4, 8 -- the claim: raising D helps more than
   raising K.
2. Table 2's ablation at small scale: class-conditional FID and classifier accuracy of an
   RQ-Transformer trained with and without soft labeling + stochastic sampling (on the 8x8x4 RQ-VAE).
3. Figure 5: coarse-to-fine reconstructions of the 8x8x4 RQ-VAE.

Every tokenizer is trained with the same recipe and number of steps; every number is measured in the
run. Finished pieces are kept in ``runs/paper_claims/`` (``results.json``, a row saved as each piece
finishes), so an interrupted run continues where it stopped. Pieces run in ``--workers`` processes of one
thread each. Minutes to an hour on 2 cores:

    .venv/bin/python benchmarks/paper_claims.py --vae-steps 1500 --ar-steps 1500

The pieces live in ``benchmarks/claims/``: experiments, store (results.json), pool (worker processes),
plots, markdown.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from claims.experiments import ABLATION, TOKENIZERS, classifier, figure5, table2_row, table4_row
from claims.markdown import write_markdown
from claims.plots import plot_table4
from claims.pool import run_pieces
from claims.store import load, save, training_seconds

ROOT = Path(__file__).resolve().parent.parent


def table4(args: argparse.Namespace, out: Path, results: dict) -> None:
    rows = results.setdefault("table4", {})
    for name in TOKENIZERS:
        if name in rows:
            print(f"[table 4] {rows[name]['label']}: done before ({rows[name]['rfid']:.2f} rFID)")
            rows[name]["train_seconds"] = round(
                training_seconds(out / "vae" / name, rows[name]["train_seconds"]), 1
            )
    run_pieces(table4_row, list(TOKENIZERS), rows, args=args, out=out, results=results,
               describe=lambda name, r: f"[table 4] {r['label']}: rFID {r['rfid']:.2f}, "
               f"PSNR {r['psnr']:.2f} dB ({r['train_seconds']:.0f} s)")
    save(out / "results.json", results)


def table2(args: argparse.Namespace, out: Path, results: dict) -> None:
    rows = results.setdefault("table2", {})
    for name in ABLATION:
        if name in rows:
            print(f"[table 2] {name}: done before (FID {rows[name]['fid']:.2f})")
    run_pieces(table2_row, list(ABLATION), rows, args=args, out=out, results=results,
               describe=lambda name, r: f"[table 2] {name}: FID {r['fid']:.2f}, accuracy {r['accuracy']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fmnist")
    p.add_argument("--out", default=str(ROOT / "runs" / "paper_claims"))
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--ar-steps", type=int, default=1500)
    p.add_argument("--classifier-steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--eval-images", type=int, default=1000, help="test images for rFID / PSNR / FID reference"
    )
    p.add_argument("--samples", type=int, default=1000, help="generated images per ablation arm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=("table4", "table2", "all"), default="all")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (one thread each)")
    args = p.parse_args()

    out, docs = Path(args.out), Path(args.docs)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results = load(out / "results.json")
    results["command"] = (
        f"--vae-steps {args.vae_steps} --ar-steps {args.ar_steps} --batch-size "
        f"{args.batch_size} --eval-images {args.eval_images} --samples {args.samples}"
    )
    if args.only in ("table4", "all"):
        table4(args, out, results)
        plot_table4(results["table4"], docs / "img" / "paper_claims_table4.png")
        figure5(out, docs / "img", args)
    if args.only in ("table2", "all"):
        classifier(args, out, results)
        table2(args, out, results)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    save(out / "results.json", results)
    write_markdown(results, args, docs / "results.md")
    print((docs / "results.md").read_text())


if __name__ == "__main__":
    main()
