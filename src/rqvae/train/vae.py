"""Stage-1 training task: the RQ-VAE tokenizer with reconstruction, commitment, perceptual and GAN losses.

Generator objective per batch (paper Sec. 3.1 / VQGAN; official RQ-VAE losses):

    L_nll = ||X - X_hat||^2  (+ w_p * LPIPS(X, X_hat) with local LPIPS weights)
    L_G   = L_nll + beta * L_commit + w_adv * lambda * (-E[D(X_hat)])      from step ``disc_start``
    lambda = ||grad_{w_L} L_nll|| / (||grad_{w_L} (-E[D(X_hat)])|| + 1e-4)  (adaptive weight, clamped)

with beta = ``commitment_weight`` of the model config (0.25) and w_adv = ``disc_weight`` (0.75). The
codebook is updated by EMA inside the quantizer's forward pass (no gradient). The PatchGAN
discriminator minimises the hinge loss on (X, sg[X_hat]) with its own Adam optimizer.

:class:`VAETask` supplies the models, losses and data; the loop (accumulation, clipping, NaN guard, EMA,
checkpoints, logs, DDP) is :class:`rqvae.train.trainer.Trainer`'s. Multi-process: gradients are
averaged with one all-reduce per model and step, the quantizer all-reduces its EMA statistics itself,
so every rank holds the same weights and codebook. The discriminator's BatchNorm uses per-rank batch
statistics on CPU (SyncBatchNorm on CUDA).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rqvae import distributed as dist
from rqvae.config import option
from rqvae.data import build_image_dataset, make_loader
from rqvae.distributed import DistInfo
from rqvae.errors import UserError
from rqvae.eval.figures import coarse_to_fine_grid
from rqvae.models.discriminator import (
    DiscriminatorConfig,
    PatchDiscriminator,
    adaptive_gan_weight,
    generator_loss,
    hinge_d_loss,
    maybe_sync_batchnorm,
)
from rqvae.models.vae import RQVAE, VAE_PRESETS, RQVAEConfig
from rqvae.train.optim import build_optimizer, build_scheduler
from rqvae.train.precision import autocast
from rqvae.train.task import TrainerConfig, TrainTask, config_json
from rqvae.train.trainer import Trainer

# Default learning rates: the official 4e-5 for the paper-sized models; the small CPU presets get a
# larger step so that they train in minutes (fmnist32: docs/results-rqvae-fmnist.md; tiny: the tests).
DEFAULT_LR = {"imagenet256-8x8x4": 4e-5, "ffhq256-8x8x4": 4e-5, "fmnist32-8x8x4": 4e-4, "tiny": 1e-3}
OFFICIAL_LR = 4e-5


@dataclass(kw_only=True)
class TrainVAEConfig(TrainerConfig):
    data: str = option(help="image folder, WebDataset shards ('shards/{000..009}.tar'), or 'fmnist[:DIR]'")
    preset: str | None = option("fmnist32-8x8x4", f"model preset: {', '.join(VAE_PRESETS)}")
    model: dict[str, Any] = option(factory=dict, flag="--model-config", metavar="JSON",
                                   help="JSON file (or inline JSON object) of RQVAEConfig fields over the "
                                        "preset")
    image_size: int | None = option(None, "default: the preset's image size")
    channels: int | None = option(None, "default: the preset's", choices=(1, 3))
    augment: bool = option(False, "random crop + horizontal flip")
    lr: float | None = option(None, "Adam learning rate (default: 4e-5 as official; 4e-4 fmnist32, "
                                    "1e-3 tiny)")
    betas: tuple[float, float] = option((0.5, 0.9), "Adam betas")
    warmup_steps: int | None = option(None, "linear warm-up steps (default: min(500, steps / 20))")
    schedule: str = option("constant", "LR schedule after the warm-up (cosine: to 0 at --steps)",
                           choices=("constant", "cosine"))
    disc_start: int = option(0, "step at which the GAN loss starts")
    disc_weight: float = option(0.75, "adversarial weight w_adv; 0 disables the discriminator")
    disc_ndf: int = option(64, "discriminator base channels")
    disc_layers: int = option(2, "discriminator layers")
    perceptual_weight: float = option(1.0, "LPIPS weight (used only when both LPIPS files are given)")
    lpips_vgg: str | None = option(None, "local torchvision VGG16 weights for LPIPS (.safetensors / .pt)")
    lpips_heads: str | None = option(None, "local LPIPS linear heads (the lpips package's vgg.pth)")
    num_workers: int = option(0, "data-loading processes")

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
        super().validate()
        checks = [
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.learning_rate() > 0, f"--lr must be > 0, got {self.learning_rate()}"),
            (self.disc_weight >= 0, f"--disc-weight must be >= 0, got {self.disc_weight}"),
            ((self.lpips_vgg is None) == (self.lpips_heads is None),
             "give both --lpips-vgg and --lpips-heads (or neither)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        self.model_config()  # an unknown preset or model field fails here, before any data is read


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2): 10 log10(2^2 / MSE)."""
    return 10.0 * math.log10(4.0 / mse) if mse > 0 else float("inf")


