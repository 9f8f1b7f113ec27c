"""What a folder holds (``rqvae info``): our model folders and training runs, and official checkpoints.

:func:`describe` returns a JSON-able dict: the kind of folder, the stage, the model config (preset-free),
parameter count, code shape and codebook size, and for training runs the steps done, the data, and the
last logged training and validation metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from rqvae.eval.classes import class_table
from rqvae.models.hub import config_from_dict, resolve_model_dir
from rqvae.models.vae import RQVAEConfig
from rqvae.official.load import is_official_folder, load_official

MODEL_TYPES = {"rqvae": "stage 1 (RQ-VAE tokenizer)", "rqtransformer": "stage 2 (RQ-Transformer)",
               "classifier": "evaluation classifier"}


def _num_parameters(weights: Path) -> int:
    with safe_open(str(weights), framework="pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _last_metrics(metrics: Path) -> dict[str, Any]:
    """The last value of every metric in a run's metrics.jsonl, and the step it was logged at."""
    last: dict[str, Any] = {}
    if not metrics.is_file():
        return last
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
        step = row.pop("step", None)
        for k, v in row.items():
            last[k] = {"value": v, "step": step}
    return last


def _describe_ours(model_dir: Path) -> dict[str, Any]:
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.pop("model_type", None)
    info: dict[str, Any] = {"kind": "rqvae model folder", "path": str(model_dir), "model_type": model_type,
                            "stage": MODEL_TYPES.get(model_type, "unknown"), "config": config}
    weights = model_dir / "model.safetensors"
    if weights.is_file():
        info["parameters"] = _num_parameters(weights)
    if model_type == "rqvae":
        cfg = config_from_dict(RQVAEConfig, dict(config), source=str(model_dir / "config.json"))
        f = cfg.downsample_factor
        info["code_shape"] = [cfg.image_size // f, cfg.image_size // f, cfg.depth]
        info["codebook_size"] = cfg.codebook_size
        info["image"] = [cfg.in_channels, cfg.image_size, cfg.image_size]
    elif model_type == "rqtransformer":
        info["code_shape"] = list(config["code_shape"])
        info["codebook_size"] = config["vocab_size"]
        info["condition"] = config.get("cond_type")
        if config.get("class_names"):
            info["classes"] = class_table(config["class_names"])
    run = model_dir.parent
    if model_dir.name == "model" and (run / "train_config.json").is_file():
        info["run"] = _describe_run(run)
    return info


def _describe_run(run: Path) -> dict[str, Any]:
    train = json.loads((run / "train_config.json").read_text())
    metrics = _last_metrics(run / "metrics.jsonl")
    steps = max((m["step"] for m in metrics.values() if isinstance(m.get("step"), int)), default=None)
    return {"path": str(run), "data": train.get("data"), "steps": steps,
            "configured_steps": train.get("steps"), "preset": train.get("preset"),
            "validation": {k: v for k, v in metrics.items() if k.startswith("val/")},
            "training": {k: v for k, v in metrics.items() if k.startswith("loss/")}}


def _unique_numel(tensors) -> int:
    """Elements of the checkpoint's tensors, counting storage shared by several names once (the official
    shared codebook is stored once per depth)."""
    seen, n = set(), 0
    for v in tensors:
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            n += v.numel()
    return n


def _describe_official(src: Path) -> dict[str, Any]:
    state, arch = load_official(src)
    kind = arch.get("type")
    info: dict[str, Any] = {"kind": "official checkpoint folder", "path": str(src), "model_type": kind,
                            "stage": {"rq-vae": MODEL_TYPES["rqvae"],
                                      "rq-transformer": MODEL_TYPES["rqtransformer"]}.get(kind, "unknown"),
                            "parameters": _unique_numel(state.values()), "config": arch}
    if kind == "rq-vae":
        hp = arch.get("hparams", {})
        info["code_shape"], info["codebook_size"] = hp.get("code_shape"), hp.get("n_embed")
    elif kind == "rq-transformer":
        info["code_shape"], info["codebook_size"] = arch.get("block_size"), arch.get("vocab_size")
        info["condition"] = "class" if arch.get("vocab_size_cond", 1) > 1 else "uncond or text"
    return info


def describe(path: str | Path) -> dict[str, Any]:
    """What ``path`` holds: one of our model folders (or a run with ``model/``) or an official checkpoint."""
    path = Path(path)
    if is_official_folder(path):
        return _describe_official(path)
    return _describe_ours(resolve_model_dir(path))


def format_info(info: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`describe`'s result."""
    lines = [f"{info['path']}: {info['kind']}, {info['stage']}"]
    if "parameters" in info:
        lines.append(f"  parameters     {info['parameters'] / 1e6:.3f}M")
    for key in ("code_shape", "codebook_size", "image", "condition", "classes"):
        if info.get(key) is not None:
            lines.append(f"  {key.replace('_', ' '):<14} {info[key]}")
    run = info.get("run")
    if run:
        lines.append(f"  trained on     {run['data']} ({run['steps']} of {run['configured_steps']} steps, "
                     f"run {run['path']})")
        for group in ("training", "validation"):
            for k, v in sorted(run[group].items()):
                lines.append(f"  {k:<22} {v['value']:.5g} (step {v['step']})")
    return "\n".join(lines)
