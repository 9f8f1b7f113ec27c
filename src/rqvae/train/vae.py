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

Fine-tuning (:mod:`rqvae.train.finetune`): ``--init-from DIR`` starts from a trained RQ-VAE (ours, a run's
``model/`` or an official checkpoint) with a fresh optimizer and discriminator; ``--freeze encoder`` keeps
the encoder and quant_conv fixed (left out of the optimizer), ``--freeze codebook`` stops the EMA codebook
updates and dead-code restarts. Validation (``--val-data`` / ``--val-split``, :mod:`rqvae.train.validation`)
logs ``val/loss_rec``, ``val/psnr_d1..D`` and ``val/codes_used_d1..D``; ``RUN/model/`` is then the model
with the lowest ``val/loss_rec`` and ``RUN/model-last/`` the final one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset

from rqvae import distributed as dist
from rqvae.config import option
from rqvae.data import build_image_dataset, collate, make_loader
from rqvae.data.build import DATA_HELP
from rqvae.data.images import RESIZE_HELP, RESIZE_MODES
from rqvae.distributed import DistInfo
from rqvae.errors import UserError
from rqvae.eval.figures import labelled_coarse_to_fine_grid
from rqvae.models.discriminator import (
    DiscriminatorConfig,
    PatchDiscriminator,
    adaptive_gan_weight,
    generator_loss,
    hinge_d_loss,
    maybe_sync_batchnorm,
)
from rqvae.models.vae import RQVAE, VAE_PRESETS, ResnetBlock, RQVAEConfig
from rqvae.train.activations import HELP as ACTIVATIONS_HELP
from rqvae.train.activations import checkpoint_blocks
from rqvae.train.checkpoint import latest_checkpoint
from rqvae.train.finetune import (
    INIT_HELP,
    VAE_TRAINING_FIELDS,
    codebook_mode,
    freeze_vae,
    load_init_vae,
    parse_freeze,
    with_architecture_of,
)
from rqvae.train.optim import build_optimizer, build_scheduler
from rqvae.train.precision import autocast
from rqvae.train.task import TrainerConfig, TrainTask, config_json
from rqvae.train.trainer import Trainer
from rqvae.train.val_metrics import psnr_from_mse, vae_metrics
from rqvae.train.validation import ValidationConfig, image_batches, split_for_validation, val_split_name

# Default learning rates: the official 4e-5 for the paper-sized models; the small CPU presets get a
# larger step so that they train in minutes (fmnist32: docs/results-rqvae-fmnist.md; tiny: the tests).
DEFAULT_LR = {"imagenet256-8x8x4": 4e-5, "ffhq256-8x8x4": 4e-5, "fmnist32-8x8x4": 4e-4, "tiny": 1e-3}
OFFICIAL_LR = 4e-5
DEFAULT_PRESET = "fmnist32-8x8x4"

__all__ = ["TrainVAEConfig", "VAETask", "psnr_from_mse", "train_vae"]


