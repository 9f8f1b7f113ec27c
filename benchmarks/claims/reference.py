"""Pieces of ``benchmarks/fmnist_reference.py``, each returning its result row (saved by
:func:`claims.pool.run_pieces` as soon as it finishes). Trainings resume from their checkpoints;
generated samples and Inception features are cached on disk in chunks (:mod:`claims.chunks`), so an
interrupted piece redoes at most one chunk.

Folders under OUT: ``vae/``, ``classifier/``, ``ar/<arm>-s<seed>/`` (runs with metrics.jsonl),
``samples/<arm>-s<seed>/``, ``feats/<set>/`` (caches), ``cache/`` (the AR's code cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from claims import recipe
from claims.chunks import chunked, features, fid
from claims.curves import plateau
from claims.experiments import ABLATION, inception
from rqvae.data.build import build_image_dataset
from rqvae.demo.config import DemoConfig
from rqvae.demo.stages import generate_images
from rqvae.eval.batches import dataset_batches, subset_indices
from rqvae.models.classifier import Classifier, ClassifierConfig, classifier_accuracy
from rqvae.models.transformer import RQTransformer
from rqvae.models.vae import RQVAE
from rqvae.train.ar import train_ar
from rqvae.train.ar_loss import soft_label_stats
from rqvae.train.classifier import TrainClassifierConfig, fit_classifier
from rqvae.train.vae import train_vae

SEEDS = (0, 1)
MAIN = "soft+stochastic-s0"  # the main model: also the ablation's soft+stochastic seed-0 arm
PAPER_TAU = 0.5  # the paper's soft-label temperature: an arm beside the demo's (DemoConfig.ar_temperature)
REF_ARMS = {**ABLATION, "soft+stochastic-tau0.5": {**ABLATION["soft+stochastic"], "temperature": PAPER_TAU}}
ARMS = {f"{arm}-s{seed}": (arm, seed) for arm in REF_ARMS for seed in SEEDS}
SOFT_TEMPERATURES = (0.5, 0.1, 0.03, 0.01)  # piece_soft_labels: Q_tau at these and at the trained tau


def arm_samples(arm: str, args: argparse.Namespace) -> int:
    return args.samples if arm == MAIN else args.ablation_samples


def floor_count(args: argparse.Namespace) -> int:
    """Training images whose features every floor draws from: as many as the largest sample set."""
    return max(args.samples, args.ablation_samples, args.recon_images)


def real_images(args: argparse.Namespace, split: str) -> torch.Tensor:
    """The test images FID is measured against (``--ref``, subset seed 0) or the training images of the
    floors (subset seed 1), (N, 1, 32, 32) in [-1, 1]."""
    ds = build_image_dataset(args.data, 32, 1, split=split)
    count, seed = (args.ref, 0) if split == "test" else (floor_count(args), 1)
    return torch.cat(list(dataset_batches(ds, 500, count, seed)))


def real_features(args: argparse.Namespace, out: Path, split: str) -> torch.Tensor:
    return features(out / "feats" / f"real-{split}", real_images(args, split), inception())


def _timed_row(t0: float, **row) -> dict:
    return {**row, "seconds": round(time.time() - t0, 1)}


def piece_vae(args: argparse.Namespace, out: Path) -> dict:
    t0 = time.time()
    run = out / "vae"
    cfg = recipe.vae_config(run, data=args.data, steps=args.vae_steps, seed=0, overrides={},
                            progress=args.progress)
    vae = RQVAE.from_pretrained(run / "model") if (run / "model-last" / "config.json").is_file() \
        else train_vae(cfg)
    depth = vae.config.depth
    return _timed_row(t0, steps=args.vae_steps, recipe=recipe.vae_recipe(DemoConfig(), args.vae_steps),
                      plateau=plateau(run, f"val/psnr_d{depth}"), plateau_loss=plateau(run, "val/loss_rec"))


def piece_classifier(args: argparse.Namespace, out: Path) -> dict:
    """The demo's classifier, ``--classifier-steps`` long; its training loss curve is the plateau evidence
    (the classifier's trainer validates only at the end)."""
    t0, demo, folder = time.time(), DemoConfig(), out / "classifier"
    train = build_image_dataset(args.data, 32, 1, split="train", augment=True)
    test = build_image_dataset(args.data, 32, 1, split="test")
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(
        in_channels=1, num_classes=train.num_classes, width=demo.classifier_width,
        blocks_per_stage=demo.classifier_blocks, image_size=32, class_names=tuple(train.class_names)))
    run = folder / "run"
    cfg = TrainClassifierConfig(
        data=args.data, run_dir=str(run), steps=args.classifier_steps, batch_size=demo.classifier_batch_size,
        lr=demo.classifier_lr, seed=0, progress=args.progress,
        checkpoint_every=max(1, args.classifier_steps // 6),
        log_every=max(1, min(50, args.classifier_steps // 20)), resume=(run / "checkpoints").is_dir(),
        tensorboard=False)
    res = fit_classifier(cfg, model, train, test)
    model.save_pretrained(folder)
    return _timed_row(t0, steps=args.classifier_steps, test_accuracy=res.test_accuracy,
                      plateau=plateau(run, "loss/total"))


def piece_real(split: str, args: argparse.Namespace, out: Path) -> dict:
    t0 = time.time()
    return _timed_row(t0, images=len(real_features(args, out, split)))


def piece_ar(arm: str, args: argparse.Namespace, out: Path) -> dict:
    t0 = time.time()
    name, seed = ARMS[arm]
    run = out / "ar" / arm
    if not (run / "model-last" / "config.json").is_file():
        train_ar(recipe.ar_config(run, vae_dir=out / "vae" / "model", data=args.data, steps=args.ar_steps,
                                  seed=seed, cache=out / "cache", options=REF_ARMS[name],
                                  progress=args.progress))
    tau = json.loads((run / "train_config.json").read_text())["temperature"]  # the one it trained with
    options = {**REF_ARMS[name], "temperature": tau}
    return _timed_row(t0, steps=args.ar_steps, seed=seed, **options, plateau=plateau(run, "val/bits"))


@torch.no_grad()
def piece_recon(args: argparse.Namespace, out: Path) -> dict:
    """Test PSNR / SSIM per depth and rFID of the reconstructions from the first d codes, d = 1..D, on
    ``--recon-images`` of the reference test images, each beside the floor at that size (as many of the
    floor's training features against the same test images' features)."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure  # slow import

    t0, net = time.time(), inception()
    vae = RQVAE.from_pretrained(out / "vae" / "model").eval()
    test = real_images(args, "test")
    pos = torch.tensor(subset_indices(len(test), args.recon_images, 0))
    images, ref = test[pos], real_features(args, out, "test")[pos]
    train = real_features(args, out, "train")
    floor = fid(train[subset_indices(len(train), len(pos), 2)], ref, net)
    codes = torch.cat([vae.encode(images[i:i + 500]) for i in range(0, len(images), 500)])  # (N, h, w, D)
    rows = []
    for d in range(1, vae.config.depth + 1):
        rec = torch.cat([vae.decode(codes[i:i + 500], depth=d).clamp(-1, 1)
                         for i in range(0, len(codes), 500)])
        psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))(((rec + 1) / 2), (images + 1) / 2)
        ssim = StructuralSimilarityIndexMeasure(data_range=1.0)((rec + 1) / 2, (images + 1) / 2)
        feats = features(out / "feats" / f"recon-d{d}", rec, net)
        rows.append({"depth": d, "psnr": float(psnr), "ssim": float(ssim), "rfid": fid(feats, ref, net)})
    return _timed_row(t0, images=len(pos), floor=floor, per_depth=rows)


@torch.no_grad()
def piece_samples(arm: str, args: argparse.Namespace, out: Path) -> dict:
    """Class-balanced samples of one arm (labels 0, 1, ..., 9, 0, ...): classifier accuracy, FID against
    the reference test features beside the floor at that size; the main arm also at the ablation size."""
    t0, net = time.time(), inception()
    _, seed = ARMS[arm]
    vae = RQVAE.from_pretrained(out / "vae" / "model").eval()
    ar = RQTransformer.from_pretrained(out / "ar" / arm / "model").eval()
    clf = Classifier.from_pretrained(out / "classifier").eval()
    k, n, demo = ar.config.num_classes, arm_samples(arm, args), DemoConfig()

    def generate(i: int, j: int) -> torch.Tensor:  # each chunk with its own seed: resumable
        chunk_cfg = dataclasses.replace(demo, seed=seed * 1_000_003 + i)
        return generate_images(ar, vae, torch.arange(i, j) % k, chunk_cfg)

    samples = chunked(out / "samples" / arm, n, generate)
    labels = torch.arange(n) % k
    feats = features(out / "feats" / f"samples-{arm}", samples, net)
    ref, train = real_features(args, out, "test"), real_features(args, out, "train")
    row = {"samples": n, "reference_images": len(ref), "accuracy": classifier_accuracy(samples, labels, clf),
           "fid": fid(feats, ref, net), "floor": fid(train[subset_indices(len(train), n, 2)], ref, net)}
    m = args.ablation_samples
    if n != m:  # the ablation compares FIDs at one size: the first m samples (still class-balanced)
        row["ablation"] = {"samples": m, "fid": fid(feats[:m], ref, net),
                           "accuracy": classifier_accuracy(samples[:m], labels[:m], clf)}
    return _timed_row(t0, **row)


@torch.no_grad()
def piece_soft_labels(args: argparse.Namespace, out: Path) -> dict:
    """How soft the stage-2 targets are on this tokenizer: per depth, the entropy of Q_tau and how often the
    drawn code is the greedy one (:func:`soft_label_stats`) on the latents of ``--recon-images`` reference
    test images, at the temperatures the soft-label arms trained with (read from their runs) and at others."""
    t0 = time.time()
    vae = RQVAE.from_pretrained(out / "vae" / "model").eval()
    test = real_images(args, "test")[:args.recon_images]
    z = torch.cat([vae.encode_latent(test[i:i + 500]) for i in range(0, len(test), 500)])  # (N, h, w, n_z)
    trained = sorted({json.loads((out / "ar" / a / "train_config.json").read_text())["temperature"]
                      for a, (name, _) in ARMS.items() if REF_ARMS[name]["soft_labels"]}, reverse=True)
    stats = {f"{t:g}": soft_label_stats(vae.quantizer, z, t, torch.Generator().manual_seed(0))
             for t in sorted({*trained, *SOFT_TEMPERATURES}, reverse=True)}
    return _timed_row(t0, images=len(test), trained_temperatures=trained,
                      codebook_size=vae.config.codebook_size, by_temperature=stats)


def piece(name: str, args: argparse.Namespace, out: Path) -> dict:
    """Dispatch a piece by name (a picklable entry point for the worker processes)."""
    kind, _, arg = name.partition("/")
    if kind in ("real-test", "real-train"):
        return piece_real(kind.split("-")[1], args, out)
    simple = {"vae": piece_vae, "classifier": piece_classifier, "recon": piece_recon,
              "soft-labels": piece_soft_labels}
    if kind in simple:
        return simple[kind](args, out)
    return {"ar": piece_ar, "samples": piece_samples}[kind](arg, args, out)


def phases() -> list[list[str]]:
    """The pieces in order: each phase needs only what earlier phases made."""
    return [["vae", "classifier", "real-test", "real-train"],
            ["recon", *(f"ar/{a}" for a in ARMS)],  # recon first: one AR arm builds the code cache alone
            [f"samples/{a}" for a in ARMS] + ["soft-labels"]]


def unfinished(rows: dict) -> list[str]:
    """The pieces not in ``rows`` yet, in run order."""
    return [n for phase in phases() for n in phase if n not in rows]
