"""Stage-1 training: the RQ-VAE tokenizer with reconstruction, commitment, perceptual and GAN losses.

Generator objective per batch (paper Sec. 3.1 / VQGAN; official RQ-VAE losses):

    L_nll = ||X - X_hat||^2  (+ w_p * LPIPS(X, X_hat) with local LPIPS weights)
    L_G   = L_nll + beta * L_commit + w_adv * lambda * (-E[D(X_hat)])      from step ``disc_start``
    lambda = ||grad_{w_L} L_nll|| / (||grad_{w_L} (-E[D(X_hat)])|| + 1e-4)  (adaptive weight, clamped)

with beta = ``commitment_weight`` of the model config (0.25) and w_adv = ``disc_weight`` (0.75). The
codebook is updated by EMA inside the quantizer's forward pass (no gradient). The PatchGAN
discriminator minimises the hinge loss on (X, sg[X_hat]) with its own Adam optimizer.

Composition (torchtitan style): model (:mod:`rqvae.models.vae`), data (:mod:`rqvae.data`), losses
(:mod:`rqvae.models.discriminator`, :mod:`rqvae.models.lpips`), checkpoints
(:mod:`rqvae.train.checkpoint`), parallelism (:mod:`rqvae.distributed`) and the shared pieces of
:mod:`rqvae.train.common` meet in :func:`train_vae`.

Multi-process: gradients are averaged with one all-reduce per model and step, the quantizer all-reduces
its EMA statistics itself, so every rank holds the same weights and codebook. The discriminator's
BatchNorm uses per-rank batch statistics on CPU (SyncBatchNorm on CUDA). Rank 0 writes checkpoints,
logs and the final model.

Resume: ``resume=True`` continues from ``run_dir/checkpoints/latest`` with the same weights, optimizer
moments, LR schedule position, discriminator, EMA weights, RNG states and data position, so that an
interrupted and resumed single-process CPU run is bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rqvae import distributed as dist
from rqvae.errors import UserError
from rqvae.models.discriminator import (
    DiscriminatorConfig,
    PatchDiscriminator,
    adaptive_gan_weight,
    generator_loss,
    hinge_d_loss,
    maybe_sync_batchnorm,
)
from rqvae.models.vae import RQVAE, VAE_PRESETS, RQVAEConfig
from rqvae.train.common import (
    Logger,
    ModelEMA,
    NonFiniteGuard,
    NonFiniteLossError,
    autocast,
    build_optimizer,
    build_scheduler,
    clip_grad_norm,
)

log = logging.getLogger("rqvae.train.vae")

# Default learning rates: the official 4e-5 for the paper-sized models; the small CPU presets get a
# larger step so that they train in minutes (fmnist32: docs/results-rqvae-fmnist.md; tiny: the tests).
DEFAULT_LR = {"imagenet256-8x8x4": 4e-5, "ffhq256-8x8x4": 4e-5, "fmnist32-8x8x4": 4e-4, "tiny": 1e-3}
OFFICIAL_LR = 4e-5


@dataclass
class TrainVAEConfig:
    data: str  # dataset spec: image folder, .tar shard pattern, "fmnist" or "fmnist:/dir"
    run_dir: str  # checkpoints/, model/, metrics.jsonl, tb/, samples/
    preset: str | None = "fmnist32-8x8x4"  # a key of VAE_PRESETS, or None with a full `model` dict
    model: dict[str, Any] = field(default_factory=dict)  # RQVAEConfig fields overriding the preset
    image_size: int | None = None  # default: the model's image_size
    channels: int | None = None  # default: the model's in_channels
    augment: bool = False  # random crop + horizontal flip
    batch_size: int = 32  # per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 1000  # optimizer steps in total (a resumed run continues up to this)
    lr: float | None = None  # None: DEFAULT_LR of the preset (official 4e-5 otherwise)
    betas: tuple[float, float] = (0.5, 0.9)
    warmup_steps: int | None = None  # None: min(500, steps // 20)
    schedule: str = "constant"  # or "cosine" (to 0 at `steps`)
    disc_start: int = 0  # the official configs train the GAN from the start
    disc_weight: float = 0.75  # w_adv; 0 disables the discriminator
    disc_ndf: int = 64
    disc_layers: int = 2
    perceptual_weight: float = 1.0  # used only when both LPIPS files are given
    lpips_vgg: str | None = None  # torchvision VGG16 weights (.safetensors / .pt)
    lpips_heads: str | None = None  # LPIPS linear heads (the lpips package's vgg.pth)
    bf16: bool = False  # bf16 autocast for the networks (the quantizer always runs in float32)
    grad_clip: float = 0.0  # max gradient norm; 0: no clipping
    ema_decay: float | None = None  # model EMA; the final model is the EMA model when set
    checkpoint_every: int = 500
    keep_last: int = 3
    log_every: int = 50
    sample_every: int = 500  # reconstruction grids to TensorBoard and run_dir/samples/; 0: never
    seed: int = 0
    resume: bool = False  # continue from the latest checkpoint in run_dir if there is one
    max_nonfinite: int = 5  # stop after this many NaN/Inf steps in a row
    num_workers: int = 0  # data-loading worker processes
    device: str | None = None  # "cpu" / "cuda"; None: CUDA if available
    progress: bool = True  # tqdm bar
    tensorboard: bool = True

    def model_config(self) -> RQVAEConfig:
        if self.preset is not None:
            if self.preset not in VAE_PRESETS:
                raise UserError(f"unknown RQ-VAE preset {self.preset!r}; choose one of {sorted(VAE_PRESETS)}")
            fields = {**VAE_PRESETS[self.preset], **self.model}
        else:
            fields = dict(self.model)
        known = {f.name for f in dataclasses.fields(RQVAEConfig)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise UserError(f"unknown model config fields {unknown}; valid fields: {sorted(known)}")
        if self.image_size is not None:
            fields["image_size"] = self.image_size
        if self.channels is not None:
            fields["in_channels"] = self.channels
        return RQVAEConfig(**fields)

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR.get(self.preset or "", OFFICIAL_LR)

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(500, self.steps // 20)

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.learning_rate() > 0, f"--lr must be > 0, got {self.learning_rate()}"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}"),
            (self.keep_last >= 1, f"--keep-last must be >= 1, got {self.keep_last}"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (self.max_nonfinite >= 1, f"--max-nonfinite must be >= 1, got {self.max_nonfinite}"),
            (self.disc_weight >= 0, f"--disc-weight must be >= 0, got {self.disc_weight}"),
            ((self.lpips_vgg is None) == (self.lpips_heads is None),
             "give both --lpips-vgg and --lpips-heads (or neither)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2): 10 log10(2^2 / MSE)."""
    return 10.0 * math.log10(4.0 / mse) if mse > 0 else float("inf")


