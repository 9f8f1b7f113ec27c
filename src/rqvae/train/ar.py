"""Stage-2 training: the RQ-Transformer on codes of a frozen RQ-VAE (paper Sec. 3.2).

The RQ-VAE is frozen, so its encoder runs once over the dataset and the features Z are cached on disk
(:mod:`rqvae.data.features`). Every batch then draws fresh codes from the cached features with soft labels
and stochastic sampling (Sec. 3.2.3, Eq. 15, temperature tau = 0.5)::

    Q_tau(k | r_{t,d-1}) = softmax_k( -||r_{t,d-1} - e(k)||^2 / tau ),   S_{t,d} ~ Q_tau(. | r_{t,d-1})

and the RQ-Transformer minimises the negative log-likelihood over all positions t and depths d
(Eq. 14), with the soft distributions as targets::

    L_AR = E_t E_d  sum_k  -Q_tau(k | r_{t,d-1}) log p(k | S_<t, S_{t,<d})

The two parts are switchable for ablations: ``soft_labels=False`` uses one-hot targets of the codes
(plain cross-entropy), ``stochastic=False`` uses the greedy codes (argmax of Q_tau, = RQ of Eq. 4) as
inputs. Text-conditioned models also predict the next text token (weights text 0.1, image 0.9, as the
official CC-3M config). With ``cond_dropout = p`` (the model config's ``cfg_dropout``) the model itself
replaces a condition by the null condition with probability p in training mode (the null id, an extra
row of the condition embedding: class ``num_classes`` or text token ``text_vocab_size``), so that it can
be sampled with classifier-free guidance. Text rows whose caption was dropped still get the text loss:
from the null prefix the text head learns the marginal distribution of captions, which does not
interfere with the conditional predictions (the contexts differ).

Optimiser per the official configs: AdamW, lr 5e-4 (the small CPU presets default to 1e-3, which
trains them in minutes), weight decay 1e-4 on matrices, betas (0.9, 0.95), linear warm-up then cosine
decay to 0, gradient-norm clipping at 1.0, bf16 autocast. Checkpoints hold the model, optimizer,
scheduler, step and RNG states; the data order and the codes of step s depend only on (seed, s, rank),
so a resumed run is bitwise identical to an uninterrupted one on CPU. Multi-process via torchrun (DDP;
gloo on CPU); rank 0 writes checkpoints, logs, sample grids and the final model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rqvae import distributed as dist
from rqvae.errors import UserError
from rqvae.train.common import (
    Logger,
    NonFiniteGuard,
    autocast,
    build_optimizer,
    build_scheduler,
    clip_grad_norm,
)

log = logging.getLogger("rqvae.train.ar")

OFFICIAL_LR = 5e-4
SMALL_PRESET_LR = 1e-3
PAPER_PRESET_PREFIXES = ("imagenet", "cc3m", "ffhq", "lsun")
TEXT_LOSS_WEIGHT, IMAGE_LOSS_WEIGHT = 0.1, 0.9  # official CC-3M config


@dataclass
class TrainARConfig:
    vae: str  # folder of a trained RQ-VAE (save_pretrained / train-vae's run_dir/model)
    data: str  # dataset spec: image folder, .tar shard pattern, "fmnist" or "fmnist:/dir"
    run_dir: str  # checkpoints/, model/, samples/, metrics.jsonl, tb/
    cond: str = "class"  # "uncond" | "class" | "text"
    preset: str = "fmnist-small"  # a key of rqvae.models.transformer.AR_PRESETS
    model: dict[str, Any] = field(default_factory=dict)  # RQTransformerConfig fields overriding the preset
    split: str = "train"
    captions: str | None = None  # JSONL {"file", "text"}; None: a .txt beside each image; "classes": names
    tokenizer: str | None = None  # a tokenizer.json; None: train byte-level BPE on the captions
    text_len: int = 32  # text tokens per caption (official 32)
    text_vocab_size: int = 16384  # BPE vocabulary cap when training a tokenizer (official 16384)
    flip: bool = False  # also cache features of horizontally flipped images (a second copy)
    feature_cache: str | None = None  # cache folder; None: $RQVAE_CACHE or ~/.cache/rqvae/features
    steps: int = 1000  # length of the run (and of the LR schedule)
    stop_after: int | None = None  # end this invocation after this step (checkpointed; --resume continues)
    batch_size: int = 64  # per rank
    lr: float | None = None  # None: 5e-4 for the paper presets, 1e-3 for the small CPU presets
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = None  # None: min(500, steps // 20)
    grad_clip: float = 1.0
    bf16: bool = True  # bf16 autocast (AMX on CPU, tensor cores on CUDA)
    temperature: float = 0.5  # tau of the soft labels (Sec. 3.2.3)
    soft_labels: bool = True  # targets Q_tau (False: one-hot of the codes)
    stochastic: bool = True  # inputs sampled from Q_tau (False: greedy codes)
    cond_dropout: float | None = None  # P(null condition) for classifier-free guidance; None: the preset's
    text_loss_weight: float = TEXT_LOSS_WEIGHT
    image_loss_weight: float = IMAGE_LOSS_WEIGHT  # text models only; class/uncond use the image loss alone
    checkpoint_every: int = 500
    keep_last: int = 3
    log_every: int = 50
    sample_every: int = 500  # sample grids to TensorBoard and run_dir/samples/; 0: only at the end
    samples_per_class: int = 4
    sample_top_k: int | None = None
    sample_top_p: float | None = None
    seed: int = 0
    resume: bool = False
    max_nonfinite: int = 5
    device: str | None = None  # "cpu" / "cuda"; None: CUDA if available
    progress: bool = True
    tensorboard: bool = True

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return OFFICIAL_LR if self.preset.startswith(PAPER_PRESET_PREFIXES) else SMALL_PRESET_LR

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(500, self.steps // 20)

    def validate(self) -> None:
        checks = [
            (self.cond in ("uncond", "class", "text"),
             f"--cond must be uncond, class or text, got {self.cond!r}"),
            (self.steps >= 0, f"--steps must be >= 0, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.learning_rate() > 0, f"--lr must be > 0, got {self.learning_rate()}"),
            (self.temperature > 0, f"--temperature must be > 0, got {self.temperature}"),
            (self.cond_dropout is None or 0.0 <= self.cond_dropout < 1.0,
             f"--cond-dropout must be in [0, 1), got {self.cond_dropout}"),
            (self.cond != "uncond" or not self.cond_dropout,
             "--cond-dropout needs a condition (--cond class or text)"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}"),
            (self.keep_last >= 1, f"--keep-last must be >= 1, got {self.keep_last}"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (self.text_len >= 2 or self.cond != "text", f"--text-len must be >= 2, got {self.text_len}"),
            (self.max_nonfinite >= 1, f"--max-nonfinite must be >= 1, got {self.max_nonfinite}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


# ---------------------------------------------------------------------------------------- loss
def ar_image_loss(logits: torch.Tensor, probs: torch.Tensor, codes: torch.Tensor,
                  soft_labels: bool = True) -> torch.Tensor:
    """Eq. 14: mean over (B, T, D) of the cross-entropy between targets and the predicted distribution.

    logits (B, T, D, K); probs (B, T, D, K) = Q_tau (soft targets); codes (B, T, D) (one-hot targets).
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, D, K)
    if soft_labels:
        return -(probs.to(logp.dtype) * logp).sum(-1).mean()
    return F.nll_loss(logp.reshape(-1, logp.shape[-1]), codes.reshape(-1))


