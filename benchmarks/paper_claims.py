"""The paper's claims at small scale, on Fashion-MNIST, on this CPU. Writes ``docs/results.md`` + PNGs.

1. Table 4 at small scale: rFID (beside its floor), PSNR and SSIM of VQ (D = 1) at 8x8 with K = 256,
   1024, 4096, VQ at 16x16 with K = 256, and RQ at 8x8 with K = 256 and D = 2, 4, 8 -- the claim: raising
   D helps more than raising K. Each tokenizer is trained with the demo's stage-1 recipe (``DemoConfig``,
   read at run time: no GAN, k-means codebook init, cosine lr) for ``--vae-steps`` with a validation
   curve, once per ``--seeds``; a difference smaller than the seed-to-seed spread is "no difference".
   Rows are keyed by tokenizer, seed and recipe, so rows of other recipes in results.json never mix in.
2. Table 2's ablation at small scale: class-conditional FID and classifier accuracy of an
   RQ-Transformer trained with and without soft labeling + stochastic sampling (on the 8x8x4 RQ-VAE).
3. Figure 5: coarse-to-fine reconstructions of the 8x8x4 RQ-VAE.

Every number is measured in the run. Finished pieces are kept in ``runs/paper_claims/``
(``results.json``, a row saved as each piece finishes), so an interrupted run continues where it stopped.
Pieces run in ``--workers`` processes of one thread each. Hours on 2 cores (14 tokenizers of 3000
steps by default); Table 4 alone:

    nice .venv/bin/python benchmarks/paper_claims.py --only table4

The pieces live in ``benchmarks/claims/``: experiments, store (results.json), pool (worker processes),
plots, markdown, table4 (Table 4 over seeds), spread (the "no difference" rule), recipe (the demo's).
Writes docs/results.md except its marked sections (the Reference run's), which it keeps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from claims.experiments import ABLATION, TOKENIZERS, classifier, figure5, row_key, table2_row, table4_row
from claims.markdown import write_markdown
from claims.plots import plot_table4
from claims.pool import run_pieces
from claims.store import load, save
from claims.table4 import by_tokenizer, means

ROOT = Path(__file__).resolve().parent.parent


def table4(args: argparse.Namespace, out: Path, results: dict) -> None:
    rows = results.setdefault("table4", {})
    keys = [row_key(name, seed, args) for name in args.tokenizers for seed in args.seeds]
    for key in keys:
        if key in rows:
            print(f"[table 4] {key}: done before ({rows[key]['rfid']:.2f} rFID)")
    run_pieces(table4_row, keys, rows, args=args, out=out, results=results,
               describe=lambda key, r: f"[table 4] {r['label']} seed {r['seed']}: rFID {r['rfid']:.2f} "
               f"(floor {r['floor']:.2f}), PSNR {r['psnr']:.2f} dB ({r['train_seconds']:.0f} s)")
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
    p.add_argument("--vae-steps", type=int, default=3000, help="steps of every Table 4 tokenizer")
    p.add_argument("--ar-steps", type=int, default=1500)
    p.add_argument("--classifier-steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=64, help="batch of Table 2's RQ-Transformers (Table 4: "
                   "the demo's)")
    p.add_argument(
        "--eval-images", type=int, default=2000,
        help="test images for rFID (beside its floor) / PSNR / Table 2's FID reference"
    )
    p.add_argument("--samples", type=int, default=1000, help="generated images per ablation arm")
    p.add_argument("--seed", type=int, default=0, help="seed of Table 2's arms")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of every Table 4 tokenizer")
    p.add_argument("--tokenizers", nargs="+", choices=list(TOKENIZERS), default=list(TOKENIZERS),
                   help="train only these Table 4 tokenizers (e.g. another seed for two of them); the table "
                   "shows every tokenizer with rows")
    p.add_argument("--bf16", action="store_true", help="train Table 4's tokenizers under bf16 autocast where "
                   "it is measured faster (float32 elsewhere); rows are keyed apart from float32 rows")
    p.add_argument("--only", choices=("table4", "table2", "all"), default="all")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (one thread each)")
    args = p.parse_args()

    out, docs = Path(args.out), Path(args.docs)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results = load(out / "results.json")
    t4 = f"--vae-steps {args.vae_steps} --seeds {' '.join(map(str, args.seeds))}" + (
        f" --tokenizers {' '.join(args.tokenizers)}" if args.tokenizers != list(TOKENIZERS) else "")
    t2 = f"--ar-steps {args.ar_steps} --batch-size {args.batch_size} --samples {args.samples}"
    command = " ".join(  # the options that shape what this run measured
        [*([t4] if args.only != "table2" else []), *([t2] if args.only != "table4" else []),
         f"--eval-images {args.eval_images}", *(["--bf16"] if args.bf16 else []),
         *([f"--only {args.only}"] if args.only != "all" else [])])
    commands = results.setdefault("commands", [])  # every invocation whose rows the docs show, in order
    if command not in commands:
        commands.append(command)
    if args.only in ("table4", "all"):
        table4(args, out, results)
        plot_table4(means(by_tokenizer(results["table4"], args)), docs / "img" / "paper_claims_table4.png")
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
