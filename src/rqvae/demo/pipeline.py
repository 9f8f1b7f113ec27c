"""The main job end to end (``make demo`` / ``rqvae demo``): :func:`run_demo`.

On Fashion-MNIST (or any image folder) on CPU:

1. train a small RQ-VAE (stage 1)                         -> ``OUT/vae/model``
2. train a small classifier (for accuracy and rejection)  -> ``OUT/classifier``
3. train a class-conditional RQ-Transformer (stage 2)     -> ``OUT/ar/model``
4. PSNR per depth and rFID on held-out test images, a grid of samples per class, the coarse-to-fine
   figure (paper Fig. 5), loss curves, the classifier's accuracy on the samples, and FID of the samples
   against the same test images beside its floor (as many real training images against them)
5. write ``OUT/report.json`` and ``OUT/report.html`` that shows all of it.

Each stage is skipped when its output exists (a second run reuses what is trained) and resumes
from its last checkpoint when a previous run was interrupted.

Modules: :mod:`~rqvae.demo.config` (settings), :mod:`~rqvae.demo.stages` (training and sampling),
:mod:`~rqvae.demo.plots`, :mod:`~rqvae.demo.report`; the figure of step 4 is
:func:`rqvae.eval.figures.coarse_to_fine` (rows labelled with the test PSNR from d codes).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from rqvae.data.build import build_image_dataset
from rqvae.data.images import make_grid, save_image
from rqvae.demo.config import DEMO_AR_MODEL, DemoConfig
from rqvae.demo.plots import plot_loss_curves
from rqvae.demo.report import fmt, write_report
from rqvae.demo.side import FLOOR_SEED, REFERENCE_SEED, SideJobs, fid_reference_count
from rqvae.demo.stages import generate_images, train_or_load_ar, train_or_load_classifier, train_or_load_vae
from rqvae.errors import UserError
from rqvae.eval.fid import fid_floor, frechet_distance, reference_stats
from rqvae.eval.figures import coarse_to_fine, label_grid, tile_coarse_to_fine
from rqvae.eval.inception import InceptionFeatures
from rqvae.eval.tokenizer import evaluate_tokenizer
from rqvae.models.classifier import classifier_accuracy

__all__ = ["DEMO_AR_MODEL", "DemoConfig", "run_demo"]


def _stage(name: str) -> None:
    print(f"\n== {name}", flush=True)


def _timed(timings: dict[str, float], key: str, title: str, fn: Any) -> Any:
    """Run one stage under its title and record its wall time."""
    _stage(title)
    t = time.time()
    result = fn()
    timings[key] = time.time() - t
    return result


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings: dict[str, float] = {}

    # Fail early, before any training, when the data or the FID network is missing.
    test = build_image_dataset(cfg.data, cfg.image_size, cfg.channels, split="test")
    net = InceptionFeatures(cfg.inception) if cfg.eval_samples > 0 else None

    side = SideJobs.start(cfg, fid_reference_count(cfg, len(test)))
    try:
        vae = _timed(timings, "vae", "1/4 RQ-VAE (stage 1)", lambda: train_or_load_vae(cfg, out).eval())
        if side is None:
            classifier, classifier_test_acc = _timed(timings, "classifier", "2/4 classifier (for in-domain "
                                                     "accuracy)", lambda: train_or_load_classifier(cfg, out))
        else:
            side.reclaim_if_done()
        ar = _timed(timings, "ar", "3/4 RQ-Transformer (stage 2, class-conditional)",
                    lambda: train_or_load_ar(cfg, out).eval())
        if side is not None:
            timings.update(_timed(timings, "waiting for the side process", "2/4 classifier and the real "
                                  "images' FID statistics (side process)", side.wait))
            classifier, classifier_test_acc = train_or_load_classifier(cfg, out)
    finally:
        if side is not None:
            side.close()

    _stage("4/4 samples, figures, metrics")
    t = time.time()
    num_classes = ar.config.num_classes
    class_names = list(getattr(test, "class_names", [])) or [str(i) for i in range(num_classes)]
    metrics, psnr_per_depth = _metrics(cfg, out, vae=vae, ar=ar, classifier=classifier,
                                       classifier_test_acc=classifier_test_acc, net=net, n_test=len(test))
    _figures(cfg, out, vae, ar, test, class_names, psnr_per_depth)
    timings["evaluation"] = time.time() - t
    for k, v in timings.items():
        metrics[f"time: {k} (s)"] = round(v, 1)

    results = {
        "data": cfg.data, "config": dataclasses.asdict(cfg), "metrics": metrics,
        "psnr_per_depth": psnr_per_depth, "class_names": class_names,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "total_seconds": round(time.time() - t0, 1),
    }
    write_report(out, results)
    print(f"\nwrote {out / 'report.html'}")
    for k, v in metrics.items():
        print(f"  {k}: {fmt(v)}")
    return results


def _figures(cfg: DemoConfig, out: Path, vae: Any, ar: Any, test: Any, class_names: list[str],
             psnr_per_depth: dict[int, float]) -> None:
    """Samples per class (a row per class, labelled with its name), the coarse-to-fine figure (paper
    Fig. 5: a row per depth, labelled with the test PSNR from that many codes) and the loss curves."""
    grid_labels = torch.arange(ar.config.num_classes).repeat_interleave(cfg.samples_per_class)
    grid = generate_images(ar, vae, grid_labels, cfg)
    samples = make_grid(grid, nrow=cfg.samples_per_class)
    save_image(label_grid(samples, row_labels=class_names), out / "samples_per_class.png")
    images = torch.stack([test[i]["image"] for i in range(min(cfg.fig5_images, len(test)))])
    rows = tile_coarse_to_fine(images, coarse_to_fine(vae, images))
    labels = ["input"] + [f"d={d}: {p:.1f} dB" for d, p in sorted(psnr_per_depth.items())]
    save_image(label_grid(rows, row_labels=labels), out / "coarse_to_fine.png")
    plot_loss_curves({"RQ-VAE": out / "vae", "RQ-Transformer": out / "ar"}, out / "loss_curves.png")


def _metrics(cfg: DemoConfig, out: Path, *, vae: Any, ar: Any, classifier: Any,
             classifier_test_acc: float | None, net: InceptionFeatures | None, n_test: int
             ) -> tuple[dict[str, Any], dict[int, float]]:
    """Test PSNR per depth, rFID, the classifier's accuracy on real and generated images, and FID, each
    FID beside its floor: as many real training images against the same held-out test images."""
    metrics: dict[str, Any] = {}
    n = fid_reference_count(cfg, n_test)
    size, ch, cache = cfg.image_size, cfg.channels, out / "cache"
    ref = None
    if net is not None:  # the held-out statistics, shared by FID and rFID (computed once, cached)
        ref, _, _ = reference_stats(cfg.data, net, size, ch, "test", n, cache_dir=cache,
                                    seed=REFERENCE_SEED, progress=cfg.progress)
    tok = evaluate_tokenizer(vae, cfg.data, split="test", count=n, rfid=net is not None, net=net,
                             cache_dir=cache, progress=cfg.progress)
    psnr_per_depth = {d: r["psnr"] for d, r in _per_depth(tok).items()}
    for d, p in psnr_per_depth.items():
        metrics[f"test PSNR, depth {d} (dB)"] = p
    if classifier_test_acc is not None:
        metrics["classifier accuracy on real test images"] = classifier_test_acc
    if ref is not None:
        floor = fid_floor(cfg.data, "train", n, ref, net, size, ch, cache_dir=cache, seed=FLOOR_SEED,
                          progress=cfg.progress)
        metrics[f"FID floor ({n} train vs {n} test images)"] = floor
        metrics[f"rFID ({n} test reconstructions vs the same test images)"] = tok["rfid"]
    if cfg.eval_samples > 0:
        labels = torch.arange(cfg.eval_samples) % ar.config.num_classes
        samples = generate_images(ar, vae, labels, cfg)
        metrics["classifier accuracy on generated images"] = classifier_accuracy(samples, labels, classifier)
        if ref is not None:
            value, _ = frechet_distance((samples[i:i + 50] for i in range(0, len(samples), 50)), ref, net)
            metrics[f"FID ({len(samples)} samples vs {n} test images)"] = value
            metrics["FID - floor"] = value - floor
    return metrics, psnr_per_depth


def _per_depth(tok: dict[str, Any]) -> dict[int, dict[str, float]]:
    """The per-depth part of :func:`rqvae.eval.tokenizer.evaluate_tokenizer`'s result, keyed by depth."""
    per = tok.get("per_depth") or tok.get("depths")
    if per is None:
        raise UserError("evaluate_tokenizer returned no per-depth results")
    if isinstance(per, dict):
        return {int(k): v for k, v in per.items()}
    return {int(r["depth"]): r for r in per}
