"""``rqvae train-classifier``: train the small CNN used for rejection sampling and the in-domain
accuracy of class-conditional samples (``rqvae eval --accuracy``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="image folder with one sub-folder per class, WebDataset shards, or 'fmnist[:DIR]'")
    p.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    p.add_argument("--steps", type=int, default=2000,
                   help="optimizer steps (default 2000: 89.5%% Fashion-MNIST test accuracy, measured)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (cosine decay)")
    p.add_argument("--image-size", type=int, default=32, help="training image size (Fashion-MNIST: 32)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 (grayscale) or 3 (RGB); default: 1 for fmnist, else 3")
    p.add_argument("--width", type=int, default=32, help="channels of the first stage")
    p.add_argument("--test-split", default="test",
                   help="split for the held-out accuracy (Fashion-MNIST: test; folders: a 'test' "
                        "sub-folder); 'none' to skip")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    from rqvae.data import build_image_dataset
    from rqvae.errors import UserError
    from rqvae.models.classifier import Classifier, ClassifierConfig, train_classifier

    fmnist = args.data == "fmnist" or args.data.startswith("fmnist:")
    channels = args.channels or (1 if fmnist else 3)
    train = build_image_dataset(args.data, args.image_size, channels, split="train", augment=not args.no_flip)
    names = getattr(train, "class_names", None)
    num_classes = getattr(train, "num_classes", 0)
    if num_classes < 2:
        raise UserError(f"{args.data} has {num_classes} class(es); a classifier needs images in at least two "
                        "class sub-folders")
    test = None
    if args.test_split != "none":
        try:
            test = build_image_dataset(args.data, args.image_size, channels, split=args.test_split)
        except UserError:
            test = None
        same_root = Path(getattr(test, "root", "")) == Path(getattr(train, "root", ""))
        if test is not None and not fmnist and same_root:
            test = None  # a folder without a test split: the "test" set would be the training set
    torch.manual_seed(args.seed)
    model = Classifier(ClassifierConfig(in_channels=channels, num_classes=num_classes, width=args.width,
                                        image_size=args.image_size, class_names=tuple(names or ())))
    model.to(args.device)
    out = Path(args.out)
    result = train_classifier(model, train, args.steps, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, eval_dataset=test, run_dir=str(out / "logs"),
                              progress=not args.no_progress)
    model.save_pretrained(out)
    summary = {"steps": result.steps, "final_loss": result.final_loss,
               "train_accuracy": result.train_accuracy, "test_accuracy": result.test_accuracy,
               "seconds": result.seconds, "data": args.data}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    acc = "n/a" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    print(f"classifier saved to {out}: {result.steps} steps in {result.seconds:.0f} s, "
          f"train accuracy {result.train_accuracy:.4f}, test accuracy {acc}")
    return 0