@dataclass(kw_only=True)
class TrainVAEConfig(TrainerConfig, ValidationConfig):
    data: str = option(help=DATA_HELP)
    init_from: str | None = option(None, INIT_HELP, metavar="DIR")
    freeze: str | None = option(None, "parts kept fixed, comma-separated: encoder (encoder + quant_conv "
                                      "weights), codebook (no EMA updates or dead-code restarts)",
                                metavar="PARTS")
    preset: str | None = option(None, f"model preset: {', '.join(VAE_PRESETS)} (default: {DEFAULT_PRESET}; "
                                      "with --init-from: that model's architecture)")
    model: dict[str, Any] = option(factory=dict, flag="--model-config", metavar="JSON",
                                   help="JSON file (or inline JSON object) of RQVAEConfig fields over the "
                                        "preset")
    image_size: int | None = option(None, "default: the preset's image size")
    channels: int | None = option(None, "default: the preset's", choices=(1, 3))
    augment: bool = option(False, "random crop + horizontal flip")
    resize_mode: str = option("crop", RESIZE_HELP, choices=RESIZE_MODES)
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
    activation_checkpointing: bool = option(False, ACTIVATIONS_HELP)
    codebook_init_batches: int = option(0, "k-means codebook initialisation (ResidualQuantizer.fit) on the "
                                           "encoder outputs of this many batches before step 0 (0: random)")

    def requested_fields(self, default_preset: str | None = DEFAULT_PRESET) -> dict[str, Any]:
        """The model config fields that --preset, --model-config, --image-size and --channels ask for."""
        preset = self.preset or default_preset
        if preset is not None and preset not in VAE_PRESETS:
            raise UserError(f"unknown RQ-VAE preset {preset!r}; choose one of {sorted(VAE_PRESETS)}")
        fields = {**(VAE_PRESETS[preset] if preset else {}), **self.model}
        known = {f.name for f in dataclasses.fields(RQVAEConfig)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise UserError(f"unknown model config fields {unknown}; valid fields: {sorted(known)}")
        if self.image_size is not None:
            fields["image_size"] = self.image_size
        if self.channels is not None:
            fields["in_channels"] = self.channels
        return fields

    def model_config(self) -> RQVAEConfig:
        """The model config of a run from scratch."""
        return RQVAEConfig(**self.requested_fields())

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        preset = self.preset or ("" if self.init_from else DEFAULT_PRESET)
        return DEFAULT_LR.get(preset, OFFICIAL_LR)

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(500, self.steps // 20)

    def validate(self) -> None:
        super().validate()
        checks = [
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.learning_rate() > 0, f"--lr must be > 0, got {self.learning_rate()}"),
            (self.disc_weight >= 0, f"--disc-weight must be >= 0, got {self.disc_weight}"),
            (self.codebook_init_batches >= 0,
             f"--codebook-init-batches must be >= 0, got {self.codebook_init_batches}"),
            ((self.lpips_vgg is None) == (self.lpips_heads is None),
             "give both --lpips-vgg and --lpips-heads (or neither)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        self.check_validation()
        parse_freeze(self.freeze or "")
        # an unknown preset or model field fails here, before any data is read
        self.requested_fields(None if self.init_from else DEFAULT_PRESET)



@torch.no_grad()
def init_codebook(vae: RQVAE, dataset: Any, n_images: int, seed: int, device: torch.device) -> float:
    """k-means warm start of the codebook (:meth:`ResidualQuantizer.fit`) on the encoder outputs of
    ``n_images`` images (a seeded subset of a map-style dataset, the first ones of a stream); returns the
    fit's MSE. The global RNG is left untouched, so the training run that follows draws what it would."""
    with torch.random.fork_rng(devices=[]):
        if isinstance(dataset, IterableDataset):
            items = [item for _, item in zip(range(n_images), dataset)]
        else:
            g = torch.Generator().manual_seed(seed)
            items = [dataset[i] for i in torch.randperm(len(dataset), generator=g)[:n_images].tolist()]
        z = torch.cat([vae.encode_latent(collate(items[i:i + 64])["image"].to(device))
                       for i in range(0, len(items), 64)])  # (N, h, w, n_z)
        return vae.quantizer.fit(z, seed=seed)


class VAETask(TrainTask):
    """Stage 1: the RQ-VAE (generator, optimizer "vae") and the PatchGAN (optimizer "disc")."""

    name = "train-vae"

    def __init__(self, cfg: TrainVAEConfig, dataset: Any = None) -> None:
        self.cfg, self.dataset = cfg, dataset
        self.model_cfg = None if cfg.init_from else cfg.model_config()
        self.init_model: RQVAE | None = None
        self.frozen = parse_freeze(cfg.freeze or "")
        self.lpips = None
        self.val_dataset: Any = None
        self.init_note = ""

    def prepare(self, info: DistInfo) -> None:

        cfg = self.cfg
        self.info, self.device = info, info.device
        if cfg.init_from:  # the architecture is the --init-from model's
            self.init_model = load_init_vae(cfg.init_from)
            self.model_cfg = with_architecture_of(self.init_model.config, cfg.requested_fields(None),
                                                  source=cfg.init_from, training_fields=VAE_TRAINING_FIELDS)
        mc = self.model_cfg
        if cfg.lpips_vgg is not None and cfg.perceptual_weight > 0:
            from rqvae.models.lpips import LPIPS  # VGG16: only when its weights are given

            self.lpips = LPIPS.from_files(cfg.lpips_vgg, cfg.lpips_heads).to(info.device)
        if self.dataset is None:  # every data problem surfaces here, before any training
            self.dataset = build_image_dataset(cfg.data, mc.image_size, mc.in_channels, split="train",
                                               augment=cfg.augment, resize_mode=cfg.resize_mode)
        self.skipped = list(getattr(self.dataset, "skipped", []))
        self._prepare_validation(mc)

    def _prepare_validation(self, mc: RQVAEConfig) -> None:
        cfg = self.cfg
        if cfg.val_split > 0:
            plain = build_image_dataset(cfg.data, mc.image_size, mc.in_channels, split="train",
                                        resize_mode=cfg.resize_mode) \
                if cfg.augment and getattr(self.dataset, "augment", False) else None  # held out unaugmented
            self.dataset, self.val_dataset = split_for_validation(self.dataset, cfg.val_split, cfg.seed,
                                                                  plain)
        elif cfg.val_data is not None:
            self.val_dataset = build_image_dataset(cfg.val_data, mc.image_size, mc.in_channels,
                                                   split=val_split_name(cfg.val_data),
                                                   resize_mode=cfg.resize_mode)
        self.val_metric = "val/loss_rec" if self.val_dataset is not None else None

    def build(self, info: DistInfo) -> None:
        cfg, mc, device = self.cfg, self.model_cfg, info.device
        self.model = vae = RQVAE(mc).to(device)
        if self.init_model is not None:
            vae.load_state_dict(self.init_model.state_dict())
        elif cfg.codebook_init_batches > 0 and not (cfg.resume and latest_checkpoint(cfg.run_dir)):
            n = cfg.codebook_init_batches * cfg.batch_size  # (a resumed run loads its codebook instead)
            mse = init_codebook(vae, self.dataset, n, cfg.seed, device)
            self.init_note = f"codebook initialised by k-means on the encoder outputs of {n} images " \
                             f"(MSE {mse:.5f})"
        freeze_vae(vae, self.frozen)  # before the optimizer: frozen parameters are left out of it
        if cfg.activation_checkpointing:
            checkpoint_blocks(m for m in vae.modules() if isinstance(m, ResnetBlock))
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
        codebook_mode(vae, self.frozen)
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

    def validate(self, step: int) -> dict[str, float] | None:
        cfg = self.cfg
        if self.val_dataset is None or not cfg.is_validation_step(step, cfg.steps):
            return None
        return vae_metrics(self.model, image_batches(self.val_dataset, cfg.batch_size), self.device)

    def sample(self, step: int) -> torch.Tensor | None:
        """Rows: originals, then reconstructions from the first d = 1..D codes (paper Fig. 5), labelled."""
        if self.sample_images is None:
            return None
        return labelled_coarse_to_fine_grid(self.model, self.sample_images)

    def extra_state(self) -> dict[str, Any]:
        return {"model_config": config_json(self.model_cfg), "skipped_files": len(self.skipped)}

    def describe(self, world_size: int) -> list[str]:
        cfg, lines = self.cfg, [self.init_note] if self.init_note else []
        if cfg.init_from:
            lines.append(f"fine-tuning from {cfg.init_from} (its weights, a fresh optimizer and "
                         f"discriminator){'; frozen: ' + ', '.join(self.frozen) if self.frozen else ''}")
        if self.val_dataset is not None:
            lines.append(f"validation: {len(self.val_dataset)} images every "
                         f"{cfg.validation_interval(cfg.steps)} steps")
        if cfg.lpips_vgg is None and cfg.perceptual_weight > 0:
            lines.append("no LPIPS weights given (--lpips-vgg, --lpips-heads): training without the "
                         "perceptual loss")
        if cfg.activation_checkpointing:
            lines.append("activation checkpointing: each resnet block recomputed in the backward pass")
        n_params = sum(p.numel() for p in self.model.parameters())
        lines.append(f"RQ-VAE {n_params / 1e6:.2f}M parameters, code shape {self.model.code_shape()}, "
                     f"lr {cfg.learning_rate():g}, {world_size} process(es) x batch {cfg.batch_size} "
                     f"x accum {cfg.grad_accum}")
        return lines

    def save_final(self, run_dir: Path | None, name: str = "model") -> None:
        if run_dir is not None:
            self.model.save_pretrained(run_dir / name)


def train_vae(cfg: TrainVAEConfig, dataset: Any = None) -> RQVAE:
    """Train (or resume) an RQ-VAE as configured; returns the final model (EMA weights if EMA is on).

    ``dataset``: an already built dataset (e.g. :class:`rqvae.data.TensorImageDataset`) instead of
    ``cfg.data``. Everything a user can get wrong (data, paths, config) raises :class:`UserError`
    before the first step. Writes ``RUN/model/`` (save_pretrained) when the run reaches ``cfg.steps``.
    """
    return Trainer(cfg, VAETask(cfg, dataset)).train()
