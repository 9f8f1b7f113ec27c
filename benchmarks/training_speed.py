"""Training throughput (issue 14), two measurements on this machine:

1. **A stage-1 step against the official model's**, side by side: the ``fmnist32-8x8x4`` architecture at
   ch 32 (the official code builds the same network from the equivalent config, run unmodified from its own
   folder, ``--official-src``), the same plain loop (Adam, MSE + 0.25 x commitment loss, no GAN), batch 32,
   ``--threads`` per process, separate processes alternating ``--rounds`` times. Ours in fp32 and with bf16
   autocast. The FLOPs of one step (forward + backward, counted by ``torch.utils.flop_counter``) against
   the fp32 matmul peak measured in the same run say how close to the hardware a step is.
2. **The library's trainers against a plain loop of the same model** at the demo's sizes (``train-vae``
   with the demo's stage-1 recipe on Fashion-MNIST; ``train-ar`` with the demo's stage-2 model on that
   tokenizer's codes): seconds per step from the trainer's own ``time/step_s`` (set-up and code caching
   excluded) and the part of it spent waiting for data (``time/data_s``), beside the plain loop.

    .venv/bin/python benchmarks/training_speed.py --official-src /path/to/official --official-deps DIR
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("official", "fp32", "bf16")
BATCH, CH = 32, 32
LR = 1e-4  # the plain loops' learning rate (speed does not depend on it)


def official_vae_arch() -> dict:
    """The official config of our ``fmnist32-8x8x4`` preset at ch 32."""
    return {"type": "rq-vae", "ema": None,
            "hparams": {"bottleneck_type": "rq", "embed_dim": 64, "n_embed": 256, "latent_shape": [8, 8, 64],
                        "code_shape": [8, 8, 4], "shared_codebook": True, "decay": 0.99,
                        "restart_unused_codes": True, "loss_type": "mse", "latent_loss_weight": 0.25},
            "ddconfig": {"double_z": False, "z_channels": 64, "resolution": 32, "in_channels": 1, "out_ch": 1,
                         "ch": CH, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "attn_resolutions": [8],
                         "dropout": 0.0}}


def _model_and_loss(side: str):
    """(model, loss(x) -> scalar) for one side of the comparison."""
    torch.manual_seed(0)
    if side == "official":
        from omegaconf import OmegaConf  # the official code's dependency, only in its child process
        # the official package, also named rqvae (its folder is first on sys.path in this process)
        create_model = importlib.import_module("rqvae.models").create_model
        augment = importlib.import_module("rqvae.utils.config").augment_arch_defaults
        m = create_model(augment(OmegaConf.create({"arch": official_vae_arch()}).arch))
        model = m[0] if isinstance(m, tuple) else m

        def loss(x: torch.Tensor) -> torch.Tensor:
            out, commit, _ = model(x)
            return F.mse_loss(out, x) + 0.25 * commit
        return model, loss
    from rqvae.models.vae import RQVAE, VAE_PRESETS, RQVAEConfig
    model = RQVAE(RQVAEConfig(**{**VAE_PRESETS["fmnist32-8x8x4"], "ch": CH}))

    def loss(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=side == "bf16"):
            out = model(x)
        return F.mse_loss(out.reconstruction.float(), x) + 0.25 * out.commitment_loss.float()
    return model, loss


def child(side: str, steps: int, threads: int) -> dict:
    """CPU seconds of each of ``steps`` plain-loop steps (after two warm-up steps); FLOPs per step (ours)."""
    torch.set_num_threads(threads)
    model, loss = _model_and_loss(side)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=4e-4)
    g = torch.Generator().manual_seed(0)
    data = torch.rand(steps + 2, BATCH, 1, 32, 32, generator=g) * 2 - 1

    def step(x: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss(x).backward()
        opt.step()
    for x in data[:2]:
        step(x)
    times = []
    for x in data[2:]:
        t = time.process_time()
        step(x)
        times.append(time.process_time() - t)
    out = {"times": times}
    if side == "fp32":
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc:
            step(data[0])
        out["flops"] = fc.get_total_flops()
    return out


def run_child(side: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--child", side, "--steps", str(args.steps),
           "--threads", str(args.threads)]
    if side == "official":
        env["PYTHONPATH"] = args.official_deps
        cmd += ["--official-src", args.official_src, "--official-import", args.official_import]
        env["RQ_OFFICIAL_SRC"] = args.official_src
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if res.returncode != 0:
        sys.exit(f"{side} child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def peak_fp32(threads: int) -> float:
    """GFLOP/s (per CPU second) of a 2048^3 fp32 matmul, best of 3."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(3):
        t = time.process_time()
        a @ b
        best = min(best, time.process_time() - t)
    return 2 * 2048**3 / best / 1e9


