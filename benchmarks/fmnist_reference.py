"""The reference run (issue 10): a tokenizer, a classifier and class-conditional RQ-Transformers trained
to a plateau on Fashion-MNIST with the demo's recipe (``DemoConfig``'s defaults, read at run time, more
steps), then

* FID of ``--samples`` class-balanced samples against ``--ref`` test images, beside the floor (as many
  training images against the same test images), and classifier accuracy on samples and real images;
* test PSNR / SSIM / rFID per depth (reconstructions from the first d codes) on ``--recon-images`` test
  images, beside the floor at that size;
* Table 2's ablation (soft labels + stochastic sampling vs neither), two seeds each, FID and accuracy of
  ``--ablation-samples`` samples per arm, with a verdict that calls differences smaller than the
  seed-to-seed spread "no difference".

Resumable: every piece writes its row to ``OUT/results.json`` when it finishes, trainings resume from
their checkpoints, samples and Inception features are cached in chunks; a rerun skips finished work.
Independent pieces run in ``--workers`` processes of one thread each. Writes the "Reference run" section
of ``docs/results.md`` (only that section) and its figures. Hours on 2 cores:

    nice .venv/bin/python benchmarks/fmnist_reference.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from claims import machine, reference, reference_markdown
from claims.chunks import chunked, missing
from claims.experiments import inception
from claims.pool import run_pieces
from claims.sections import replace_section
from claims.store import load, save
from rqvae.data.build import build_image_dataset
from rqvae.data.images import make_grid, save_image
from rqvae.eval.figures import coarse_to_fine, label_grid, tile_coarse_to_fine
from rqvae.models.vae import RQVAE

ROOT = Path(__file__).resolve().parent.parent


def estimate(args: argparse.Namespace, out: Path, depth: int) -> dict:
    """Inception passes still needed (images), times seconds per image measured on 20 images."""
    sets = {"real-test": args.ref, "real-train": reference.floor_count(args),
            **{f"recon-d{d}": args.recon_images for d in range(1, depth + 1)},
            **{f"samples-{a}": reference.arm_samples(a, args) for a in reference.ARMS}}
    todo = sum(missing(out / "feats" / name, n) for name, n in sets.items())
    per_image = machine.seconds_per_image(inception())
    est = {"images": sum(sets.values()), "images_left": todo, "seconds_per_image": round(per_image, 4),
           "estimated_seconds": round(todo * per_image / max(1, args.workers))}
    print(f"Inception passes: {todo} of {est['images']} images left x {per_image:.3f} s/image "
          f"/ {args.workers} worker(s) = ~{est['estimated_seconds'] / 60:.0f} min", flush=True)
    return est


def _loaded(folder: Path, n: int) -> torch.Tensor:
    def fail(i: int, j: int) -> torch.Tensor:
        raise FileNotFoundError(f"{folder}: chunk {i}-{j} missing")
    return chunked(folder, n, fail)


def figures(args: argparse.Namespace, out: Path, rows: dict, img: Path) -> None:
    """The samples per class (a row per class) and the coarse-to-fine figure with PSNR per depth."""
    test = build_image_dataset(args.data, 32, 1, split="test")
    if f"samples/{reference.MAIN}" in rows:
        samples = _loaded(out / "samples" / reference.MAIN, args.samples)
        k, cols = test.num_classes, min(10, args.samples // test.num_classes)
        grid = torch.stack([samples[c::k][:cols] for c in range(k)]).flatten(0, 1)  # row c: class c
        save_image(label_grid(make_grid(grid, nrow=cols), row_labels=list(test.class_names)),
                   img / "reference_samples.png")
    if "recon" in rows:
        vae = RQVAE.from_pretrained(out / "vae" / "model").eval()
        images = torch.stack([test[i]["image"] for i in range(8)])
        grid = tile_coarse_to_fine(images, coarse_to_fine(vae, images))
        labels = ["input"] + [f"d={p['depth']}: {p['psnr']:.1f} dB" for p in rows["recon"]["per_depth"]]
        save_image(label_grid(grid, row_labels=labels), img / "reference_coarse_to_fine.png")


def report(args: argparse.Namespace, out: Path, results: dict, docs: Path) -> None:
    results["reference_updated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    save(out / "results.json", results)
    figures(args, out, results.get("reference", {}), docs / "img")
    body = reference_markdown.section(results, args)
    replace_section(docs / "results.md", reference_markdown.SECTION, body)


def describe(name: str, row: dict) -> str:
    shown = {k: v for k, v in row.items() if isinstance(v, (int, float, str)) and k != "seconds"}
    return f"[{name}] done in {row['seconds']:.0f} s: {shown}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fmnist")
    p.add_argument("--out", default=str(ROOT / "runs" / "fmnist_reference"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--ar-steps", type=int, default=3000)
    p.add_argument("--classifier-steps", type=int, default=2000)
    p.add_argument("--samples", type=int, default=10000, help="samples of the main model for FID")
    p.add_argument("--ref", type=int, default=10000, help="test images FID is measured against")
    p.add_argument("--recon-images", type=int, default=2000, help="test images for PSNR / rFID per depth")
    p.add_argument("--ablation-samples", type=int, default=2000, help="samples per arm of the ablation")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (one thread each)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args()

    out, docs = Path(args.out), Path(args.docs)
    out.mkdir(parents=True, exist_ok=True)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    results = load(out / "results.json")
    rows = results.setdefault("reference", {})
    sessions = results.setdefault("reference_sessions", [])  # every invocation: a resumed run shows them all
    legacy = results.get("reference_machine")  # results.json of a run started before sessions were kept
    if legacy and legacy not in sessions:  # (kept in the file: saving merges with it)
        sessions.insert(0, legacy)
    m = machine.machine(args.workers)
    if reference.unfinished(rows):  # a run that only rewrites a finished run's docs is not a session of it
        sessions.append(m)
    print(f"machine: {machine.describe(m)}\ncommand: {m['command']}", flush=True)
    results["reference_estimate"] = estimate(args, out, depth=4 if "vae" not in rows else
                                             RQVAE.from_pretrained(out / "vae" / "model").config.depth)
    for name in (n for phase in reference.phases() for n in phase if n in rows):
        print(f"[{name}] done before ({rows[name]['seconds']:.0f} s)")
    save(out / "results.json", results)
    try:
        for phase in reference.phases():
            run_pieces(reference.piece, phase, rows, args=args, out=out, results=results, describe=describe)
            report(args, out, results, docs)
    finally:  # an interrupted or failed run still leaves its partial section
        report(args, out, results, docs)
    print(reference_markdown.section(results, args))


if __name__ == "__main__":
    main()
