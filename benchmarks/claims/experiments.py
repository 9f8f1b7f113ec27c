"""The experiments: one function per piece of work (a tokenizer of Table 4, an arm of Table 2's ablation),
each returning its result row; plus the classifier that scores Table 2 and the Figure 5 image.

Pieces run in worker processes (:mod:`claims.pool`), so each function takes only picklable arguments and
loads what it needs."""

from __future__ import annotations

import argparse
import functools
import hashlib
import time
from pathlib import Path

import torch

from claims import recipe
from claims.curves import plateau
from claims.store import save, training_seconds
from rqvae.data.build import build_image_dataset
from rqvae.data.images import save_image
from rqvae.demo.config import DEMO_AR_MODEL, DemoConfig
from rqvae.demo.stages import generate_images
from rqvae.eval.fid import fid, fid_floor, reference_stats
from rqvae.eval.figures import coarse_to_fine_grid
from rqvae.eval.inception import InceptionFeatures
from rqvae.eval.tokenizer import evaluate_tokenizer
from rqvae.models.classifier import Classifier, ClassifierConfig, classifier_accuracy
from rqvae.models.transformer import RQTransformer
from rqvae.models.vae import RQVAE
from rqvae.train.ar import TrainARConfig, train_ar
from rqvae.train.classifier import evaluate_dataset, train_classifier
from rqvae.train.precision import bf16_is_fast
from rqvae.train.vae import train_vae

# name -> (RQVAEConfig overrides of the fmnist32-8x8x4 preset, label in the table)
TOKENIZERS = {
    "vq-8x8x1-K256": (dict(codebook_size=256, depth=1), "VQ 8x8x1, K=256"),
    "vq-8x8x1-K1024": (dict(codebook_size=1024, depth=1), "VQ 8x8x1, K=1024"),
    "vq-8x8x1-K4096": (dict(codebook_size=4096, depth=1), "VQ 8x8x1, K=4096"),
    "vq-16x16x1-K256": (dict(codebook_size=256, depth=1, ch_mult=(1, 2)), "VQ 16x16x1, K=256"),
    "rq-8x8x2-K256": (dict(codebook_size=256, depth=2), "RQ 8x8x2, K=256"),
    "rq-8x8x4-K256": (dict(codebook_size=256, depth=4), "RQ 8x8x4, K=256"),
    "rq-8x8x8-K256": (dict(codebook_size=256, depth=8), "RQ 8x8x8, K=256"),
}
ABLATION = {
    "soft+stochastic": dict(soft_labels=True, stochastic=True),
    "hard+greedy": dict(soft_labels=False, stochastic=False),
}


@functools.cache
def inception() -> InceptionFeatures:
    """The FID network, loaded once per process."""
    return InceptionFeatures()


def row_key(name: str, seed: int, args: argparse.Namespace) -> str:
    """A Table 4 row's key in results.json: the tokenizer, the seed and the recipe (older rows, keyed by
    the name alone or by another recipe, are never mixed with these)."""
    return f"{name}|s{seed}|{recipe.vae_recipe(DemoConfig(), args.vae_steps, args.bf16)}"


def tokenizer_run(out: Path, key: str) -> Path:
    name, seed, rec = key.split("|")
    return out / "vae" / f"{name}-{seed}-{hashlib.sha256(rec.encode()).hexdigest()[:8]}"


def train_tokenizer(key: str, args: argparse.Namespace, out: Path) -> RQVAE:
    """One tokenizer of Table 4 with the demo's stage-1 recipe (``claims.recipe``), resumed if
    interrupted, reused if done."""
    run = tokenizer_run(out, key)
    if (run / "model-last" / "config.json").is_file():
        return RQVAE.from_pretrained(run / "model")
    name, seed, _ = key.split("|")
    cfg = recipe.vae_config(run, data=args.data, steps=args.vae_steps, seed=int(seed[1:]),
                            overrides=TOKENIZERS[name][0], progress=args.progress, bf16=args.bf16)
    return train_vae(cfg)