def ar_text_loss(text_logits: torch.Tensor, tokens: torch.Tensor, pad: int) -> torch.Tensor:
    """Next-token NLL of the caption: text_logits (B, L-1, V) predict tokens[:, 1:]; [PAD] is ignored."""
    target = tokens[:, 1:].reshape(-1)  # (B (L-1),)
    nll = F.cross_entropy(text_logits.float().reshape(target.shape[0], -1), target, reduction="sum",
                          ignore_index=pad)
    return nll / (target != pad).sum().clamp_min(1)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The random stream of one training step on one rank (codes, condition dropout): a function of
    (seed, step, rank) only, so a resumed run draws exactly what an uninterrupted run would."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


# ------------------------------------------------------------------------------------- conditions
@dataclass
class Conditions:
    """What the model is conditioned on, per cached item (rows of the feature cache)."""

    kind: str  # "uncond" | "class" | "text"
    values: torch.Tensor  # (N,) class ids / zeros, or (N, L) text tokens
    num_classes: int = 1
    class_names: list[str] | None = None
    tokenizer: Any = None  # tokenizers.Tokenizer for text
    pad_id: int = 0
    prompts: list[str] | None = None  # a few captions for sample grids


def _dataset_captions(cfg: TrainARConfig, ds: Any) -> list[str]:
    from rqvae.data.features import dataset_files
    from rqvae.data.text import captions_for_files

    if cfg.captions == "classes":  # e.g. Fashion-MNIST: the class name is the caption
        names = list(getattr(ds, "class_names", []))
        labels = getattr(ds, "labels", None)
        if not names or labels is None:
            raise UserError("--captions classes needs a dataset with class names and labels")
        return [names[int(i)] for i in labels]
    files = dataset_files(ds)
    if files is None:
        raise UserError(f"the dataset {cfg.data} has no image files to find captions beside; give "
                        "--captions FILE.jsonl with a folder dataset, or --captions classes")
    return captions_for_files(files, cfg.captions, root=getattr(ds, "root", None))


