"""Choose the `make demo` recipe by measurement (issue 10).

Every experiment is one stage trained or evaluated with the public entry points (train_vae, train_ar,
train_classifier, RQTransformer.generate, the eval functions) and stores its result as
``ROOT/<kind>/<name>/result.json``; an experiment whose result exists is skipped, one whose training was
interrupted resumes from its checkpoint. Kinds:

* ``vae``: train an RQ-VAE; test PSNR per depth (1,000 test images) and rFID (their reconstructions vs
  the same 1,000 test images as every FID here);
* ``cls``: train the classifier; accuracy on the 10,000 test images;
* ``ar``: train a class-conditional RQ-Transformer on a ``vae`` experiment's codes (the feature cache
  is built first and timed on its own);
* ``sample``: 100 samples per class (1,000) from an ``ar`` experiment with the sampling knobs; the
  ``cls`` classifier's accuracy on them and FID vs the 1,000 test images.

The floor (``floor`` experiment) is the FID of 1,000 training images vs the same 1,000 test images.

    python benchmarks/demo_recipe.py list
    python benchmarks/demo_recipe.py run vae/base cls/w32-s300 ...     # in order, one process
    python benchmarks/demo_recipe.py table --out results.md

Times are wall and process CPU seconds of this process (run it with OMP_NUM_THREADS=1 on a shared
machine; ``torch.set_num_threads`` is set from ``--threads``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rqvae.data import build_image_dataset
from rqvae.data.features import load_or_build_features
from rqvae.eval.batches import dataset_batches
from rqvae.eval.fid import frechet_distance, reference_stats
from rqvae.eval.inception import InceptionFeatures
from rqvae.eval.tokenizer import evaluate_tokenizer
from rqvae.models.classifier import Classifier, ClassifierConfig, classifier_accuracy
from rqvae.models.transformer import RQTransformer
from rqvae.models.vae import RQVAE
from rqvae.train.ar import TrainARConfig, train_ar
from rqvae.train.classifier import evaluate_dataset, train_classifier
from rqvae.train.vae import TrainVAEConfig, train_vae

DATA = "fmnist"
N_EVAL = 1000  # test images for PSNR / FID reference; samples for FID; training images for the floor
DEMO_AR_MODEL = dict(width=128, n_spatial_layers=3, n_depth_layers=1, n_heads=4)

# Today's demo stage 1 (rqvae.demo.pipeline.train_or_load_vae with the DemoConfig defaults).
VAE_BASE = dict(preset="fmnist32-8x8x4", batch_size=32, steps=800, disc_start=400)
KM = 8  # batches of encoder outputs for the k-means codebook init (codebook_init_batches)
AR_BASE = dict(preset="fmnist-small", model=DEMO_AR_MODEL, steps=800, batch_size=32)

# name -> (kind, params). A "vae" param of ar/sample names the vae experiment; "ar" and "cls" likewise.
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "floor": {},
    # ---- stage 1
    "vae/base": dict(VAE_BASE),  # today: GAN from step 400 of 800
    "vae/nogan-s2000": dict(VAE_BASE, steps=2000, disc_weight=0.0, disc_start=0),
    "vae/nogan-s2000-km": dict(VAE_BASE, steps=2000, disc_weight=0.0, disc_start=0, codebook_init_batches=KM),
    "vae/nogan-s1500-km": dict(VAE_BASE, steps=1500, disc_weight=0.0, disc_start=0, codebook_init_batches=KM),
    "vae/nogan-s1500": dict(VAE_BASE, steps=1500, disc_weight=0.0, disc_start=0),
    "vae/nogan-s1200-km-lr8e-4-cos": dict(VAE_BASE, steps=1200, disc_weight=0.0, disc_start=0,
                                          codebook_init_batches=KM, lr=8e-4, schedule="cosine"),
    "vae/nogan-s1200-lr8e-4-cos": dict(VAE_BASE, steps=1200, disc_weight=0.0, disc_start=0, lr=8e-4,
                                       schedule="cosine"),
    "vae/gan1600-s2000-km": dict(VAE_BASE, steps=2000, disc_start=1600, codebook_init_batches=KM),
    # ---- classifier
    "cls/w32-s300": dict(width=32, steps=300, batch_size=128),  # today
    "cls/w32-s800": dict(width=32, steps=800, batch_size=128),
    "cls/w32-s1500": dict(width=32, steps=1500, batch_size=128),
    "cls/w64-s800": dict(width=64, steps=800, batch_size=128),
    "cls/w16-s2400": dict(width=16, steps=2400, batch_size=128),
    "cls/w16-s1600": dict(width=16, steps=1600, batch_size=128),
    "cls/w32b2-s600": dict(width=32, blocks=2, steps=600, batch_size=128, lr=3e-3),  # the demo's
    "cls/w32b2-s1200": dict(width=32, blocks=2, steps=1200, batch_size=128, lr=3e-3),
    # ---- stage 2
    "ar/base": dict(AR_BASE, vae="vae/base"),  # today
    "ar/km2000-s800": dict(AR_BASE, vae="vae/nogan-s2000-km"),
    "ar/km2000-s1200": dict(AR_BASE, vae="vae/nogan-s2000-km", steps=1200),
    "ar/km1500-s800": dict(AR_BASE, vae="vae/nogan-s1500-km"),
    "ar/km1200c-s800": dict(AR_BASE, vae="vae/nogan-s1200-km-lr8e-4-cos"),
    "ar/km1500-s1200": dict(AR_BASE, vae="vae/nogan-s1500-km", steps=1200),
    # ---- sampling (no training)
    "sample/base": dict(ar="ar/base", cls="cls/w32-s300"),  # today: temperature 1, no top-k/p, no CFG
}


def _sampling_grid(ar: str, cls: str, prefix: str) -> None:
    """Sampling knobs on one AR model (cost: sampling + FID only)."""
    knobs = {
        "t1": {}, "cfg1.5": dict(cfg_scale=1.5), "cfg2": dict(cfg_scale=2.0), "cfg3": dict(cfg_scale=3.0),
        "topk64": dict(top_k=64), "topp0.9": dict(top_p=0.9), "t0.9": dict(temperature=0.9),
        "cfg2-topp0.9": dict(cfg_scale=2.0, top_p=0.9), "cfg1.5-topk64": dict(cfg_scale=1.5, top_k=64),
    }
    for k, v in knobs.items():
        EXPERIMENTS[f"sample/{prefix}-{k}"] = dict(ar=ar, cls=cls, **v)


for _v in [n for n in EXPERIMENTS if n.startswith("vae/")]:
    EXPERIMENTS[f"rfid/{_v[4:]}"] = dict(vae=_v)
for _ar in [n for n in EXPERIMENTS if n.startswith("ar/")]:
    for _cls in [n for n in EXPERIMENTS if n.startswith("cls/")]:
        _sampling_grid(_ar, _cls, f"{_ar[3:]}-{_cls[4:]}")
for _s in [n for n in EXPERIMENTS if n.startswith("sample/")]:
    EXPERIMENTS[f"fid/{_s[7:]}"] = dict(sample=_s)


# ------------------------------------------------------------------------------------- helpers
class Timer:
    def __init__(self) -> None:
        self.wall, self.cpu = time.time(), time.process_time()

    def read(self) -> dict[str, float]:
        wall, cpu = time.time() - self.wall, time.process_time() - self.cpu
        return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def _net() -> Any:

    return InceptionFeatures()


def _test_reference(root: Path, net: Any) -> Any:
    """Inception statistics of the 1,000 held-out test images (seeded subset), cached."""

    stats, _, _ = reference_stats(DATA, net, 32, 3, split="test", count=N_EVAL, cache_dir=root / "fidcache")
    return stats


def _batches(images: torch.Tensor, size: int = 50) -> list[torch.Tensor]:
    return [images[i:i + size] for i in range(0, len(images), size)]


def _floor(root: Path) -> dict[str, float]:
    """FID of 1,000 training images vs the 1,000 test images (the value a perfect model reaches)."""
    f = root / "floor" / "result.json"
    if f.is_file():
        return json.loads(f.read_text())
    run_floor(root, {}, root / "floor")
    return json.loads(f.read_text())


# ------------------------------------------------------------------------------------- stages
def run_floor(root: Path, p: dict[str, Any], out: Path) -> dict[str, Any]:

    t = Timer()
    net = _net()
    ref = _test_reference(root, net)
    t_ref = t.read()
    train = build_image_dataset(DATA, 32, 1, split="train")
    t2 = Timer()
    value, _ = frechet_distance(dataset_batches(train, 50, N_EVAL, seed=0), ref, net)
    return {"fid_floor": value, "time_reference": t_ref, "time_train_features": t2.read()}


def run_vae(root: Path, p: dict[str, Any], out: Path) -> dict[str, Any]:

    p = dict(p)
    if (out / "model" / "model.safetensors").is_file():
        vae, t_train = RQVAE.from_pretrained(out / "model"), json.loads((out / "train_time.json").read_text())
    else:
        steps = p["steps"]
        cfg = TrainVAEConfig(data=DATA, run_dir=str(out), image_size=32, channels=1,
                             checkpoint_every=max(1, steps // 4), log_every=max(1, min(50, steps // 20)),
                             sample_every=0, seed=0, resume=(out / "checkpoints").is_dir(), progress=False,
                             tensorboard=False, **p)
        t = Timer()
        vae = train_vae(cfg)
        t_train = t.read()
        (out / "train_time.json").write_text(json.dumps(t_train) + "\n")
    vae.eval()
    t = Timer()
    tok = evaluate_tokenizer(vae, DATA, split="test", count=N_EVAL, rfid=False, seed=0)
    psnr = {r["depth"]: r["psnr"] for r in tok["per_depth"]}
    t_psnr = t.read()
    return {"psnr": psnr, "code_usage": tok.get("code_usage"), "time_train": t_train, "time_psnr": t_psnr}


def run_rfid(root: Path, p: dict[str, Any], out: Path) -> dict[str, Any]:
    """FID of the full-depth reconstructions of the 1,000 test images vs those images."""

    vae = RQVAE.from_pretrained(root / p["vae"] / "model").eval()
    net = _net()
    ref = _test_reference(root, net)
    t = Timer()
    test = build_image_dataset(DATA, 32, 1, split="test")
    with torch.no_grad():
        recs = [vae(x).reconstruction.clamp(-1, 1) for x in dataset_batches(test, 50, N_EVAL, seed=0)]
    rfid, _ = frechet_distance(recs, ref, net)
    floor = _floor(root)["fid_floor"]
    return {"rfid": rfid, "fid_floor": floor, "rfid_gap": rfid - floor, "time_rfid": t.read()}


def run_cls(root: Path, p: dict[str, Any], out: Path) -> dict[str, Any]:

    test = build_image_dataset(DATA, 32, 1, split="test")
    if (out / "model.safetensors").is_file():
        model, t_train = Classifier.from_pretrained(out), json.loads((out / "train_time.json").read_text())
    else:
        train = build_image_dataset(DATA, 32, 1, split="train", augment=True)
        torch.manual_seed(0)
        model = Classifier(ClassifierConfig(in_channels=1, num_classes=train.num_classes, width=p["width"],
                                            blocks_per_stage=p.get("blocks", 1), image_size=32,
                                            class_names=tuple(train.class_names)))
        t = Timer()
        train_classifier(model, train, steps=p["steps"], batch_size=p["batch_size"], lr=p.get("lr", 2e-3),
                         seed=0, progress=False, run_dir=str(out / "run"))
        t_train = t.read()
        model.save_pretrained(out)
        (out / "train_time.json").write_text(json.dumps(t_train) + "\n")
    t = Timer()
    acc = evaluate_dataset(model.eval(), test)
    return {"test_accuracy": acc, "time_train": t_train, "time_eval": t.read()}


def run_ar(root: Path, p: dict[str, Any], out: Path) -> dict[str, Any]:

    p = dict(p)
    vae_dir = root / p.pop("vae") / "model"
    cache_dir = root / "featcache"
    t = Timer()
    vae = RQVAE.from_pretrained(vae_dir).eval().requires_grad_(False)
    ds = build_image_dataset(DATA, 32, 1, split="train")
    load_or_build_features(vae, str(vae_dir), ds, data_spec=DATA, split="train", image_size=32, channels=1,
                           cache_dir=str(cache_dir), progress=False)
    t_cache = t.read()
    if (out / "model" / "model.safetensors").is_file():
        RQTransformer.from_pretrained(out / "model")
        t_train = json.loads((out / "train_time.json").read_text())
    else:
        steps = p["steps"]
        cfg = TrainARConfig(vae=str(vae_dir), data=DATA, run_dir=str(out), cond="class",
                            checkpoint_every=max(1, steps // 4), log_every=max(1, min(50, steps // 20)),
                            sample_every=0, seed=0, resume=(out / "checkpoints").is_dir(), progress=False,
                            feature_cache=str(cache_dir), tensorboard=False, **p)
        t = Timer()
        train_ar(cfg)
        t_train = t.read()
        (out / "train_time.json").write_text(json.dumps(t_train) + "\n")
    final = _last_metrics(out / "metrics.jsonl")
    return {"time_feature_cache": t_cache, "time_train": t_train, "final_metrics": final}


def _last_metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {k: v for k, v in rows[-1].items() if "loss" in k or k == "step"} if rows else {}


def run_sample(root: Path, p: dict[str, Any], out: Path) -> dict[str, Any]:

    if p.get("ar") is None:  # not a sampling experiment of its own: see run_fid
        raise SystemExit("sample experiments need an ar")
    ar_params = EXPERIMENTS[p["ar"]]
    vae = RQVAE.from_pretrained(root / ar_params["vae"] / "model").eval()
    ar = RQTransformer.from_pretrained(root / p["ar"] / "model").eval()
    cls = Classifier.from_pretrained(root / p["cls"]).eval()
    labels = torch.arange(10).repeat_interleave(N_EVAL // 10)  # 100 per class
    g = torch.Generator().manual_seed(0)
    t = Timer()
    images = []
    with torch.no_grad():
        for b in _batches(labels, 100):
            codes = ar.generate(b, temperature=p.get("temperature", 1.0), top_k=p.get("top_k"),
                                top_p=p.get("top_p"), cfg_scale=p.get("cfg_scale", 1.0), generator=g)
            images.append(vae.decode(codes).clamp(-1, 1))
    images = torch.cat(images)
    t_sample = t.read()
    torch.save({"images": images, "labels": labels}, out / "samples.pt")
    per_class = {}
    for c in range(10):
        per_class[c] = classifier_accuracy(images[labels == c], labels[labels == c], cls)
    return {"sample_accuracy": classifier_accuracy(images, labels, cls), "per_class_accuracy": per_class,
            "time_sample": t_sample}


def run_fid(root: Path, p: dict[str, Any], out: Path) -> dict[str, Any]:
    """FID of a sample experiment's 1,000 images vs the 1,000 test images."""

    images = torch.load(root / p["sample"] / "samples.pt")["images"]
    net = _net()
    ref = _test_reference(root, net)
    t = Timer()
    value, _ = frechet_distance(_batches(images), ref, net)
    floor = _floor(root)["fid_floor"]
    return {"fid": value, "fid_floor": floor, "fid_gap": value - floor, "time_fid": t.read()}