def table4_row(key: str, args: argparse.Namespace, out: Path) -> dict:
    """Train (or reuse) one tokenizer of Table 4 (one seed) and score it on the test split: rFID beside
    the floor at that size (as many training images against the same test images), PSNR, SSIM."""
    name, seed, rec = key.split("|")
    t = time.time()
    vae = train_tokenizer(key, args, out).eval()
    train_s = training_seconds(tokenizer_run(out, key), time.time() - t)
    net, cache = inception(), out / "cache"
    ev = evaluate_tokenizer(vae, args.data, split="test", count=args.eval_images, net=net, cache_dir=cache,
                            progress=args.progress)
    ref, _, _ = reference_stats(args.data, net, 32, 1, "test", args.eval_images, cache_dir=cache)
    full = ev["per_depth"][-1]
    h, w, d = vae.code_shape()
    return {
        "name": name, "seed": int(seed[1:]), "recipe": rec, "steps": args.vae_steps,
        "label": TOKENIZERS[name][1], "code_shape": [h, w, d], "codebook_size": vae.config.codebook_size,
        "rfid": ev["rfid"],
        "floor": fid_floor(args.data, "train", args.eval_images, ref, net, 32, 1, cache_dir=cache, seed=1),
        "psnr": full["psnr"], "ssim": full["ssim"], "psnr_per_depth": [r["psnr"] for r in ev["per_depth"]],
        "codes_used": ev["code_usage"]["used"], "perplexity": ev["code_usage"]["perplexity"],
        "plateau": plateau(tokenizer_run(out, key), f"val/psnr_d{d}"),
        "params": sum(p.numel() for p in vae.parameters()), "train_seconds": round(train_s, 1),
        "eval_images": ev["num_images"],
        "precision": "bf16" if args.bf16 and bf16_is_fast("cpu") else "fp32",
    }


def main_tokenizer(out: Path, args: argparse.Namespace) -> Path:
    """The 8x8x4 tokenizer (seed 0) that Table 2 and Figure 5 use."""
    return tokenizer_run(out, row_key("rq-8x8x4-K256", 0, args)) / "model"


def _train_ar(name: str, args: argparse.Namespace, out: Path, vae_dir: Path) -> RQTransformer:
    run = out / "ar" / name
    if (run / "model" / "config.json").is_file():
        return RQTransformer.from_pretrained(run / "model")
    return train_ar(
        TrainARConfig(
            vae=str(vae_dir),
            data=args.data,
            run_dir=str(run),
            cond="class",
            preset="fmnist-small",
            model=dict(DEMO_AR_MODEL),
            steps=args.ar_steps,
            batch_size=args.batch_size,
            checkpoint_every=max(1, args.ar_steps // 2),
            sample_every=0,
            seed=args.seed,
            resume=(run / "checkpoints").is_dir(),
            feature_cache=str(out / "cache"),
            progress=args.progress,
            tensorboard=False,
            **ABLATION[name],
        )
    )


def table2_row(name: str, args: argparse.Namespace, out: Path) -> dict:
    """Train (or reuse) one arm of Table 2's ablation; FID and classifier accuracy of its samples."""
    vae_dir = main_tokenizer(out, args)
    vae = RQVAE.from_pretrained(vae_dir).eval()
    clf = Classifier.from_pretrained(out / "classifier").eval()
    t = time.time()
    ar = _train_ar(name, args, out, vae_dir)
    train_s = time.time() - t
    ar.eval()
    labels = torch.arange(args.samples) % ar.config.num_classes
    samples = generate_images(ar, vae, labels, DemoConfig(seed=args.seed))
    res = fid(
        [samples[i : i + 50] for i in range(0, len(samples), 50)],
        args.data,
        inception(),
        image_size=32,
        split="test",
        ref_count=args.eval_images,
        cache_dir=out / "cache",
    )
    return {
        "fid": res["fid"],
        "accuracy": classifier_accuracy(samples, labels, clf),
        "samples": len(samples),
        "reference_images": res["num_reference"],
        "train_seconds": round(train_s, 1),
        **ABLATION[name],
    }


def figure5(out: Path, docs_img: Path, args: argparse.Namespace) -> Path:
    vae = RQVAE.from_pretrained(main_tokenizer(out, args)).eval()
    test = build_image_dataset(args.data, 32, 1, split="test")
    images = torch.stack([test[i]["image"] for i in range(10)])
    return save_image(coarse_to_fine_grid(vae, images), docs_img / "paper_claims_fig5.png")


def classifier(args: argparse.Namespace, out: Path, results: dict) -> None:
    """The in-domain classifier that scores Table 2's samples (trained once, reused)."""
    clf_dir = out / "classifier"
    if (clf_dir / "config.json").is_file():
        clf = Classifier.from_pretrained(clf_dir)
    else:
        train = build_image_dataset(args.data, 32, 1, split="train", augment=True)
        torch.manual_seed(args.seed)
        clf = Classifier(
            ClassifierConfig(
                in_channels=1, num_classes=train.num_classes, class_names=tuple(train.class_names)
            )
        )
        train_classifier(clf, train, steps=args.classifier_steps, seed=args.seed, progress=args.progress)
        clf.save_pretrained(clf_dir)
    results["classifier_test_accuracy"] = evaluate_dataset(
        clf.eval(), build_image_dataset(args.data, 32, 1, "test")
    )
    save(out / "results.json", results)