def stage1_vs_official(args: argparse.Namespace, out) -> None:
    sides = SIDES if args.official_src else SIDES[1:]
    per_side: dict[str, list[float]] = {s: [] for s in sides}
    flops = None
    for r in range(args.rounds):
        for side in sides:
            res = run_child(side, args)
            per_side[side] += res["times"]
            flops = res.get("flops", flops)
        print(f"  round {r + 1}: " + ", ".join(f"{s} {min(per_side[s][-args.steps:]):.3f}" for s in sides)
              + " CPU s/step (best of the round)", flush=True)
    peak = peak_fp32(args.threads)
    best = {s: min(v) for s, v in per_side.items()}
    med = {s: sorted(v)[len(v) // 2] for s, v in per_side.items()}
    out(f"### Stage-1 step against the official model's (`fmnist32-8x8x4` at ch {CH}, batch {BATCH}, "
        f"{args.threads} thread(s), plain loop)")
    out()
    out(f"{args.rounds} alternating rounds of {args.steps} steps per side; one step is "
        f"{flops / 1e9:.1f} GFLOP (forward + backward, `torch.utils.flop_counter`); fp32 matmul peak in the "
        f"same run: {peak:.0f} GFLOP/s per CPU second.")
    out()
    out("| side | CPU s / step (best) | median | GFLOP/s (best) | % of fp32 matmul peak | "
        "speed-up vs official (best / median) |")
    out("|---|---|---|---|---|---|")
    for s in sides:
        rate = flops / best[s] / 1e9
        vs = (f"{best['official'] / best[s]:.2f}x / {med['official'] / med[s]:.2f}x"
              if "official" in best else "n/a")
        out(f"| {s if s == 'official' else 'ours ' + s} | {best[s]:.3f} | {med[s]:.3f} | {rate:.0f} | "
            f"{100 * rate / peak:.0f}% | {vs} |")
    out()


def _timed_loop(params: list, loss, batches: list, lr: float, adamw: bool) -> float:
    """Best CPU seconds of one plain step (zero_grad, loss, backward, clip 1.0, Adam/AdamW) over batches."""
    opt = (torch.optim.AdamW if adamw else torch.optim.Adam)(params, lr=lr)
    best = float("inf")
    for i, b in enumerate(batches):
        t = time.process_time()
        opt.zero_grad(set_to_none=True)
        loss(b).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if i > 0:  # the first step warms up
            best = min(best, time.process_time() - t)
    return best


def plain_vae_seconds(cfg, steps: int) -> float:
    """A plain loop of the trained run's architecture (fresh weights) on Fashion-MNIST batches in memory."""
    from rqvae.data.build import build_image_dataset
    from rqvae.models.vae import RQVAE
    config = RQVAE.from_pretrained(Path(cfg.run_dir) / "model").config
    torch.manual_seed(0)
    model = RQVAE(config).train()
    ds = build_image_dataset(cfg.data, cfg.image_size, cfg.channels, split="train")
    images = torch.stack([ds[i]["image"] for i in range(steps * cfg.batch_size)])
    beta = config.commitment_weight

    def loss(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return F.mse_loss(out.reconstruction, x) + beta * out.commitment_loss
    return _timed_loop(list(model.parameters()), loss, list(images.split(cfg.batch_size)), LR, adamw=False)


def plain_ar_seconds(cfg, steps: int) -> float:
    """A plain loop of the trained run's RQ-Transformer (fresh weights): cross-entropy on random codes."""
    from rqvae.models.transformer import RQTransformer
    trained = RQTransformer.from_pretrained(Path(cfg.run_dir) / "model")
    c = trained.config
    torch.manual_seed(0)
    model = RQTransformer(c, codebook=trained.codebook).train()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(c.vocab_size, (cfg.batch_size, *c.code_shape), generator=g),
                torch.randint(c.num_classes, (cfg.batch_size,), generator=g)) for _ in range(steps)]

    def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        codes, cond = batch
        logits = model(codes, cond)  # (B, T, D, K)
        return F.cross_entropy(logits.flatten(0, -2), codes.flatten())
    return _timed_loop(list(model.parameters()), loss, batches, LR, adamw=True)


def trainer_vs_plain(args: argparse.Namespace, out) -> None:
    """train-vae and train-ar (the demo's recipes) against a plain loop of the same model and batch."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from claims import recipe
    from rqvae.train.ar import train_ar
    from rqvae.train.vae import train_vae

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="rqvae-trainspeed-"))
    steps = args.trainer_steps
    quiet = dict(log_every=steps // 2, val_split=0.0, val_every=0, checkpoint_every=steps)
    vae_cfg = replace(recipe.vae_config(work / "vae", data=args.data, steps=steps, seed=0, overrides={},
                                        progress=False), **quiet)
    train_vae(vae_cfg)
    ar_cfg = replace(recipe.ar_config(work / "ar", vae_dir=work / "vae" / "model", data=args.data,
                                      steps=steps, seed=0, cache=work / "cache", options={}, progress=False),
                     **quiet)
    train_ar(ar_cfg)
    out(f"### The trainers against a plain loop (the demo's models and batches, {args.threads} thread(s))")
    out()
    out("Trainer seconds per step: the trainer's `time/step_s` over the second half of the run (set-up, "
        "k-means init and code caching excluded); data: its `time/data_s`. Plain loop: the same model, "
        "optimizer and batch size on batches already in memory, no logging or checkpoints.")
    out()
    out("| stage | trainer s / step | of it waiting for data | plain loop s / step | trainer / plain |")
    out("|---|---|---|---|---|")
    for name, cfg, plain in (("train-vae", vae_cfg, plain_vae_seconds),
                             ("train-ar", ar_cfg, plain_ar_seconds)):
        last = json.loads((Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()[-1])
        p = plain(cfg, steps=max(10, steps // 4))
        out(f"| {name} | {last['time/step_s']:.3f} | {last['time/data_s']:.4f} "
            f"({100 * last['time/data_s'] / last['time/step_s']:.1f}%) | {p:.3f} | "
            f"{last['time/step_s'] / p:.2f}x |")
    out()


def bf16_quality(args: argparse.Namespace, out) -> None:
    """The demo's stage-1 recipe ``--quality-steps`` long in float32 and with ``--bf16`` (same seed, same
    batches): seconds per step, final training loss and test PSNR (full depth, 1,000 test images)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from claims import recipe
    from rqvae.data.build import build_image_dataset
    from rqvae.models.vae import RQVAE
    from rqvae.train.precision import bf16_is_fast
    from rqvae.train.vae import train_vae

    torch.set_num_threads(args.threads)
    steps, work = args.quality_steps, Path(tempfile.mkdtemp(prefix="rqvae-bf16-"))
    test = build_image_dataset(args.data, 32, 1, split="test")
    images = torch.stack([test[i]["image"] for i in range(1000)])
    out(f"### bf16 against float32 at equal steps (the demo's stage-1 recipe, {steps} steps, "
        f"{args.threads} thread(s); bf16 measured faster here: {bf16_is_fast('cpu')})")
    out()
    out("| precision | s / step (trainer) | final training loss | test PSNR (d = D, 1,000 images) |")
    out("|---|---|---|---|")
    for bf16 in (False, True):
        run = work / ("bf16" if bf16 else "fp32")
        base = recipe.vae_config(run, data=args.data, steps=steps, seed=0, overrides={}, progress=False)
        cfg = replace(base, bf16=bf16, val_split=0.0, val_every=0, checkpoint_every=steps,
                      log_every=steps // 4)
        train_vae(cfg)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        vae = RQVAE.from_pretrained(run / "model").eval()
        with torch.no_grad():
            mse = torch.cat([((vae(x).reconstruction.clamp(-1, 1) - x) ** 2).flatten(1).mean(1)
                             for x in images.split(250)])
        psnr = (10 * torch.log10(4.0 / mse.clamp_min(1e-12))).mean().item()
        step_s = sum(r["time/step_s"] for r in rows[1:]) / max(1, len(rows) - 1)
        out(f"| {'bf16 autocast' if bf16 else 'float32'} | {step_s:.3f} | {rows[-1]['loss/total']:.4f} | "
            f"{psnr:.2f} dB |")
    out()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-src", default=os.environ.get("RQ_OFFICIAL_SRC"),
                   help="folder holding the official `rqvae` package (default: $RQ_OFFICIAL_SRC); without "
                        "it, only our sides are timed")
    p.add_argument("--official-deps", default="", help="extra import path for its dependencies (omegaconf)")
    p.add_argument("--official-import", default=str(ROOT.parent / "shared" / "tools" / "official_import.py"),
                   help="the shim that lets the official code import on Python >= 3.11")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side and round (stage-1 comparison)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default="fmnist")
    p.add_argument("--trainer-steps", type=int, default=60, help="steps of each trainer run (0: skip part 2)")
    p.add_argument("--quality-steps", type=int, default=0,
                   help="also train the demo's stage-1 recipe this long in fp32 and bf16 (0: skip)")
    p.add_argument("--skip-official", action="store_true", help="skip the stage-1 comparison (part 1)")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child == "official":
            shim = Path(args.official_import)
            exec(compile(shim.read_text(), str(shim), "exec"), {})
        print(json.dumps(child(args.child, args.steps, args.threads)))
        return
    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)
    out(f"`{' '.join(sys.argv)}` (torch {torch.__version__}; load average before: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})")
    out()
    if not args.skip_official:
        stage1_vs_official(args, out)
    if args.trainer_steps:
        trainer_vs_plain(args, out)
    if args.quality_steps:
        bf16_quality(args, out)


if __name__ == "__main__":
    main()