def _conditions(cfg: TrainARConfig, ds: Any, labels: torch.Tensor, captions: list[str] | None) -> Conditions:
    if cfg.cond == "uncond":
        return Conditions("uncond", torch.zeros_like(labels))
    if cfg.cond == "class":
        names = list(getattr(ds, "class_names", [])) or [str(i) for i in range(int(labels.max()) + 1)]
        return Conditions("class", labels, num_classes=len(names), class_names=names)
    from rqvae.data.text import encode_texts, load_tokenizer, pad_id, train_tokenizer

    assert captions is not None
    if cfg.tokenizer is not None:
        tok = load_tokenizer(cfg.tokenizer, max_len=cfg.text_len)
    else:
        tok = train_tokenizer(captions, vocab_size=cfg.text_vocab_size, max_len=cfg.text_len)
    tokens = encode_texts(tok, captions)  # (N, L)
    prompts = list(dict.fromkeys(captions))[:8]
    return Conditions("text", tokens, tokenizer=tok, pad_id=pad_id(tok), prompts=prompts)


# ------------------------------------------------------------------------------------------ model
def _model_config(cfg: TrainARConfig, vae: Any, cond: Conditions, code_hw: tuple[int, int]) -> Any:
    from rqvae.models.transformer import AR_PRESETS, RQTransformerConfig

    if cfg.preset not in AR_PRESETS:
        raise UserError(f"unknown RQ-Transformer preset {cfg.preset!r}; choose one of {sorted(AR_PRESETS)}")
    fields = dict(cfg.model)
    vc = vae.config
    fields.update(code_shape=(code_hw[0], code_hw[1], vc.depth), vocab_size=vc.codebook_size,
                  embed_dim=vc.embed_dim, cond_type=cond.kind)
    if cond.kind == "class":
        fields.update(num_classes=cond.num_classes)
    fields["cond_len"] = 1
    if cond.kind == "text":
        fields.update(text_vocab_size=cond.tokenizer.get_vocab_size(), cond_len=cond.values.shape[1])
    if cfg.cond_dropout is not None:
        fields["cfg_dropout"] = cfg.cond_dropout
    elif cond.kind == "uncond":
        fields["cfg_dropout"] = 0.0
    known = {f.name for f in dataclasses.fields(RQTransformerConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UserError(f"unknown RQ-Transformer config fields {unknown}; valid fields: {sorted(known)}")
    return dataclasses.replace(AR_PRESETS[cfg.preset], **fields)


def _split_output(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's forward output -> (image logits (B, T, D, K), text logits (B, L-1, V) or None)."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, tuple):
        return out[0], (out[1] if len(out) > 1 else None)
    return out.logits, getattr(out, "cond_logits", None)


# ---------------------------------------------------------------------------------------- samples
@torch.no_grad()
def sample_grid(model: Any, vae: Any, cond: Conditions, n_per_cond: int, seed: int,
                top_k: int | None = None, top_p: float | None = None,
                device: torch.device | str = "cpu", bf16: bool = False) -> torch.Tensor:
    """Samples decoded by the VAE as one grid (C, H, W) in [-1, 1]: a row per class for class models,
    a row per prompt for text models, rows of 8 for unconditional ones. ``generate`` picks its own compute
    dtype (bf16 where the hardware has fast bf16 matmuls) unless ``bf16`` is False (then float32)."""
    from rqvae.data.images import make_grid

    if cond.kind == "class":
        c = torch.arange(cond.num_classes).repeat_interleave(n_per_cond)  # (n_classes * n,)
        nrow = n_per_cond
    elif cond.kind == "text":
        from rqvae.data.text import encode_texts

        c = encode_texts(cond.tokenizer, cond.prompts or [""]).repeat_interleave(n_per_cond, dim=0)  # (N, L)
        nrow = n_per_cond
    else:
        c = torch.zeros(max(8, n_per_cond * 4), dtype=torch.long)
        nrow = 8
    was_training = model.training
    model.eval()
    g = torch.Generator(device=torch.device(device)).manual_seed(seed)
    codes = model.generate(c.to(device), top_k=top_k, top_p=top_p, generator=g,
                           dtype=None if bf16 else torch.float32)  # (N, h, w, D)
    model.train(was_training)
    images = vae.decode(codes.to(device)).float().clamp(-1, 1).cpu()  # (N, C, H, W)
    return make_grid(images, nrow=nrow)


# ---------------------------------------------------------------------------------------- trainer
def _check_run_dir(cfg: TrainARConfig, latest: Path | None) -> None:
    if latest is not None and not cfg.resume:
        raise UserError(f"{cfg.run_dir} already holds checkpoints (latest {latest.name}); pass --resume to "
                        "continue that run or choose a new --out folder")


def train_ar(cfg: TrainARConfig, dataset: Any = None) -> Any:
    """Train (or resume) an RQ-Transformer on the codes of the frozen RQ-VAE ``cfg.vae``; returns it.

    Writes ``run_dir/model/`` (save_pretrained, plus ``tokenizer.json`` for text models) at the end.
    ``dataset``: an already built dataset (e.g. :class:`rqvae.data.TensorImageDataset`) instead of
    ``cfg.data`` (``cfg.data`` then only names it in the feature-cache key). Problems a user can cause
    (paths, data, captions, config) raise :class:`UserError` before the first step.
    """
    from rqvae.data import ResumableBatchSampler, build_image_dataset
    from rqvae.data.features import load_or_build_features
    from rqvae.models.vae import RQVAE
    from rqvae.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    cfg.validate()
    info = dist.init_distributed(cfg.device)
    device, is_main = info.device, info.is_main
    run_dir = Path(cfg.run_dir)
    latest = latest_checkpoint(run_dir) if run_dir.exists() else None
    _check_run_dir(cfg, latest)

    # ---- the frozen tokenizer, the data and the cached features
    vae = RQVAE.from_pretrained(cfg.vae).to(device).eval().requires_grad_(False)
    vc = vae.config
    if not vc.shared_codebook:
        raise UserError(f"{cfg.vae} has one codebook per depth; the RQ-Transformer embeds codes with a "
                        "single shared codebook (the paper's setting): train the RQ-VAE with a shared one")
    if dataset is None:
        dataset = build_image_dataset(cfg.data, vc.image_size, vc.in_channels, split=cfg.split)
    captions = _dataset_captions(cfg, dataset) if cfg.cond == "text" else None
    cache = load_or_build_features(vae, cfg.vae, dataset, data_spec=cfg.data, split=cfg.split,
                                   image_size=vc.image_size, channels=vc.in_channels,
                                   cache_dir=cfg.feature_cache, flip=cfg.flip, captions=captions,
                                   device=device, progress=cfg.progress and is_main)
    cond = _conditions(cfg, dataset, cache.labels, cache.captions)

    # ---- model, optimizer, schedule (same init on every rank)
    from rqvae.models.transformer import RQTransformer

    torch.manual_seed(cfg.seed)
    model_cfg = _model_config(cfg, vae, cond, cache.code_hw)
    model = RQTransformer(model_cfg, codebook=vae.quantizer.codebook[0].detach().clone()).to(device)
    dist.broadcast_module(model)
    lr = cfg.learning_rate()
    opt = build_optimizer(model, "adamw", lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    sched = build_scheduler(opt, cfg.warmup(), max(1, cfg.steps), "cosine")
    guard = NonFiniteGuard(cfg.max_nonfinite)
    modules, optimizers, schedulers = {"model": model}, {"model": opt}, {"model": sched}
    model_cfg_json = json.loads(json.dumps(dataclasses.asdict(model_cfg)))

    step = 0
    if latest is not None:
        extra = load_checkpoint(latest, modules, optimizers, schedulers)
        if extra.get("model_config") not in (None, model_cfg_json):
            raise UserError(f"the checkpoint {latest} was trained with a different model config; resume "
                            "with the same --preset/--vae/--cond options or choose a new --out folder")
        step = int(extra["step"])
        guard.load_state_dict(extra.get("nonfinite", {}))
    if info.rank > 0:  # the checkpoint holds rank 0's RNG state (dropout); other ranks get their own
        torch.manual_seed(cfg.seed * 1000 + info.rank + step)
    ddp = dist.wrap_ddp(model, device)
    model.train()

    logger = Logger(run_dir, cfg.steps, start_step=step, enabled=is_main, tensorboard=cfg.tensorboard,
                    progress=cfg.progress, desc="train-ar")
    if is_main:
        (run_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if latest is not None:
            logger.info(f"resumed from {latest} at step {step}")
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info(f"RQ-Transformer {n_params / 1e6:.2f}M parameters, codes {tuple(model_cfg.code_shape)} "
                    f"K={model_cfg.vocab_size}, cond {cond.kind}, {len(cache)} cached items "
                    f"({cache.path}), lr {lr:g}, {info.world_size} process(es) x batch {cfg.batch_size}")

    def save(current: int) -> None:
        if is_main:
            extra = {"step": current, "nonfinite": guard.state_dict(), "model_config": model_cfg_json}
            save_checkpoint(run_dir, current, modules, optimizers, schedulers, extra, keep_last=cfg.keep_last)
        dist.barrier()

    def samples(current: int) -> None:
        if not is_main:
            return
        grid = sample_grid(model, vae, cond, cfg.samples_per_class, seed=cfg.seed, top_k=cfg.sample_top_k,
                           top_p=cfg.sample_top_p, device=device, bf16=cfg.bf16)
        from rqvae.data.images import save_image

        save_image(grid, run_dir / "samples" / f"step_{current:06d}.png")
        logger.image(current, "samples", grid)

    sampler = iter(ResumableBatchSampler(len(cache), cfg.batch_size, cfg.seed, info.rank, info.world_size,
                                         start_step=step, seeded_keys=False))
    quantizer = vae.quantizer
    hint = f"; the last checkpoint in {run_dir / 'checkpoints'} is intact (continue with --resume)"
    sums: dict[str, float] = {}
    n_logged = 0
    t_last = time.perf_counter()
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    try:
        while step < end:
            idx = torch.tensor(next(sampler), dtype=torch.long)  # (B,)
            g = step_generator(cfg.seed, step, info.rank)
            z = cache.latents[idx].to(device=device, dtype=torch.float32)  # (B, h, w, n_z)
            # Eq. 15: soft labels Q_tau and codes drawn from them (fresh every batch)
            probs, codes = quantizer.soft_codes(z, cfg.temperature, stochastic=cfg.stochastic, generator=g)
            c = cond.values[idx].to(device)  # (B,) or (B, L); the model drops it to null w.p. cfg_dropout
            B, h, w, D = codes.shape
            opt.zero_grad(set_to_none=True)
            with autocast(device, cfg.bf16):
                out = ddp(codes, c, return_cond_logits=cond.kind == "text")
            logits, text_logits = _split_output(out)  # (B, T, D, K), (B, L-1, V)
            img_loss = ar_image_loss(logits, probs.reshape(B, h * w, D, -1), codes.reshape(B, h * w, D),
                                     soft_labels=cfg.soft_labels)
            parts = {"loss/image": img_loss}
            if cond.kind == "text" and text_logits is not None:
                txt_loss = ar_text_loss(text_logits, c, cond.pad_id)
                loss = cfg.image_loss_weight * img_loss + cfg.text_loss_weight * txt_loss
                parts["loss/text"] = txt_loss
            else:
                loss = img_loss
            parts["loss/total"] = loss
            if not guard.check(loss, step=step, hint=hint):
                step += 1  # skipped: the data and codes of this step are not retried
                sched.step()
                continue
            loss.backward()
            gnorm = clip_grad_norm(model.parameters(), cfg.grad_clip)
            if not guard.check(gnorm, step=step, hint=hint):
                opt.zero_grad(set_to_none=True)
                step += 1
                sched.step()
                continue
            lr_used = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            step += 1

            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + gnorm
            n_logged += 1
            logger.advance()
            if step % cfg.log_every == 0 or step == end:
                now = time.perf_counter()
                values = dist.all_reduce_mean({k: v / n_logged for k, v in sums.items()})
                values["lr"] = lr_used
                values["perf/images_per_s"] = n_logged * cfg.batch_size * info.world_size / (now - t_last)
                logger.scalars(step, values)
                sums, n_logged, t_last = {}, 0, now
            if step % cfg.checkpoint_every == 0 and step < end:
                save(step)
            if cfg.sample_every > 0 and step % cfg.sample_every == 0 and step < end:
                samples(step)
        save(step)
        if step < cfg.steps:  # stopped early by stop_after: the checkpoint is the result
            logger.info(f"stopped at step {step} of {cfg.steps}; continue with --resume")
        elif is_main:
            samples(step)
            out = model.save_pretrained(run_dir / "model")
            if cond.kind == "text":
                from rqvae.data.text import save_tokenizer

                save_tokenizer(cond.tokenizer, out)
            logger.info(f"saved the RQ-Transformer to {out}")
        dist.barrier()
    finally:
        logger.close()
    return model
