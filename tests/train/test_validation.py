"""Validation and early stopping: val/* metrics at the right steps, the held-out part never trained on,
RUN/model = the best validation model and RUN/model-last = the final one, exact resume with validation."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rqvae.data import TensorImageDataset
from rqvae.errors import UserError
from rqvae.models.vae import RQVAE
from rqvae.train.ar import ARTask
from rqvae.train.checkpoint import load_checkpoint
from rqvae.train.trainer import Trainer
from rqvae.train.vae import train_vae
from rqvae.train.validation import holdout_indices, split_for_validation
from tests.train.test_finetune import ar_cfg, class_images
from tests.train.test_train_vae import small_cfg, synthetic_images


def metrics(run):
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Recording(TensorImageDataset):
    """Records the items the training loader asks for (batched access; validation reads single items)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.trained_on = set()

    def __getitems__(self, keys):
        self.trained_on.update(k[0] if isinstance(k, tuple) else k for k in keys)
        return super().__getitems__(keys)


def test_vae_validation_metrics_at_their_steps_and_held_out_items_never_trained_on(tmp_path):
    ds = Recording(synthetic_images(40))
    run = tmp_path / "run"
    train_vae(small_cfg(run, steps=6, val_split=0.25, val_every=2, log_every=3, checkpoint_every=0,
                        sample_every=0, disc_weight=0.0), dataset=ds)
    val = [m for m in metrics(run) if "val/loss_rec" in m]
    assert [m["step"] for m in val] == [2, 4, 6]
    keys = {"val/loss_rec", *(f"val/{k}_d{d}" for k in ("psnr", "codes_used") for d in range(1, 5))}
    assert all(keys <= m.keys() for m in val)
    assert all(1 <= m["val/codes_used_d1"] <= 32 for m in val)
    _, held = holdout_indices(40, 0.25, 0)
    assert len(held) == 10 and ds.trained_on and not ds.trained_on & set(held.tolist())
    assert len(ds.trained_on) >= 24  # 6 batches of 8 from epochs of 3 batches (30 items, drop_last)
    best = min(val, key=lambda m: m["val/loss_rec"])["step"]
    assert (run / "model").is_dir() and (run / "model-last").is_dir()
    if best == 6:
        assert same(weights(run / "model"), weights(run / "model-last"))


def test_split_for_validation_is_seeded_disjoint_and_complete():
    ds = TensorImageDataset(synthetic_images(20))
    train, val = split_for_validation(ds, 0.2, seed=3)
    assert sorted(train.indices + val.indices) == list(range(20)) and len(val) == 4
    assert split_for_validation(ds, 0.2, seed=3)[1].indices == val.indices
    assert split_for_validation(ds, 0.2, seed=4)[1].indices != val.indices
    assert torch.equal(val[0]["image"], ds[val.indices[0]]["image"])
    with pytest.raises(UserError, match="nothing to train on"):
        holdout_indices(2, 0.9, 0)


def test_early_stop_keeps_the_best_model(tmp_path):
    """A far too high LR makes validation worse; the run stops after 2 validations without improvement
    and RUN/model holds the weights of the best step's checkpoint."""
    run = tmp_path / "run"
    train_vae(small_cfg(run, steps=40, lr=0.05, warmup_steps=0, val_split=0.25, val_every=1, early_stop=2,
                        checkpoint_every=1, keep_last=40, log_every=1, sample_every=0, disc_weight=0.0),
              dataset=TensorImageDataset(synthetic_images(40)))
    val = [m for m in metrics(run) if "val/loss_rec" in m]
    last = val[-1]["step"]
    assert last < 40  # stopped early
    best = min(val, key=lambda m: m["val/loss_rec"])
    assert best["step"] == last - 2 and all(m["val/loss_rec"] >= best["val/loss_rec"] for m in val[-2:])
    vae = RQVAE.from_pretrained(run / "model")
    load_checkpoint(run / "checkpoints" / f"step_{best['step']:06d}", {"vae": vae})
    assert same(weights(run / "model"), {k: v.contiguous() for k, v in vae.state_dict().items()})
    assert not same(weights(run / "model"), weights(run / "model-last"))
    assert (run / "checkpoints" / f"step_{last:06d}").is_dir()


def test_resume_with_validation_and_early_stop_is_bitwise(tmp_path):
    ds = TensorImageDataset(synthetic_images(40))
    kw = dict(steps=12, lr=0.03, warmup_steps=0, val_split=0.25, val_every=2, early_stop=2,
              checkpoint_every=2, log_every=2, sample_every=0, disc_weight=0.0)
    train_vae(small_cfg(tmp_path / "a", **kw), dataset=ds)
    train_vae(small_cfg(tmp_path / "b", stop_after=6, **kw), dataset=ds)
    assert not (tmp_path / "b" / "model").exists()
    train_vae(small_cfg(tmp_path / "b", resume=True, **kw), dataset=ds)
    for name in ("model", "model-last"):
        assert same(weights(tmp_path / "a" / name), weights(tmp_path / "b" / name)), name
    val_a = [m for m in metrics(tmp_path / "a") if "val/loss_rec" in m]
    assert val_a == [m for m in metrics(tmp_path / "b") if "val/loss_rec" in m]


def test_ar_validation_bits_and_held_out_rows(tmp_path):
    torch.manual_seed(0)
    vae_dir = tmp_path / "vae"
    RQVAE.from_preset("tiny").save_pretrained(vae_dir)
    images, labels = class_images(20, 32, 4)
    ds = TensorImageDataset(images, labels)
    cfg = ar_cfg(tmp_path, vae_dir, "run", preset="tiny", steps=4, batch_size=4, val_split=0.2, val_every=2,
                 flip=True, stochastic=True, soft_labels=True)
    task = ARTask(cfg, ds)
    Trainer(cfg, task).train()
    val = [m for m in metrics(tmp_path / "run") if "val/bits" in m]
    assert [m["step"] for m in val] == [2, 4]
    D, K = task.model_cfg.depth, task.model_cfg.vocab_size
    for m in val:
        per_depth = [m[f"val/bits_d{d}"] for d in range(1, D + 1)]
        assert m["val/bits"] == pytest.approx(sum(per_depth) / D)
        assert all(0 < b < 2 * torch.log2(torch.tensor(float(K))) for b in per_depth)
    assert len(per_depth) == D and f"val/bits_d{D + 1}" not in val[0]
    _, held = holdout_indices(20, 0.2, cfg.seed)
    rows = set(task.train_items.tolist())
    assert len(rows) == 32 and not rows & set(held.tolist()) and not rows & set((held + 20).tolist())
    drawn = {i for _, b in zip(range(20), task.batches(0)) for i in b}
    assert drawn <= rows
    assert (tmp_path / "run" / "model").is_dir() and (tmp_path / "run" / "model-last").is_dir()


def test_validation_options_are_checked(tmp_path):
    with pytest.raises(UserError, match="--early-stop needs validation data"):
        small_cfg(tmp_path / "r", early_stop=3).validate()
    with pytest.raises(UserError, match="not both"):
        small_cfg(tmp_path / "r", val_split=0.1, val_data="x").validate()
