"""Rate-distortion of the learned codec (``rqvae compress``) against JPEG and WebP, written to docs/codec.md.

    .venv/bin/python benchmarks/codec.py --vae runs/demo/vae/model --prior runs/demo/ar/model \
        --data fmnist --count 1000 --out docs/codec.md

For every depth d = 1..D, each test image is encoded by the RQ-VAE, its first d codes per position are
range-coded (with the RQ-Transformer prior under the most likely class, and with the prior-free adaptive
model), and the file size (header included) gives bits per pixel; PSNR / SSIM are of the decoded image
against the original at the model's size. JPEG and WebP (Pillow) code the same images at the quality whose
file is closest in size to the RQ file of that image (matched rates per image). The gap between the payload
and the prior's NLL of the codes is reported too, and a subset of files is decompressed to check that the
decoder reproduces the codes exactly.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from rqvae.cli.compress import load_models
from rqvae.codec import format as rqv
from rqvae.codec.codec import compress_codes, decode_image, decompress_codes, most_likely_class
from rqvae.data import build_image_dataset
from rqvae.data.images import tensor_to_pil

HEADER_BYTES = rqv.HEADER_BYTES


def _scores(rec: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB) and SSIM of images (N, C, S, S) in [-1, 1], averaged over images."""
    a, b = (rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean()
    ssim = structural_similarity_index_measure(a, b, data_range=1.0)
    return float(psnr), float(ssim)


def _pil_codec(im: Image.Image, fmt: str, quality: int) -> tuple[int, torch.Tensor]:
    buf = io.BytesIO()
    im.save(buf, format=fmt, quality=quality)
    size = buf.tell()
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(im.mode), dtype=np.float32)
    t = torch.from_numpy(back / 127.5 - 1)
    return size, (t[None] if t.ndim == 2 else t.permute(2, 0, 1))


def matched(im: Image.Image, fmt: str, target_bytes: int) -> tuple[int, torch.Tensor]:
    """The quality (1..100) whose file size is closest to ``target_bytes``."""
    best = None
    lo, hi = 1, 100
    while lo <= hi:  # file size grows with quality: binary search, keeping the closest
        q = (lo + hi) // 2
        size, rec = _pil_codec(im, fmt, q)
        if best is None or abs(size - target_bytes) < abs(best[0] - target_bytes):
            best = (size, rec)
        lo, hi = (q + 1, hi) if size < target_bytes else (lo, q - 1)
    return best


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(1)
    vae, prior = load_models(args.vae, args.prior)
    ds = build_image_dataset(args.data, vae.config.image_size, vae.config.in_channels, split="test")
    n = min(args.count, len(ds))
    x = torch.stack([ds[i]["image"] for i in range(n)])  # (N, C, S, S)
    with torch.inference_mode():
        codes = vae.encode(x)  # (N, h, w, D)
    pixels = x.shape[-1] * x.shape[-2]
    rows = []
    for d in range(1, vae.config.depth + 1):
        t0 = time.process_time()
        rec = torch.stack([decode_image(vae, c[..., :d].numpy()) for c in codes])
        psnr, ssim = _scores(rec, x)
        sizes = {}
        for name, model in (("prior", prior), ("adaptive", None)):
            if name == "prior" and prior is None:
                continue
            files, nll = [], 0.0
            for c in codes:
                cond = (most_likely_class(c, prior, d),) if model is not None and \
                    prior.config.cond_type == "class" else ()
                out = compress_codes(c, vae, model, cond=cond, depth=d)
                files.append(out)
                nll += out.nll_bits
            for out in files[:args.check]:  # the decoder reproduces the codes exactly
                got, _ = decompress_codes(out.data, vae, model)
                assert np.array_equal(got, out.codes), "decoded codes differ"
            sizes[name] = files
            total = sum(len(f.data) for f in files)
            payload = sum(f.header.payload_len for f in files)
            rows.append(dict(codec=f"RQ d={d} ({name})", bpp=8 * total / (n * pixels),
                             payload_bpp=8 * payload / (n * pixels), psnr=psnr, ssim=ssim,
                             gap=payload / (nll / 8) - 1))
        target = sizes["prior" if "prior" in sizes else "adaptive"]
        for fmt in ("JPEG", "WEBP"):
            got = [matched(tensor_to_pil(xi), fmt, len(f.data)) for xi, f in zip(x, target)]
            fpsnr, fssim = _scores(torch.stack([g[1] for g in got]), x)
            rows.append(dict(codec=f"{fmt} matched to d={d}", bpp=8 * sum(g[0] for g in got) / (n * pixels),
                             payload_bpp=None, psnr=fpsnr, ssim=fssim, gap=None))
        print(f"depth {d}: {time.process_time() - t0:.0f} s CPU", file=sys.stderr)
    return _markdown(rows, args, n)


def _markdown(rows: list[dict], args: argparse.Namespace, n: int) -> str:
    fmt = lambda v, f: "" if v is None else format(v, f)
    lines = ["| codec | bits per pixel (file) | bpp (payload) | PSNR (dB) | SSIM | payload / NLL - 1 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['codec']} | {r['bpp']:.3f} | {fmt(r['payload_bpp'], '.3f')} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.4f} | {fmt(r['gap'], '+.2%')} |")
    cmd = "python benchmarks/codec.py " + " ".join(sys.argv[1:])
    return f"""# The learned codec: rate and distortion

`rqvae compress` keeps the first d codes of every position of the RQ-VAE's code map and range-codes them
(`constriction`) with the RQ-Transformer's probabilities (`--prior`) in raster-then-depth order, or with
per-depth adaptive frequencies without a prior. The file is a {HEADER_BYTES}-byte header (plus 4 bytes per
condition id) and the payload; see `src/rqvae/codec/format.py`. `rqvae decompress` decodes the same codes
bit for bit.

Measured on {n} `{args.data}` test images ({args.check} files per row decompressed and checked equal) with:

    {cmd}

- *bits per pixel (file)*: the whole `.rqv` file (header included) / pixels at the model's input size.
- *bpp (payload)*: the range-coded codes alone. *payload / NLL - 1*: how far the payload is from the
  model's negative log-likelihood of the codes (the ideal code length).
- JPEG and WebP (Pillow) code the same images at the quality whose file is closest in size to each image's
  `.rqv` file (matched rates per image); their sizes include their own headers.

{chr(10).join(lines)}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", required=True)
    p.add_argument("--prior", default=None)
    p.add_argument("--data", default="fmnist")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--check", type=int, default=10, help="files per depth decompressed and checked")
    p.add_argument("--out", default=None, help="markdown file for the table (default: print it)")
    args = p.parse_args()
    table = run(args)
    if args.out:
        Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