class VAETask(TrainTask):
    """Stage 1: the RQ-VAE (generator, optimizer "vae") and the PatchGAN (optimizer "disc")."""

    name = "train-vae"

    def __init__(self, cfg: TrainVAEConfig, dataset: Any = None) -> None:
        self.cfg, self.dataset = cfg, dataset
        self.model_cfg = cfg.model_config()
        self.lpips = None

    def prepare(self, info: DistInfo) -> None:

        cfg, mc = self.cfg, self.model_cfg
        self.info, self.device = info, info.device
        if cfg.lpips_vgg is not None and cfg.perceptual_weight > 0:
            from rqvae.models.lpips import LPIPS  # VGG16: only when its weights are given

            self.lpips = LPIPS.from_files(cfg.lpips_vgg, cfg.lpips_heads).to(info.device)
        if self.dataset is None:  # every data problem surfaces here, before any training
            self.dataset = build_image_dataset(cfg.data, mc.image_size, mc.in_channels, split="train",
                                               augment=cfg.augment)
        self.skipped = list(getattr(self.dataset, "skipped", []))

    def build(self, info: DistInfo) -> None:
        cfg, mc, device = self.cfg, self.model_cfg, info.device
        self.model = vae = RQVAE(mc).to(device)
        disc = PatchDiscriminator(DiscriminatorConfig(in_channels=mc.in_channels, ndf=cfg.disc_ndf,
                                                      n_layers=cfg.disc_layers)).to(device)
        self.disc = disc = maybe_sync_batchnorm(disc, device)
        dist.broadcast_module(vae)  # the same init on every rank, to be sure
        dist.broadcast_module(disc)
        lr = cfg.learning_rate()
        self.modules = {"vae": vae, "disc": disc}
        self.optimizers = {"vae": build_optimizer(vae, "adam", lr=lr, betas=tuple(cfg.betas)),
                           "disc": build_optimizer(disc, "adam", lr=lr, betas=tuple(cfg.betas))}
        sched = build_scheduler(self.optimizers["vae"], cfg.warmup(), cfg.steps, cfg.schedule)
        self.schedulers = {"vae": sched}
        self.sample_images = None
        if info.is_main:
            n = min(8, len(self.dataset)) if hasattr(self.dataset, "__len__") else 8
            with torch.random.fork_rng(devices=[]):  # augmentation of these previews must not use the RNG
                self.sample_images = torch.stack([self.dataset[i]["image"] for i in range(n)]).to(device)

    def batches(self, start: int) -> Iterator[Any]:

        cfg, info = self.cfg, self.info
        return iter(make_loader(self.dataset, cfg.batch_size, seed=cfg.seed, rank=info.rank,
                                world_size=info.world_size, start_step=start, num_workers=cfg.num_workers))

    def _disc_on(self, step: int) -> bool:
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start

    def active_optimizers(self, step: int) -> list[str]:
        return ["vae", "disc"] if self._disc_on(step) else ["vae"]

    def train_step(self, batch: Any, *, step: int, micro: int, scale: float) -> dict[str, torch.Tensor]:
        cfg, device, vae, disc = self.cfg, self.device, self.model, self.disc
        x = batch["image"].to(device, non_blocking=True)  # (B, C, S, S) in [-1, 1]
        with autocast(device, cfg.bf16):
            out = vae(x)
        rec = out.reconstruction.float()  # (B, C, S, S)
        rec_loss = F.mse_loss(rec, x)
        nll = rec_loss
        stats = {"loss/rec": rec_loss, "loss/commit": out.commitment_loss}
        if self.lpips is not None:
            with autocast(device, cfg.bf16):
                p_loss = self.lpips(x, rec).mean()
            nll = nll + cfg.perceptual_weight * p_loss
            stats["loss/perceptual"] = p_loss
        loss = nll + self.model_cfg.commitment_weight * out.commitment_loss
        disc_on = self._disc_on(step)
        if disc_on:
            disc.requires_grad_(False)  # the generator step must not touch D's gradients
            with autocast(device, cfg.bf16):
                logits_fake = disc(rec).float()
            disc.requires_grad_(True)
            g_loss = generator_loss(logits_fake)
            lam = adaptive_gan_weight(nll, g_loss, vae.last_layer_weight)
            loss = loss + cfg.disc_weight * lam * g_loss
            stats.update({"loss/g": g_loss, "gan/weight": lam})
        (loss * scale).backward()
        if disc_on:
            with autocast(device, cfg.bf16):
                logits_real = disc(x).float()
                logits_fake = disc(rec.detach()).float()
            d_loss = hinge_d_loss(logits_real, logits_fake)
            (d_loss * scale).backward()
            stats.update({"loss/d": d_loss, "gan/logits_real": logits_real.mean(),
                          "gan/logits_fake": logits_fake.mean()})
        stats["loss/total"] = loss
        return {k: v.detach() for k, v in stats.items()}

    def log_extras(self, means: dict[str, float]) -> dict[str, float]:
        extras = {"psnr": psnr_from_mse(means["loss/rec"])} if "loss/rec" in means else {}
        usage = self.model.quantizer.usage()
        for d, (u, ppl) in enumerate(zip(usage.used, usage.perplexity), start=1):
            extras[f"codes/used_d{d}"] = u
            extras[f"codes/perplexity_d{d}"] = ppl
        extras["codes/dead"] = sum(usage.dead)
        return extras

    def sample(self, step: int) -> torch.Tensor | None:
        """Rows: originals, then reconstructions from the first d = 1..D codes (paper Fig. 5)."""

        return None if self.sample_images is None else coarse_to_fine_grid(self.model, self.sample_images)

    def extra_state(self) -> dict[str, Any]:
        return {"model_config": config_json(self.model_cfg), "skipped_files": len(self.skipped)}

    def describe(self, world_size: int) -> list[str]:
        cfg, lines = self.cfg, []
        if self.skipped:
            shown = ", ".join(f"{p} ({r})" for p, r in self.skipped[:5])
            lines.append(f"data: skipped {len(self.skipped)} unreadable files: {shown}"
                         f"{' ...' if len(self.skipped) > 5 else ''}")
        if cfg.lpips_vgg is None and cfg.perceptual_weight > 0:
            lines.append("no LPIPS weights given (--lpips-vgg, --lpips-heads): training without the "
                         "perceptual loss")
        n_params = sum(p.numel() for p in self.model.parameters())
        lines.append(f"RQ-VAE {n_params / 1e6:.2f}M parameters, code shape {self.model.code_shape()}, "
                     f"lr {cfg.learning_rate():g}, {world_size} process(es) x batch {cfg.batch_size} "
                     f"x accum {cfg.grad_accum}")
        return lines

    def save_final(self, run_dir: Path | None) -> None:
        if run_dir is not None:
            self.model.save_pretrained(run_dir / "model")


def train_vae(cfg: TrainVAEConfig, dataset: Any = None) -> RQVAE:
    """Train (or resume) an RQ-VAE as configured; returns the final model (EMA weights if EMA is on).

    ``dataset``: an already built dataset (e.g. :class:`rqvae.data.TensorImageDataset`) instead of
    ``cfg.data``. Everything a user can get wrong (data, paths, config) raises :class:`UserError`
    before the first step. Writes ``RUN/model/`` (save_pretrained) when the run reaches ``cfg.steps``.
    """
    return Trainer(cfg, VAETask(cfg, dataset)).train()
