"""Benchmark: train the `fmnist32-8x8x4` RQ-VAE on Fashion-MNIST on CPU and measure coarse-to-fine quality.

Reports, on Fashion-MNIST test images, the PSNR of the reconstruction from the first d codes of every
position (d = 1..D; it must rise with d: residual quantization refines coarse-to-fine), and the code
usage and perplexity per depth. Writes ``docs/results-rqvae-fmnist.md`` and keeps the model in
``runs/bench/rqvae_fmnist/model`` (a save_pretrained folder) for the stage-2 experiments.

    .venv/bin/python benchmarks/rqvae_fmnist.py --steps 2000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from rqvae.data import build_image_dataset
from rqvae.data.images import save_image
from rqvae.eval.figures import coarse_to_fine_grid
from rqvae.models.vae import RQVAE
from rqvae.train.vae import TrainVAEConfig, psnr_from_mse, train_vae

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def evaluate(model: RQVAE, images: torch.Tensor, batch_size: int = 250) -> dict:
    """Per-depth PSNR (mean over images of 10 log10(4 / MSE_image)) and code usage on ``images``."""
    model.eval()
    D = model.config.depth
    psnr_sum = torch.zeros(D, dtype=torch.float64)
    mse_sum = torch.zeros(D, dtype=torch.float64)
    latents = []
    for s in range(0, images.shape[0], batch_size):
        x = images[s:s + batch_size]  # (B, 1, 32, 32)
        z = model.encode_latent(x)  # (B, 8, 8, n_z)
        latents.append(z)
        codes = model.quantizer.encode(z)  # (B, 8, 8, D)
        for d in range(1, D + 1):
            rec = model.decode(codes, depth=d).clamp(-1, 1)
            mse = ((rec - x) ** 2).flatten(1).mean(1).double()  # (B,)
            psnr_sum[d - 1] += (10 * torch.log10(4.0 / mse.clamp_min(1e-12))).sum()
            mse_sum[d - 1] += mse.sum()
    n = images.shape[0]
    usage = model.quantizer.usage(torch.cat(latents))
    return {
        "psnr": (psnr_sum / n).tolist(),
        "psnr_of_mean_mse": [psnr_from_mse(float(m)) for m in (mse_sum / n)],
        "used": usage.used, "perplexity": usage.perplexity, "n_images": n,
    }


def coarse_to_fine_figure(model: RQVAE, images: torch.Tensor, path: Path) -> None:
    """Rows: originals, then reconstructions from d = 1..D codes (paper Fig. 5)."""
    save_image(coarse_to_fine_grid(model, images), path)


def speed_probe(batch_size: int = 8, steps: int = 2) -> str:
    """Seconds per training step (forward + backward + Adam) of the preset for 1 / 2 threads x fp32 / bf16,
    as a markdown section."""
    lines = ["## CPU speed probe", "",
             f"Seconds per training step of `fmnist32-8x8x4` (batch {batch_size}, forward + backward + Adam, "
             f"mean of {steps} steps after one warm-up step), measured while other jobs shared the cores:",
             "",
             "| torch threads | fp32 | bf16 autocast |", "|---|---|---|"]
    x = torch.rand(batch_size, 1, 32, 32) * 2 - 1
    for threads in (1, 2):
        torch.set_num_threads(threads)
        row = []
        for bf16 in (False, True):
            torch.manual_seed(0)
            model = RQVAE.from_preset("fmnist32-8x8x4")
            opt = torch.optim.Adam(model.parameters(), 4e-4, betas=(0.5, 0.9))
            times = []
            for _ in range(steps + 1):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = model(x)
                loss = ((out.reconstruction.float() - x) ** 2).mean() + 0.25 * out.commitment_loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                times.append(time.perf_counter() - t)
            row.append(sum(times[1:]) / steps)
        lines.append(f"| {threads} | {row[0]:.2f} | {row[1]:.2f} |")
    lines += ["", "Under contention one thread beats two (OpenMP threads wait for each other when the cores "
              "are oversubscribed), and bf16 autocast does not help these small convolutions: in a torch "
              "profile of this model the bf16 convolutions ran in `aten::_slow_conv2d_forward/backward` "
              "instead of oneDNN. The benchmark therefore trains in fp32 with one thread.", "",
              "Command: `.venv/bin/python benchmarks/rqvae_fmnist.py --speed-probe`", ""]
    return "\n".join(lines)


def replace_section(path: Path, heading: str, text: str) -> None:
    """Put ``text`` (a section starting with ``heading``) into the markdown file, replacing an old one."""
    old = path.read_text() if path.exists() else ""
    start = old.find(heading)
    if start < 0:
        path.write_text(old.rstrip("\n") + "\n\n" + text)
        return
    end = old.find("\n## ", start + len(heading))
    path.write_text(old[:start] + text + (old[end + 1:] if end >= 0 else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="default: the preset's (4e-4)")
    ap.add_argument("--disc-weight", type=float, default=0.0,
                    help="GAN weight (off by default: the CPU budget goes to reconstruction)")
    ap.add_argument("--disc-start", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest when other processes share the cores)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (slower here: see the results page)")
    ap.add_argument("--eval-images", type=int, default=1000, help="Fashion-MNIST test images to evaluate")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "rqvae_fmnist"))
    ap.add_argument("--report", default=str(ROOT / "docs" / "results-rqvae-fmnist.md"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue an interrupted benchmark run")
    ap.add_argument("--speed-probe", action="store_true",
                    help="only time fp32 vs bf16 and 1 vs 2 threads; update that section of the report")
    args = ap.parse_args()
    if args.speed_probe:
        section = speed_probe()
        print(section)
        replace_section(Path(args.report), "## CPU speed probe", section)
        return

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    cfg = TrainVAEConfig(data="fmnist", run_dir=str(out), preset="fmnist32-8x8x4",
                         batch_size=args.batch_size, steps=args.steps, lr=args.lr,
                         disc_weight=args.disc_weight, disc_start=args.disc_start,
                         bf16=args.bf16, checkpoint_every=max(1, args.steps // 4), log_every=50,
                         sample_every=max(1, args.steps // 4), seed=args.seed, resume=args.resume,
                         tensorboard=True, progress=True)
    t0 = time.time()
    model = train_vae(cfg)
    train_s = time.time() - t0

    test = build_image_dataset("fmnist", 32, 1, split="test")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(test), generator=g)[: args.eval_images]
    images = torch.stack([test[int(i)]["image"] for i in idx])  # (N, 1, 32, 32)
    t1 = time.time()
    res = evaluate(model, images)
    eval_s = time.time() - t1
    coarse_to_fine_figure(model, images[:10], out / "coarse_to_fine.png")

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    res.update({"train_seconds": train_s, "eval_seconds": eval_s, "steps": args.steps,
                "batch_size": args.batch_size, "lr": cfg.learning_rate(), "threads": args.threads,
                "train_psnr_last_log": last.get("psnr"),
                "params_M": sum(p.numel() for p in model.parameters()) / 1e6})
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))

    rising = all(b > a for a, b in zip(res["psnr"], res["psnr"][1:]))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    cmd = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rqvae_fmnist.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in
        (("steps", args.steps), ("batch_size", args.batch_size), ("eval_images", args.eval_images)))
    rows = "\n".join(
        f"| {d} | {p:.2f} | {pm:.2f} | {u} / {model.config.codebook_size} | {ppl:.1f} |"
        for d, (p, pm, u, ppl) in enumerate(zip(res["psnr"], res["psnr_of_mean_mse"], res["used"],
                                                 res["perplexity"]), start=1))
    precision = "fp32 + bf16 autocast" if args.bf16 else "fp32"
    rel = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    report = f"""# RQ-VAE on Fashion-MNIST (`fmnist32-8x8x4`, CPU)