def _sample_grid(model: RQVAE, images: torch.Tensor) -> torch.Tensor:
    """Rows: originals, then reconstructions from the first d = 1..D codes (paper Fig. 5)."""
    from rqvae.data.images import make_grid

    was_training = model.training
    model.eval()
    with torch.no_grad():
        codes = model.encode(images)  # (B, h, w, D)
        rows = [images] + [model.decode(codes, depth=d) for d in range(1, model.config.depth + 1)]
    model.train(was_training)
    stacked = torch.cat([r.float().clamp(-1, 1).cpu() for r in rows])  # ((D + 1) B, C, H, W)
    return make_grid(stacked, nrow=images.shape[0])


def _check_run_dir(cfg: TrainVAEConfig, latest: Path | None) -> None:
    if latest is not None and not cfg.resume:
        raise UserError(f"{cfg.run_dir} already holds checkpoints (latest {latest.name}); pass --resume to "
                        "continue that run or choose a new --out folder")


def train_vae(cfg: TrainVAEConfig, dataset: Any = None) -> RQVAE:
    """Train (or resume) an RQ-VAE as configured; returns the final model (EMA weights if EMA is on).

    ``dataset``: an already built dataset (e.g. :class:`rqvae.data.TensorImageDataset`) instead of
    ``cfg.data``. Everything a user can get wrong (data, paths, config) raises :class:`UserError`
    before the first step.
    """
    from rqvae.data import build_image_dataset, make_loader
    from rqvae.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    cfg.validate()
    info = dist.init_distributed(cfg.device)
    device, is_main = info.device, info.is_main
    run_dir = Path(cfg.run_dir)
    model_cfg = cfg.model_config()
    latest = latest_checkpoint(run_dir)
    _check_run_dir(cfg, latest)

    lpips = None
    if cfg.lpips_vgg is not None and cfg.perceptual_weight > 0:
        from rqvae.models.lpips import LPIPS

        lpips = LPIPS.from_files(cfg.lpips_vgg, cfg.lpips_heads).to(device)

    # ---- data: every problem surfaces here, before any training
    if dataset is None:
        dataset = build_image_dataset(cfg.data, model_cfg.image_size, model_cfg.in_channels, split="train",
                                      augment=cfg.augment)
    skipped = list(getattr(dataset, "skipped", []))

    # ---- models (same init on every rank, then rank 0's weights broadcast to be sure)
    torch.manual_seed(cfg.seed)
    vae = RQVAE(model_cfg).to(device)
    use_disc = cfg.disc_weight > 0
    disc = PatchDiscriminator(DiscriminatorConfig(in_channels=model_cfg.in_channels, ndf=cfg.disc_ndf,
                                                  n_layers=cfg.disc_layers)).to(device)
    disc = maybe_sync_batchnorm(disc, device)
    dist.broadcast_module(vae)
    dist.broadcast_module(disc)
    ema = ModelEMA(vae, cfg.ema_decay) if cfg.ema_decay is not None else None

    lr = cfg.learning_rate()
    opt_g = build_optimizer(vae, "adam", lr=lr, betas=tuple(cfg.betas))
    opt_d = build_optimizer(disc, "adam", lr=lr, betas=tuple(cfg.betas))
    sched_g = build_scheduler(opt_g, cfg.warmup(), cfg.steps, cfg.schedule)
    guard = NonFiniteGuard(cfg.max_nonfinite)

    modules: dict[str, torch.nn.Module] = {"vae": vae, "disc": disc}
    if ema is not None:
        modules["ema"] = ema
    optimizers = {"vae": opt_g, "disc": opt_d}
    schedulers = {"vae": sched_g}

    # ---- resume
    step = 0
    if latest is not None:
        extra = load_checkpoint(latest, modules, optimizers, schedulers)
        saved_cfg = extra.get("model_config")
        if saved_cfg is not None and saved_cfg != json.loads(json.dumps(dataclasses.asdict(model_cfg))):
            raise UserError(f"the checkpoint {latest} was trained with a different model config; resume "
                            "with the same --preset/--model options or choose a new --out folder")
        step = int(extra["step"])
        guard.load_state_dict(extra.get("nonfinite", {}))
    if info.rank > 0:  # the checkpoint holds rank 0's RNG state; other ranks get their own streams
        torch.manual_seed(cfg.seed * 1000 + info.rank + step)

    logger = Logger(run_dir, cfg.steps, start_step=step, enabled=is_main, tensorboard=cfg.tensorboard,
                    progress=cfg.progress, desc="train-vae")
    if is_main:
        (run_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if skipped:
            shown = ", ".join(f"{p} ({r})" for p, r in skipped[:5])
            logger.info(f"data: skipped {len(skipped)} unreadable files: {shown}"
                        f"{' ...' if len(skipped) > 5 else ''}")
        if cfg.lpips_vgg is None and cfg.perceptual_weight > 0:
            logger.info("no LPIPS weights given (--lpips-vgg, --lpips-heads): training without the "
                        "perceptual loss")
        if latest is not None:
            logger.info(f"resumed from {latest} at step {step}")
        n_params = sum(p.numel() for p in vae.parameters())
        logger.info(f"RQ-VAE {n_params / 1e6:.2f}M parameters, code shape {vae.code_shape()}, "
                    f"lr {lr:g}, {info.world_size} process(es) x batch {cfg.batch_size} "
                    f"x accum {cfg.grad_accum}")

    def extra_state() -> dict[str, Any]:
        return {"step": step, "nonfinite": guard.state_dict(),
                "model_config": json.loads(json.dumps(dataclasses.asdict(model_cfg))),
                "skipped_files": len(skipped)}

    def save(current: int) -> None:
        if is_main:
            save_checkpoint(run_dir, current, modules, optimizers, schedulers, extra_state(),
                            keep_last=cfg.keep_last)
        dist.barrier()

    # A DataLoader iterator draws its base seed from the global RNG; keep that draw out of the training
    # RNG stream so a resumed run continues with exactly the RNG state of the checkpoint.
    with torch.random.fork_rng(devices=[]):
        loader = iter(make_loader(dataset, cfg.batch_size, seed=cfg.seed, rank=info.rank,
                                  world_size=info.world_size, start_step=step * cfg.grad_accum,
                                  num_workers=cfg.num_workers))
    sample_images = None
    if is_main and cfg.sample_every > 0:
        n = min(8, len(dataset)) if hasattr(dataset, "__len__") else 8
        with torch.random.fork_rng(devices=[]):  # augmentation of these previews must not use the RNG
            sample_images = torch.stack([dataset[i]["image"] for i in range(n)]).to(device)

    beta = model_cfg.commitment_weight
    hint = f"; the last checkpoint in {run_dir / 'checkpoints'} is intact (continue with --resume)"
    last_layer = vae.last_layer_weight
    sums: dict[str, float] = {}
    n_logged = 0
    t_last = time.perf_counter()
    try:
        while step < cfg.steps:
            disc_on = use_disc and step >= cfg.disc_start
            guard.snapshot(vae, disc)
            opt_g.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            stats = {"loss/total": 0.0, "loss/rec": 0.0, "loss/commit": 0.0}
            if lpips is not None:
                stats["loss/perceptual"] = 0.0
            if disc_on:
                stats.update({"loss/g": 0.0, "loss/d": 0.0, "gan/weight": 0.0,
                              "gan/logits_real": 0.0, "gan/logits_fake": 0.0})
            for _ in range(cfg.grad_accum):
                x = next(loader)["image"].to(device, non_blocking=True)  # (B, C, S, S) in [-1, 1]
                with autocast(device, cfg.bf16):
                    out = vae(x)
                rec = out.reconstruction.float()  # (B, C, S, S)
                rec_loss = F.mse_loss(rec, x)
                nll = rec_loss
                if lpips is not None:
                    with autocast(device, cfg.bf16):
                        p_loss = lpips(x, rec).mean()
                    nll = nll + cfg.perceptual_weight * p_loss
                    stats["loss/perceptual"] += float(p_loss.detach()) / cfg.grad_accum
                loss = nll + beta * out.commitment_loss
                if disc_on:
                    disc.requires_grad_(False)  # the generator step must not touch D's gradients
                    with autocast(device, cfg.bf16):
                        logits_fake = disc(rec).float()
                    disc.requires_grad_(True)
                    g_loss = generator_loss(logits_fake)
                    lam = adaptive_gan_weight(nll, g_loss, last_layer)
                    loss = loss + cfg.disc_weight * lam * g_loss
                    stats["loss/g"] += float(g_loss.detach()) / cfg.grad_accum
                    stats["gan/weight"] += float(lam) / cfg.grad_accum
                (loss / cfg.grad_accum).backward()
                if disc_on:
                    with autocast(device, cfg.bf16):
                        logits_real = disc(x).float()
                        logits_fake = disc(rec.detach()).float()
                    d_loss = hinge_d_loss(logits_real, logits_fake)
                    (d_loss / cfg.grad_accum).backward()
                    stats["loss/d"] += float(d_loss.detach()) / cfg.grad_accum
                    stats["gan/logits_real"] += float(logits_real.detach().mean()) / cfg.grad_accum
                    stats["gan/logits_fake"] += float(logits_fake.detach().mean()) / cfg.grad_accum
                stats["loss/total"] += float(loss.detach()) / cfg.grad_accum
                stats["loss/rec"] += float(rec_loss.detach()) / cfg.grad_accum
                stats["loss/commit"] += float(out.commitment_loss.detach()) / cfg.grad_accum

            dist.all_reduce_grads(vae.parameters())
            if disc_on:
                dist.all_reduce_grads(disc.parameters())
            grad_norm = clip_grad_norm(vae.parameters(), cfg.grad_clip)
            d_norm = clip_grad_norm(disc.parameters(), cfg.grad_clip) if disc_on else 0.0
            if guard.check(stats["loss/total"], stats.get("loss/d", 0.0), grad_norm, d_norm, step=step,
                           hint=hint):
                opt_g.step()
                if disc_on:
                    opt_d.step()
                if ema is not None:
                    ema.update(vae)
            else:
                guard.restore(vae, disc)  # no weight, moment or codebook changes from a bad step
            sched_g.step()
            step += 1
            logger.advance()

            if all(math.isfinite(v) for v in stats.values()):
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
                n_logged += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                means = {k: v / max(1, n_logged) for k, v in sums.items()}
                means = dist.all_reduce_mean(means)
                if "loss/rec" in means:
                    means["psnr"] = psnr_from_mse(means["loss/rec"])
                usage = vae.quantizer.usage()
                for d, (u, ppl) in enumerate(zip(usage.used, usage.perplexity), start=1):
                    means[f"codes/used_d{d}"] = u
                    means[f"codes/perplexity_d{d}"] = ppl
                means["codes/dead"] = sum(usage.dead)
                means["lr"] = opt_g.param_groups[0]["lr"]
                means["nonfinite_steps"] = guard.total
                now = time.perf_counter()
                means["time/step_s"] = (now - t_last) / max(1, n_logged)
                t_last = now
                logger.scalars(step, means)
                sums, n_logged = {}, 0
            if sample_images is not None and (step % cfg.sample_every == 0 or step == cfg.steps):
                grid = _sample_grid(vae, sample_images)
                logger.image(step, "reconstructions (rows: input, d=1..D)", grid)
                from rqvae.data.images import save_image

                save_image(grid, run_dir / "samples" / f"step_{step:07d}.png")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save(step)
    except NonFiniteLossError:
        logger.close()
        raise

    logger.close()
    dist.check_same_across_ranks(vae, "RQ-VAE")  # weights and codebook are identical on every rank
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(vae.parameters(), ema.module.parameters()):
                p.copy_(e)
    if is_main:
        vae.save_pretrained(run_dir / "model")
        if logger.enabled:
            log.info("saved the model to %s", run_dir / "model")
    dist.barrier()
    return vae