RUNNERS = {"floor": run_floor, "vae": run_vae, "rfid": run_rfid, "cls": run_cls, "ar": run_ar,
           "sample": run_sample, "fid": run_fid}


def _deps(name: str) -> list[str]:
    p = EXPERIMENTS[name]
    return [p[k] for k in ("vae", "ar", "cls", "sample") if k in p]


def run(root: Path, name: str) -> dict[str, Any]:
    if name not in EXPERIMENTS:
        raise SystemExit(f"unknown experiment {name!r}; see `list`")
    out = root / name
    f = out / "result.json"
    if f.is_file():
        print(f"[skip] {name}: done ({f})", flush=True)
        return json.loads(f.read_text())
    for dep in _deps(name):
        run(root, dep)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[run] {name}: {EXPERIMENTS[name]}", flush=True)
    t = Timer()
    result = RUNNERS[name.split("/")[0]](root, EXPERIMENTS[name], out)
    result.update(name=name, params=EXPERIMENTS[name], time_total=t.read(), threads=torch.get_num_threads(),
                  command=f"python benchmarks/demo_recipe.py run {name}",
                  argv=" ".join(shlex.quote(a) for a in sys.argv),
                  finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    f.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"[done] {name}: {json.dumps({k: v for k, v in result.items() if k != 'params'}, default=str)}",
          flush=True)
    return result