Measured by `benchmarks/rqvae_fmnist.py` (commit {commit}) on this machine's CPU
({os.cpu_count()} cores shared with other jobs, {args.threads} torch thread(s), {precision}).

Command:

```
{cmd}
```

Model: {res['params_M']:.2f}M parameters, 32x32x1 images (28x28 zero-padded, background -1) -> 8x8x4 codes,
one shared codebook of K = {model.config.codebook_size}, n_z = {model.config.embed_dim}. Training:
{args.steps} steps x batch {args.batch_size} (= {args.steps * args.batch_size / 60000:.2f} epochs), Adam lr
{cfg.learning_rate():g}, betas (0.5, 0.9), MSE + 0.25 commitment, EMA codebook (decay 0.99) with dead-code
restarts, {'GAN weight ' + str(args.disc_weight) if args.disc_weight > 0 else 'no GAN'}, no LPIPS (no VGG
weights offline). Training took {train_s / 60:.1f} min; evaluation of {res['n_images']} test images
{eval_s:.0f} s.

## Reconstruction from the first d codes (Fashion-MNIST test, {res['n_images']} images)

| d | PSNR (dB, mean per image) | PSNR of mean MSE (dB) | codes used | perplexity |
|---|---|---|---|---|
{rows}

PSNR rises with every depth: {'yes' if rising else 'NO'}. Code usage and perplexity are of the codes
chosen at each depth for the test images (perplexity = exp(entropy); {model.config.codebook_size} would be
uniform use). Training-batch PSNR (full depth), mean over the last logged window up to step
{last['step']}: {last.get('psnr', float('nan')):.2f} dB.

Figure (written by the run, not committed): `{rel}/coarse_to_fine.png`: the top row holds test images,
the rows below their reconstructions from d = 1..4 codes. The model is in `{rel}/model`
(`RQVAE.from_pretrained`).
"""
    probe_old = Path(args.report).read_text() if Path(args.report).exists() else ""
    Path(args.report).write_text(report)
    if "## CPU speed probe" in probe_old:  # keep the last probe's section
        start = probe_old.find("## CPU speed probe")
        end = probe_old.find("\n## ", start + 1)
        kept = probe_old[start:end + 1] if end >= 0 else probe_old[start:]
        replace_section(Path(args.report), "## CPU speed probe", kept)
    print(f"wrote {args.report}")
    if not rising or any(math.isnan(p) for p in res["psnr"]):
        raise SystemExit("PSNR does not rise with depth")


if __name__ == "__main__":
    main()
