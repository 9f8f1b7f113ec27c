"""``rqvae sample``: draw images from an RQ-Transformer and decode them with its RQ-VAE.

    rqvae sample --model AR_DIR --vae VAE_DIR --class 3 --n 64 -o out/
    rqvae sample --model AR_DIR --vae VAE_DIR --text "a red dress" --n 16 -o out/ --top-p 0.9
    rqvae sample --model AR_RUN --vae VAE_RUN --class fruit --n 16 -o out/   (a run folder means RUN/model)

Writes ``out/grid.png`` and each sample as ``out/images/000000.png``, ...; for class-conditional models in
one sub-folder per class, ``out/images/<class name>/000000.png`` (``<class id>`` for models without class
names), the layout ``rqvae eval --accuracy`` reads (``rqvae eval --fid out/images`` scores them).
``--class`` takes class ids or the names in the model's config (``rqvae info AR_DIR`` lists them).
``--top-k``, ``--top-p`` and ``--temperature`` take one value or one per code depth (comma separated, e.g.
``--top-k 0,64,64,64``; 0 = off). ``--cfg-scale`` > 1 uses classifier-free guidance (models trained with
``train-ar --cond-dropout``, e.g. 0.1).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from rqvae.data.images import make_grid, save_image
from rqvae.data.text import encode_texts, load_tokenizer
from rqvae.errors import UserError
from rqvae.eval.classes import class_folder, class_table, parse_class
from rqvae.eval.pairing import check_pair
from rqvae.models.hub import resolve_model_dir
from rqvae.models.transformer import RQTransformer
from rqvae.official.vae import load_rqvae


def _values(text: str | None, kind: type, name: str) -> list | None:
    """'5' -> [5]; '0,64,64,64' -> [0, 64, 64, 64]; None -> None."""
    if text is None:
        return None
    try:
        return [kind(v) for v in str(text).split(",")]
    except ValueError:
        raise UserError(f"--{name} takes a number or comma-separated numbers (one per depth), got {text!r}") \
            from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="AR_DIR",
                        help="RQ-Transformer folder (a train-ar run folder means RUN/model)")
    parser.add_argument("--vae", required=True, metavar="VAE_DIR",
                        help="the RQ-VAE folder the model was trained on (ours, a train-vae run folder, "
                             "or an official folder)")
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder for the PNGs")
    parser.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    parser.add_argument("--class", dest="classes", nargs="+", metavar="ID|NAME",
                        help="class id(s) or name(s) for class-conditional models; several cycle over the "
                             "images")
    parser.add_argument("--text", help="prompt for text models (encoded with AR_DIR/tokenizer.json)")
    parser.add_argument("--top-k", default=None, help="top-k per depth (0 = off); default off")
    parser.add_argument("--top-p", default=None, help="nucleus probability per depth (1 = off); default off")
    parser.add_argument("--temperature", default="1.0", help="softmax temperature per depth (default 1.0)")
    parser.add_argument("--cfg-scale", type=float, default=1.0,
                        help="classifier-free guidance scale (1 = off; > 1 needs a model trained with "
                             "train-ar --cond-dropout, e.g. 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="matmul dtype while sampling (auto: bf16 on CUDA; on a CPU the faster of fp32 "
                        "and bf16 for each weight shape, measured once per machine)")
    parser.add_argument("--impl", choices=("auto", "reference", "fast", "graphs"), default="auto",
                        help="sampler: auto = fast; reference = the model's own blocks with KV caches; "
                             "graphs (CUDA only) = fast with each step recorded as a CUDA graph and replayed")
    parser.add_argument("--nrow", type=int, default=None, help="images per grid row (default: about sqrt(n))")


def build_conditions(model, args: argparse.Namespace, model_dir: Path) -> torch.Tensor | None:
    """(n,) class ids, (n, L) text ids, or None (unconditional)."""
    c = model.config
    n = args.n
    if c.cond_type == "uncond":
        if args.classes is not None or args.text is not None:
            raise UserError("this model is unconditional; drop --class / --text")
        return None
    if c.cond_type == "class":
        if args.text is not None:
            raise UserError("this model is class-conditional, not text-conditional; use --class ID")
        names = getattr(c, "class_names", ())
        if not args.classes:
            known = f": {class_table(names)}" if names else f" (0..{c.num_classes - 1})"
            raise UserError(f"this model is class-conditional; pass --class ID or NAME{known}")
        ids = torch.tensor([parse_class(k, c.num_classes, names) for k in args.classes], dtype=torch.long)
        return ids.repeat(math.ceil(n / len(ids)))[:n]
    if args.classes is not None:
        raise UserError("this model is text-conditional; use --text \"...\" instead of --class")
    if args.text is None:
        raise UserError("this model is text-conditional; pass --text \"a prompt\"")

    tok = load_tokenizer(model_dir, max_len=c.cond_len)
    ids = encode_texts(tok, [args.text])  # (1, L)
    if int(ids.max()) >= c.text_vocab_size:
        raise UserError(f"{model_dir}/tokenizer.json has ids beyond the model's text vocabulary "
                        f"({c.text_vocab_size}); use the tokenizer saved with the model")
    return ids.expand(n, -1)


def run(args: argparse.Namespace) -> int:
    if args.n < 1 or args.batch_size < 1:
        raise UserError("--n and --batch-size must be at least 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA device is available; use --device cpu")
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model_dir = resolve_model_dir(args.model)
    model = RQTransformer.from_pretrained(model_dir, map_location=device).eval()
    vae = load_rqvae(args.vae).to(device).eval()  # ours, a run, or an official folder
    check_pair(vae, model)
    if args.cfg_scale != 1:
        _ = model.config.null_id  # a model without a null condition: its one-line error before sampling
    D = model.config.depth
    top_k = _values(args.top_k, int, "top-k")
    top_p = _values(args.top_p, float, "top-p")
    temperature = _values(args.temperature, float, "temperature")
    pick = lambda v: None if v is None else (v[0] if len(v) == 1 else v)
    cond = build_conditions(model, args, model_dir)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(args.seed)
    images = []
    t0 = time.perf_counter()
    for start in range(0, args.n, args.batch_size):
        b = min(args.batch_size, args.n - start)
        c = None if cond is None else cond[start:start + b].to(device)
        codes = model.generate(c, batch_size=b, temperature=pick(temperature), top_k=pick(top_k),
                               top_p=pick(top_p), cfg_scale=args.cfg_scale, generator=g, dtype=dtype,
                               impl=args.impl)
        with torch.no_grad():
            images.append(vae.decode(codes).float().clamp(-1, 1).cpu())  # (b, C, H, W)
    seconds = time.perf_counter() - t0
    images_t = torch.cat(images)
    folders = _class_folders(model.config, cond) if model.config.cond_type == "class" else {}
    for i, im in enumerate(images_t):
        sub = folders[int(cond[i])] if folders else ""
        save_image(im, out / "images" / sub / f"{i:06d}.png")
    nrow = args.nrow or math.ceil(math.sqrt(args.n))
    save_image(make_grid(images_t, nrow=nrow), out / "grid.png")
    print(f"sampled {args.n} images ({model.config.code_shape} codes, depth {D}) in {seconds:.2f} s "
          f"({args.n / seconds:.1f} images/s) -> {out}/images/ and {out}/grid.png")
    names = getattr(model.config, "class_names", ())
    for k, folder in folders.items():
        name = f" ({names[k]})" if names else ""
        print(f"  class {k}{name}: {int((cond == k).sum())} images in {out}/images/{folder}/")
    return 0


def _class_folders(config, cond: torch.Tensor) -> dict[int, str]:
    """Class id -> its samples' sub-folder: the class name (as a folder name) when the model has names,
    else the id."""
    names = getattr(config, "class_names", ())
    return {k: class_folder(names[k]) if names else str(k) for k in sorted(set(cond.tolist()))}
