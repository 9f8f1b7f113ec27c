"""``rqvae sample``: draw images from an RQ-Transformer and decode them with its RQ-VAE.

    rqvae sample --model AR_DIR --vae VAE_DIR --class 3 --n 64 -o out/
    rqvae sample --model AR_DIR --vae VAE_DIR --text "a red dress" --n 16 -o out/ --top-p 0.9

Writes ``out/grid.png`` and each sample as ``out/images/000000.png``, ...; for class-conditional models in
one sub-folder per class, ``out/images/<class id>/000000.png``, the layout ``rqvae eval --accuracy`` reads
(``rqvae eval --fid out/images`` scores them). ``--top-k``, ``--top-p`` and ``--temperature`` take
one value or one per code depth (comma separated, e.g. ``--top-k 0,64,64,64``; 0 = off).
``--cfg-scale`` > 1 uses classifier-free guidance (models trained with cfg_dropout).
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
                        help="RQ-Transformer folder (train-ar output)")
    parser.add_argument("--vae", required=True, metavar="VAE_DIR",
                        help="the RQ-VAE folder the model was trained on (ours, or an official folder)")
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder for the PNGs")
    parser.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    parser.add_argument("--class", dest="classes", type=int, nargs="+", metavar="ID",
                        help="class id(s) for class-conditional models; several ids cycle over the images")
    parser.add_argument("--text", help="prompt for text models (encoded with AR_DIR/tokenizer.json)")
    parser.add_argument("--top-k", default=None, help="top-k per depth (0 = off); default off")
    parser.add_argument("--top-p", default=None, help="nucleus probability per depth (1 = off); default off")
    parser.add_argument("--temperature", default="1.0", help="softmax temperature per depth (default 1.0)")
    parser.add_argument("--cfg-scale", type=float, default=1.0,
                        help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="matmul dtype while sampling (auto: bf16 on CUDA and AMX CPUs, else fp32)")
    parser.add_argument("--nrow", type=int, default=None, help="images per grid row (default: about sqrt(n))")


def load_vae(path: str | Path):
    """Our RQ-VAE folder, or an official one (model.pt + config.yaml, converted in memory)."""
    return load_rqvae(path)


def check_pair(model, vae) -> None:
    """The RQ-VAE must be the one whose codebook the RQ-Transformer embeds its codes with."""
    c, vc = model.config, vae.config
    if vc.depth != c.depth or vc.codebook_size != c.vocab_size or vc.embed_dim != c.embed_dim:
        raise UserError(f"the RQ-VAE (depth {vc.depth}, K {vc.codebook_size}, n_z {vc.embed_dim}) does not "
                        f"match the RQ-Transformer (depth {c.depth}, K {c.vocab_size}, n_z {c.embed_dim}); "
                        "pass the --vae the model was trained on")
    cb = vae.quantizer.codebook[0].detach().float().to(model.codebook.device)
    if not torch.allclose(cb, model.codebook, atol=1e-5):
        raise UserError("the RQ-VAE's codebook differs from the codebook stored in the RQ-Transformer; "
                        "pass the --vae the model was trained on")


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
        if not args.classes:
            raise UserError(f"this model is class-conditional; pass --class ID (0..{c.num_classes - 1})")
        bad = [k for k in args.classes if not 0 <= k < c.num_classes]
        if bad:
            raise UserError(f"--class {bad[0]} is out of range; "
                            f"this model has classes 0..{c.num_classes - 1}")
        ids = torch.tensor(args.classes, dtype=torch.long)
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
    model_dir = Path(args.model)
    model = RQTransformer.from_pretrained(model_dir, map_location=device).eval()
    vae = load_vae(args.vae).to(device).eval()
    check_pair(model, vae)
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
                               top_p=pick(top_p), cfg_scale=args.cfg_scale, generator=g, dtype=dtype)
        with torch.no_grad():
            images.append(vae.decode(codes).float().clamp(-1, 1).cpu())  # (b, C, H, W)
    seconds = time.perf_counter() - t0
    images_t = torch.cat(images)
    per_class = model.config.cond_type == "class"
    for i, im in enumerate(images_t):
        folder = out / "images" / (str(int(cond[i])) if per_class else "")
        folder.mkdir(parents=True, exist_ok=True)
        save_image(im, folder / f"{i:06d}.png")
    nrow = args.nrow or math.ceil(math.sqrt(args.n))
    save_image(make_grid(images_t, nrow=nrow), out / "grid.png")
    print(f"sampled {args.n} images ({model.config.code_shape} codes, depth {D}) in {seconds:.2f} s "
          f"({args.n / seconds:.1f} images/s) -> {out}/images/ and {out}/grid.png")
    return 0
