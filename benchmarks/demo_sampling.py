"""Sampling settings on a finished demo run: classifier accuracy and FID of 1,000 class-balanced samples.

Loads ``DEMO/vae/model``, ``DEMO/ar/model`` (or ``--ar DIR``, e.g. a ``rqvae train-ar`` run trained on the
demo's tokenizer) and ``DEMO/classifier``, draws ``--samples`` images per setting with
:func:`rqvae.demo.stages.generate_images` (the demo's own sampler and seed), and measures them as the demo
does: the classifier's accuracy against the intended classes, FID against the demo's cached 1,000 test
images (``DEMO/cache``). Each setting is a JSON object of ``DemoConfig`` sampling fields; one result row
per setting is appended to ``--out`` (JSON lines) and printed as a table row.

    python benchmarks/demo_sampling.py runs/demo \\
        '[{"cfg_scale": 3.0}, {"cfg_scale": 3.0, "top_k": 32}, {"cfg_scale": 3.0, "temperature": 0.9}]'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from rqvae.data.build import build_image_dataset
from rqvae.demo.config import DemoConfig
from rqvae.demo.side import fid_reference_count
from rqvae.demo.stages import generate_images
from rqvae.eval.fid import frechet_distance, reference_stats
from rqvae.eval.inception import InceptionFeatures
from rqvae.models.classifier import Classifier, classifier_accuracy
from rqvae.models.transformer import RQTransformer
from rqvae.models.vae import RQVAE

SAMPLING_FIELDS = ("top_k", "top_p", "temperature", "cfg_scale", "seed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("demo", type=Path, help="a finished `rqvae demo --out` folder")
    p.add_argument("settings", help="JSON list of objects of DemoConfig sampling fields")
    p.add_argument("--ar", type=Path, help="RQ-Transformer folder (default: DEMO/ar/model)")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--out", type=Path, help="append result rows here (JSON lines)")
    args = p.parse_args()
    settings = json.loads(args.settings)
    for s in settings:
        if set(s) - set(SAMPLING_FIELDS):
            raise SystemExit(f"unknown sampling fields {sorted(set(s) - set(SAMPLING_FIELDS))}; "
                             f"use {SAMPLING_FIELDS}")
    saved = json.loads((args.demo / "report.json").read_text())["config"] \
        if (args.demo / "report.json").is_file() else {}
    base = DemoConfig(**{k: v for k, v in saved.items() if k in DemoConfig.__dataclass_fields__})
    vae = RQVAE.from_pretrained(args.demo / "vae" / "model").eval()
    ar = RQTransformer.from_pretrained(args.ar or args.demo / "ar" / "model").eval()
    classifier = Classifier.from_pretrained(args.demo / "classifier").eval()
    net = InceptionFeatures(base.inception)
    test = build_image_dataset(base.data, base.image_size, base.channels, split="test")
    n_ref = fid_reference_count(base, len(test))
    ref, _, _ = reference_stats(base.data, net, base.image_size, base.channels, "test", n_ref,
                                cache_dir=args.demo / "cache")
    print("| AR | setting | classifier acc | FID | sampling s | FID s |\n|---|---|---|---|---|---|")
    for s in settings:
        cfg = dataclasses.replace(base, **s)
        labels = torch.arange(args.samples) % ar.config.num_classes
        t = time.time()
        samples = generate_images(ar, vae, labels, cfg)
        sample_s = time.time() - t
        acc = classifier_accuracy(samples, labels, classifier)
        t = time.time()
        value, _ = frechet_distance((samples[i:i + 50] for i in range(0, len(samples), 50)), ref, net)
        row = dict(ar=str(args.ar or "demo"), setting=s, accuracy=acc, fid=value, samples=args.samples,
                   reference=n_ref, sample_s=round(sample_s, 1), fid_s=round(time.time() - t, 1))
        print(f"| {row['ar']} | `{json.dumps(s)}` | {acc:.3f} | {value:.2f} | {row['sample_s']} | "
              f"{row['fid_s']} |", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
