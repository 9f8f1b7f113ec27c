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
decay to 0, gradient-norm clipping at 1.0 (``--bf16``: bf16 autocast where it is fast). The data order
and the codes of micro-batch m depend only on (seed, m, rank), so a resumed run is bitwise identical to
an uninterrupted one on CPU. :class:`ARTask` supplies this; the loop is
:class:`rqvae.train.trainer.Trainer`'s.

Fine-tuning (``--init-from DIR``, :mod:`rqvae.train.ar_init`): start from a trained RQ-Transformer (ours, a
run's ``model/`` or an official checkpoint) with a fresh optimizer; another class count gets new class
embeddings. Validation (``--val-data`` / ``--val-split``): ``val/bits_d1..D`` and ``val/bits``, the NLL
in bits per code of the greedy codes; ``RUN/model/`` is then the model with the lowest ``val/bits`` and
``RUN/model-last/`` the final one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rqvae import distributed as dist
from rqvae.config import option
from rqvae.data import ResumableBatchSampler, build_image_dataset
from rqvae.data.build import DATA_HELP
from rqvae.data.features import load_or_build_features
from rqvae.data.images import RESIZE_HELP, RESIZE_MODES
from rqvae.data.text import TOKENIZER_NAME, encode_texts, save_tokenizer
from rqvae.distributed import DistInfo
from rqvae.errors import UserError
from rqvae.models.transformer import AR_PRESETS, RQTransformer
from rqvae.models.vae import RQVAE
from rqvae.train.activations import HELP as ACTIVATIONS_HELP
from rqvae.train.activations import checkpoint_blocks
from rqvae.train.ar_cond import Conditions, build_conditions, dataset_captions, sample_grid
from rqvae.train.ar_init import (
    DEFAULT_PRESET,
    check_codebook,
    data_fields,
    init_config,
    load_into,
    scratch_config,
)
from rqvae.train.ar_loss import ar_image_loss, ar_text_loss, soft_label_lines, step_generator
from rqvae.train.finetune import INIT_HELP, init_folder, load_init_transformer
from rqvae.train.optim import build_optimizer, build_scheduler
from rqvae.train.precision import autocast
from rqvae.train.task import TrainerConfig, TrainTask, config_json
from rqvae.train.trainer import Trainer
from rqvae.train.val_metrics import ar_bits, split_output
from rqvae.train.validation import ValidationConfig, holdout_indices, val_split_name

log = logging.getLogger("rqvae.train.ar")

OFFICIAL_LR = 5e-4
SMALL_PRESET_LR = 1e-3
PAPER_PRESET_PREFIXES = ("imagenet", "cc3m", "ffhq", "lsun")
TEXT_LOSS_WEIGHT, IMAGE_LOSS_WEIGHT = 0.1, 0.9  # official CC-3M config

__all__ = ["ARTask", "Conditions", "TrainARConfig", "ar_image_loss", "ar_text_loss", "sample_grid",
           "step_generator", "train_ar"]


@dataclass(kw_only=True)
class TrainARConfig(TrainerConfig, ValidationConfig):
    vae: str = option(help="folder of the trained RQ-VAE (a train-vae run's model/)")
    data: str = option(help=DATA_HELP)
    init_from: str | None = option(None, INIT_HELP + "; on data with another class count the class "
                                         "embeddings are new", metavar="DIR")
    allow_new_codebook: bool = option(False, "with --init-from: accept a --vae whose codebook differs from "
                                             "the one the model was trained on (e.g. a fine-tuned "
                                             "tokenizer); the new codebook replaces the model's")
    cond: str = option("class", "condition: class labels (sub-folders / Fashion-MNIST labels), none, or "
                                "captions", choices=("class", "uncond", "text"))
    preset: str | None = option(None, f"RQ-Transformer preset: {', '.join(AR_PRESETS)} (default: "
                                      f"{DEFAULT_PRESET}; with --init-from: that model's architecture)")
    model: dict[str, Any] = option(factory=dict, flag="--model-config", metavar="JSON",
                                   help="JSON file (or inline JSON object) of RQTransformerConfig fields "
                                        "over the preset")
    split: str = option("train", "dataset split (Fashion-MNIST: train or test)")
    resize_mode: str = option("crop", RESIZE_HELP + " (the feature cache keeps one entry per mode)",
                              choices=RESIZE_MODES)
    captions: str | None = option(None, "text models: a JSONL file of {\"file\": ..., \"text\": ...}; "
                                        "default: a .txt file beside each image; 'classes': the class "
                                        "name of each image")
    tokenizer: str | None = option(None, "text models: a tokenizer.json (default: train byte-level BPE on "
                                         "the captions)")
    text_len: int = option(32, "text tokens per caption (padded/truncated)")
    text_vocab_size: int = option(16384, "BPE vocabulary cap when training a tokenizer")
    flip: bool = option(False, "also train on horizontally flipped images (a second cached copy)")
    fsdp: bool = option(False, "shard the RQ-Transformer's weights, gradients and AdamW state over the "
                               "processes (FSDP2; torchrun with several processes); checkpoints are sharded, "
                               "RUN/model is gathered as usual")
    activation_checkpointing: bool = option(False, ACTIVATIONS_HELP)
    feature_cache: str | None = option(None, "folder of cached encoder features (default: $RQVAE_CACHE or "
                                             "~/.cache/rqvae)")
    batch_size: int = option(64, "images per process and micro-batch")
    lr: float | None = option(None, "AdamW learning rate (default: 5e-4 as official for the paper presets; "
                                    "1e-3 for the small CPU presets)")
    weight_decay: float = option(1e-4, "AdamW weight decay (matrices only)")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas")
    warmup_steps: int | None = option(None, "linear warm-up steps (default: min(500, steps / 20))")
    grad_clip: float = option(1.0, "max gradient norm (0: off)")
    temperature: float = option(0.5, "tau of the soft labels (Sec. 3.2.3)")
    soft_labels: bool = option(True, "soft targets Q_tau (--no-soft-labels, ablation: one-hot of the codes)")
    stochastic: bool = option(True, "codes sampled from Q_tau (--no-stochastic, ablation: greedy codes)")
    cond_dropout: float | None = option(None, "probability of the null condition, for classifier-free "
                                              "guidance (default: the preset's cfg_dropout, or the "
                                              "--init-from model's)")
    text_loss_weight: float = option(TEXT_LOSS_WEIGHT, "text models: weight of the caption loss")
    image_loss_weight: float = option(IMAGE_LOSS_WEIGHT, "text models: weight of the image loss")
    samples_per_class: int = option(4, "samples per class (or prompt) in the sample grids")
    sample_top_k: int | None = option(None, "top-k of the sample grids")
    sample_top_p: float | None = option(None, "top-p of the sample grids")

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        preset = self.preset or ("imagenet" if self.init_from else DEFAULT_PRESET)  # fine-tuning: 5e-4
        return OFFICIAL_LR if preset.startswith(PAPER_PRESET_PREFIXES) else SMALL_PRESET_LR

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(500, self.steps // 20)

    def validate(self) -> None:
        super().validate()
        checks = [
            (self.preset is None or self.preset in AR_PRESETS,
             f"unknown RQ-Transformer preset {self.preset!r}; choose one of {sorted(AR_PRESETS)}"),
            (self.learning_rate() > 0, f"--lr must be > 0, got {self.learning_rate()}"),
            (self.temperature > 0, f"--temperature must be > 0, got {self.temperature}"),
            (self.cond_dropout is None or 0.0 <= self.cond_dropout < 1.0,
             f"--cond-dropout must be in [0, 1), got {self.cond_dropout}"),
            (self.cond != "uncond" or not self.cond_dropout,
             "--cond-dropout needs a condition (--cond class or text)"),
            (self.text_len >= 2 or self.cond != "text", f"--text-len must be >= 2, got {self.text_len}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        self.check_validation()


class ARTask(TrainTask):
    """Stage 2: the RQ-Transformer (optimizer "model") on codes drawn from cached features."""

    name = "train-ar"

    def __init__(self, cfg: TrainARConfig, dataset: Any = None) -> None:
        self.cfg, self.dataset = cfg, dataset
        self.init_model: RQTransformer | None = None
        self.notes: list[str] = []  # start-up lines about fine-tuning
        self.train_items: torch.Tensor | None = None  # cache rows to train on (None: all)
        self.val: tuple[torch.Tensor, torch.Tensor] | None = None  # validation latents and conditions

    def prepare(self, info: DistInfo) -> None:
        """The frozen tokenizer, the data, the cached features and the conditions."""

        cfg = self.cfg
        self.info, self.device = info, info.device
        self.vae = vae = RQVAE.from_pretrained(cfg.vae).to(info.device).eval().requires_grad_(False)
        vc = vae.config
        if not vc.shared_codebook:
            raise UserError(f"{cfg.vae} has one codebook per depth; the RQ-Transformer embeds codes with "
                            "a single shared codebook (the paper's setting): train the RQ-VAE with a shared "
                            "one")
        if self.dataset is None:
            self.dataset = build_image_dataset(cfg.data, vc.image_size, vc.in_channels, split=cfg.split,
                                               resize_mode=cfg.resize_mode)
        captions = dataset_captions(cfg, self.dataset) if cfg.cond == "text" else None
        self.cache = load_or_build_features(
            vae, cfg.vae, self.dataset, data_spec=cfg.data, split=cfg.split, image_size=vc.image_size,
            channels=vc.in_channels, cache_dir=cfg.feature_cache, flip=cfg.flip, captions=captions,
            device=info.device, progress=cfg.progress and info.is_main)
        self.cond = build_conditions(self._cond_cfg(), self.dataset, self.cache.labels, self.cache.captions)
        data = data_fields(cfg, vae, self.cond, self.cache.code_hw)
        self.codebook = vae.quantizer.codebook[0].detach().clone()
        if cfg.init_from:
            self.init_model = loaded = load_init_transformer(cfg.init_from, self.codebook.cpu())
            self.model_cfg = init_config(cfg, loaded.config, data)
            if check_codebook(cfg, loaded, self.codebook):
                self.notes.append(f"the codebook of {cfg.vae} replaces the model's (--allow-new-codebook)")
        else:
            self.model_cfg = scratch_config(cfg, data)
        self._prepare_validation(captions)

    def _cond_cfg(self) -> Any:
        """The config for the conditions: a text model fine-tuned from a folder uses its tokenizer."""
        cfg = self.cfg
        if cfg.cond == "text" and cfg.init_from and cfg.tokenizer is None:
            tok = init_folder(cfg.init_from) / TOKENIZER_NAME
            if tok.is_file():
                return dataclasses.replace(cfg, tokenizer=str(tok))
        return cfg

    def _prepare_validation(self, captions: list[str] | None) -> None:
        """Held-out latents and conditions: a seeded part of the cache (--val-split; flipped copies of
        held-out images are left out of training too) or the features of --val-data."""
        cfg, cache, cond = self.cfg, self.cache, self.cond
        if cfg.val_split > 0:
            n = len(cache) // 2 if cfg.flip else len(cache)  # rows n..2n-1 mirror rows 0..n-1
            train, held = holdout_indices(n, cfg.val_split, cfg.seed)
            self.train_items = torch.cat([train, train + n]) if cfg.flip else train
            self.val = cache.latents[held], cond.values[held]
        elif cfg.val_data is not None:
            vc, split = self.vae.config, val_split_name(cfg.val_data)
            ds = build_image_dataset(cfg.val_data, vc.image_size, vc.in_channels, split=split,
                                     resize_mode=cfg.resize_mode)
            texts = dataset_captions(dataclasses.replace(cfg, data=cfg.val_data), ds) if cond.kind == "text" \
                else None
            val = load_or_build_features(
                self.vae, cfg.vae, ds, data_spec=cfg.val_data, split=split, image_size=vc.image_size,
                channels=vc.in_channels, cache_dir=cfg.feature_cache, captions=texts, device=self.device,
                progress=False)
            values = {"uncond": torch.zeros_like(val.labels), "class": val.labels}.get(cond.kind)
            if cond.kind == "class" and int(val.labels.max()) >= cond.num_classes:
                raise UserError(f"--val-data {cfg.val_data} has more classes than the training data "
                                f"({cond.num_classes})")
            self.val = val.latents, encode_texts(cond.tokenizer, texts) if values is None else values
        self.val_metric = "val/bits" if self.val is not None else None

    def build(self, info: DistInfo) -> None:

        cfg = self.cfg
        self.model = model = self._new_model()
        if self.init_model is not None:
            self.notes += load_into(model, self.init_model)
        dist.broadcast_module(model)
        if cfg.activation_checkpointing:
            checkpoint_blocks(transformer_blocks(model))
        if cfg.fsdp and info.world_size > 1:  # before the optimizer: it steps the shards
            _fsdp().shard_model(model, transformer_blocks(model))
            self.sharded = True
        model.train()
        opt = build_optimizer(model, "adamw", lr=cfg.learning_rate(), betas=tuple(cfg.betas),
                              weight_decay=cfg.weight_decay)
        self.modules, self.optimizers = {"model": model}, {"model": opt}
        self.schedulers = {"model": build_scheduler(opt, cfg.warmup(), max(1, cfg.steps), "cosine")}

    def _new_model(self) -> RQTransformer:
        return RQTransformer(self.model_cfg, codebook=self.codebook).to(self.device)

    def copy_model(self) -> torch.nn.Module:
        if not self.sharded:
            return super().copy_model()
        return _fsdp().sharded_twin(self.model, self._new_model, transformer_blocks)

    def plain_model(self) -> RQTransformer | None:
        """The model as a plain module: itself, or with --fsdp a copy gathered on rank 0 (None on the other
        ranks; every rank must call it then)."""
        return _fsdp().gathered_copy(self.model, self._new_model) if self.sharded else self.model

    def batches(self, start: int) -> Iterator[Any]:

        info, items = self.info, self.train_items
        sampler = ResumableBatchSampler(len(self.cache) if items is None else len(items), self.cfg.batch_size,
                                        self.cfg.seed, info.rank, info.world_size, start_step=start,
                                        seeded_keys=False)
        return iter(sampler) if items is None else (items[torch.tensor(b)].tolist() for b in sampler)

    def train_step(self, batch: Any, *, step: int, micro: int, scale: float) -> dict[str, torch.Tensor]:
        cfg, cond, device = self.cfg, self.cond, self.device
        idx = torch.tensor(batch, dtype=torch.long)  # (B,)
        z = self.cache.latents[idx].to(device=device, dtype=torch.float32)  # (B, h, w, n_z)
        # Eq. 15: soft labels Q_tau and codes drawn from them (fresh every batch)
        g = step_generator(cfg.seed, micro, self.info.rank)
        probs, codes = self.vae.quantizer.soft_codes(z, cfg.temperature, stochastic=cfg.stochastic,
                                                     generator=g)
        c = cond.values[idx].to(device)  # (B,) or (B, L); the model drops it to null w.p. cfg_dropout
        B, h, w, D = codes.shape
        with autocast(device, cfg.bf16):
            out = self.model(codes, c, return_cond_logits=cond.kind == "text")
        logits, text_logits = split_output(out)  # (B, T, D, K), (B, L-1, V)
        img_loss = ar_image_loss(logits, probs.reshape(B, h * w, D, -1), codes.reshape(B, h * w, D),
                                 soft_labels=cfg.soft_labels)
        parts = {"loss/image": img_loss}
        loss = img_loss
        if cond.kind == "text" and text_logits is not None:
            parts["loss/text"] = txt_loss = ar_text_loss(text_logits, c, cond.pad_id)
            loss = cfg.image_loss_weight * img_loss + cfg.text_loss_weight * txt_loss
        parts["loss/total"] = loss
        (loss * scale).backward()
        return {k: v.detach() for k, v in parts.items()}

    def validate(self, step: int) -> dict[str, float] | None:
        cfg = self.cfg
        if self.val is None or not cfg.is_validation_step(step, cfg.steps):
            return None
        latents, conds = self.val
        return ar_bits(self.model, self.vae.quantizer, latents, conds, batch_size=cfg.batch_size,
                       device=self.device)

    def sample(self, step: int) -> torch.Tensor | None:
        cfg, model = self.cfg, self.plain_model()
        if model is None:
            return None
        return sample_grid(model, self.vae, self.cond, cfg.samples_per_class, seed=cfg.seed,
                           top_k=cfg.sample_top_k, top_p=cfg.sample_top_p, device=self.device, bf16=cfg.bf16)

    def extra_state(self) -> dict[str, Any]:
        return {"model_config": config_json(self.model_cfg)}

    def describe(self, world_size: int) -> list[str]:
        mc, cfg = self.model_cfg, self.cfg
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        lines = [f"RQ-Transformer {n_params / 1e6:.2f}M parameters, codes {tuple(mc.code_shape)} "
                 f"K={mc.vocab_size}, cond {self.cond.kind}, {len(self.cache)} cached items "
                 f"({self.cache.path}), lr {cfg.learning_rate():g}, {world_size} process(es) x batch "
                 f"{cfg.batch_size}"]
        if cfg.soft_labels or cfg.stochastic:
            z = self.cache.latents[:256].to(device=self.device, dtype=torch.float32)  # (n, h, w, n_z)
            lines += soft_label_lines(self.vae.quantizer, z, cfg.temperature, cfg.seed)
        if self.cond.kind == "class":
            table = ", ".join(f"{i} {name}" for i, name in enumerate(self.cond.class_names or []))
            lines.append(f"classes (id name): {table}")
        if cfg.fsdp:
            lines.append(f"FSDP: weights, gradients and AdamW state sharded over {world_size} processes"
                         if self.sharded else "--fsdp with one process: nothing to shard")
        if cfg.activation_checkpointing:
            lines.append("activation checkpointing: each transformer block recomputed in the backward pass")
        if cfg.init_from:
            lines.append(f"fine-tuning from {cfg.init_from} (its weights, a fresh optimizer)")
        lines += [f"init-from: {note}" for note in self.notes]
        if self.val is not None:
            every = cfg.validation_interval(cfg.steps)
            lines.append(f"validation: {self.val[0].shape[0]} items every {every} "
                         f"steps{' (held out of training)' if self.train_items is not None else ''}")
        return lines

    def save_final(self, run_dir: Path | None, name: str = "model") -> None:
        model = None if run_dir is None else self.plain_model()
        if model is None:
            return
        out = model.save_pretrained(run_dir / name)
        if self.cond.kind == "text":

            save_tokenizer(self.cond.tokenizer, out)
        log.info("saved the RQ-Transformer to %s", out)


def transformer_blocks(model: RQTransformer) -> list[torch.nn.Module]:
    """The units of activation checkpointing and FSDP: every spatial and depth transformer block."""
    return [*model.spatial_blocks, *model.depth_blocks]


def _fsdp() -> Any:
    from rqvae.train import fsdp  # torch.distributed.tensor takes about a second to import: only for --fsdp

    return fsdp


def train_ar(cfg: TrainARConfig, dataset: Any = None) -> Any:
    """Train (or resume) an RQ-Transformer on the codes of the frozen RQ-VAE ``cfg.vae``; returns it.

    Writes ``run_dir/model/`` (save_pretrained, plus ``tokenizer.json`` for text models) at the end.
    ``dataset``: an already built dataset (e.g. :class:`rqvae.data.TensorImageDataset`) instead of
    ``cfg.data`` (``cfg.data`` then only names it in the feature-cache key). Problems a user can cause
    (paths, data, captions, config) raise :class:`UserError` before the first step.
    """
    return Trainer(cfg, ARTask(cfg, dataset)).train()
