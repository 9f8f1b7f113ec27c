"""Join a training checkpoint (sharded by ``--fsdp`` or not) into one ``model.safetensors``.

``python -m rqvae.train.export CHECKPOINT OUT_DIR [--module model]``: CHECKPOINT is a
``checkpoints/step_*`` folder or a run folder (its latest checkpoint). For a stage-2 run OUT_DIR becomes a
normal model folder (``model.safetensors`` + ``config.json``, loadable by ``RQTransformer.from_pretrained``
and every command); for other runs it holds ``model.safetensors`` only. ``--module ema.module`` exports
the EMA weights, ``--module best`` the best model on the validation data.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from rqvae.errors import UserError
from rqvae.models.hub import config_from_dict, load_state_dict_checked
from rqvae.models.transformer import RQTransformer, RQTransformerConfig
from rqvae.train.checkpoint import MODULES_FILE, STATE_FILE, read_tensors, resolve_checkpoint
from rqvae.train.sharded import joined


def consolidate(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All module tensors of a checkpoint (folder or run folder) as whole tensors, named
    ``<module>.<key>``: the pieces of a sharded checkpoint are joined."""
    path = resolve_checkpoint(path)
    sharded = json.loads((path / STATE_FILE).read_text()).get("sharded")
    tensors = read_tensors(path / MODULES_FILE)
    if sharded:
        whole = joined(path, sharded)
        tensors.update({k: whole[k] for k in sharded["modules"]})
    return tensors


def export_model(path: str | os.PathLike, out: str | os.PathLike, module: str = "model") -> Path:
    """Write the module ``module`` of a checkpoint as ``out/model.safetensors`` (a whole model folder with
    ``config.json`` when the checkpoint holds an RQ-Transformer's config); returns ``out``."""
    tensors = consolidate(path)
    prefix = f"{module}."
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not weights:
        modules = sorted({k.split(".", 1)[0] for k in tensors})
        raise UserError(f"the checkpoint {path} has no module {module!r}; choose one of {modules} (the EMA "
                        "weights: ema.module)")
    state = json.loads((resolve_checkpoint(path) / STATE_FILE).read_text())
    config = state.get("extra", {}).get("model_config")
    if isinstance(config, dict) and "code_shape" in config and "codebook" in weights:
        model = RQTransformer(config_from_dict(RQTransformerConfig, config, source=str(path)),
                              codebook=weights["codebook"])
        load_state_dict_checked(model, weights, source=f"checkpoint {path} module {module!r}")
        return model.save_pretrained(out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rqvae.train.export",
                                description="join a training checkpoint (sharded or not) into one "
                                            "model.safetensors")
    p.add_argument("checkpoint", help="a checkpoints/step_* folder, or a run folder (its latest checkpoint)")
    p.add_argument("out", help="output folder")
    p.add_argument("--module", default="model", help="model (default), ema.module or best")
    args = p.parse_args(argv)
    try:
        print(export_model(args.checkpoint, args.out, args.module))
    except UserError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