# ------------------------------------------------------------------------------------- tables
def _load(root: Path, kind: str) -> list[dict[str, Any]]:
    return [json.loads((root / n / "result.json").read_text()) for n in EXPERIMENTS
            if n.startswith(kind + "/") and (root / n / "result.json").is_file()]


def _t(r: dict[str, Any], key: str) -> str:
    v = r.get(key) or {}
    return f"{v.get('wall_s', '')} / {v.get('cpu_s', '')}"


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(*cols: str) -> list[str]:
    return [_row(*cols), _row(*["---"] * len(cols))]


def tables(root: Path) -> str:
    lines = ["Times: wall s / process CPU s on the shared machine, 1 torch thread.", ""]
    floor = root / "floor" / "result.json"
    if floor.is_file():
        value = json.loads(floor.read_text())["fid_floor"]
        lines += [f"FID floor (1,000 train vs 1,000 test images): {value:.2f}", ""]
    lines += ["### RQ-VAE", ""]
    lines += _header("experiment", "params", "PSNR d=1/2/3/4 (dB)", "d4-d1", "rFID", "rFID gap", "train time")
    rfid = {r["params"]["vae"]: r for r in _load(root, "rfid")}
    for r in _load(root, "vae"):
        ps = [r["psnr"][str(d)] for d in (1, 2, 3, 4)]
        f = rfid.get(r["name"], {})
        lines.append(_row(r["name"], f"`{json.dumps(r['params'])}`", " / ".join(f"{x:.2f}" for x in ps),
                          f"{ps[3] - ps[0]:.2f}", _num(f.get("rfid")), _num(f.get("rfid_gap")),
                          _t(r, "time_train")))
    lines += ["", "### Classifier", ""] + _header("experiment", "params", "test accuracy", "train time")
    for r in _load(root, "cls"):
        lines.append(_row(r["name"], f"`{json.dumps(r['params'])}`", f"{r['test_accuracy']:.4f}",
                          _t(r, "time_train")))
    lines += ["", "### RQ-Transformer", ""]
    lines += _header("experiment", "params", "final loss", "feature cache time", "train time")
    for r in _load(root, "ar"):
        loss = {k: round(v, 4) for k, v in r["final_metrics"].items() if k != "step"}
        lines.append(_row(r["name"], f"`{json.dumps(r['params'])}`", loss, _t(r, "time_feature_cache"),
                          _t(r, "time_train")))
    lines += ["", "### Samples (1,000 = 100 per class, FID vs 1,000 test images)", ""]
    lines += _header("experiment", "params", "classifier acc on samples", "FID", "floor", "gap",
                     "sampling time", "FID time")
    fids = {r["params"]["sample"]: r for r in _load(root, "fid")}
    for r in _load(root, "sample"):
        f = fids.get(r["name"], {})
        lines.append(_row(r["name"], f"`{json.dumps(r['params'])}`", f"{r['sample_accuracy']:.3f}",
                          _num(f.get("fid")), _num(f.get("fid_floor")), _num(f.get("fid_gap")),
                          _t(r, "time_sample"), _t(f, "time_fid")))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["list", "run", "table"])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--root", default="/work/runs10")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="table: write the markdown here (default: stdout)")
    args = ap.parse_args()
    root = Path(args.root)
    torch.set_num_threads(args.threads)
    if args.command == "list":
        for n, p in EXPERIMENTS.items():
            done = "done" if (root / n / "result.json").is_file() else "    "
            print(f"{done}  {n}  {json.dumps(p)}")
    elif args.command == "run":
        for n in args.names:
            run(root, n)
    else:
        text = tables(root)
        if args.out:
            Path(args.out).write_text(text)
        else:
            print(text)


if __name__ == "__main__":
    main()
