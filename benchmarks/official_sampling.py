"""Our sampler against the official one, side by side on this machine (issue 14's comparison).

For each configuration the official code (kakaobrain/rq-vae-transformer, run unmodified from its own
folder, ``--official-src``) builds a randomly initialised RQ-Transformer and RQ-VAE (the paper's layout:
code embeddings from the RQ-VAE codebook, cumulative sum over depth, one class token) and writes them as an
official checkpoint folder; our converter reads that folder, so both samplers run the same weights. Then
each batch size is timed in separate processes, alternating official / ours, ``--rounds`` times, one
``--threads`` each (process CPU time and wall time per call, after one warm-up call). Greedy decoding
(top-k 1) must give the same codes on both sides, which shows the comparison is like for like.

    .venv/bin/python benchmarks/official_sampling.py --official-src /path/to/official \
        --official-deps /path/to/omegaconf-etc

The official package is also called ``rqvae``, so it is only ever imported in a child process whose
``sys.path`` starts with ``--official-src`` (through ``official_import.py``, which lets its dataclasses
import on Python >= 3.11).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # name: (width, spatial layers, depth layers, heads, K, n_z)
    "w256 4+2 K256": (256, 4, 2, 8, 256, 64),
    "w512 8+2 K2048": (512, 8, 2, 8, 2048, 256),
}
CODE_SHAPE, CLASSES = (8, 8, 4), 10
SIDES = ("official", "fp32", "auto")  # the official sampler; ours in fp32; ours with its default dtype


def official_arch(width: int, n_spatial: int, n_depth: int, heads: int, k: int,
                  n_z: int) -> tuple[dict, dict]:
    """(RQ-VAE arch, RQ-Transformer arch) in the official config layout."""
    h, w, d = CODE_SHAPE
    vae = {"type": "rq-vae", "ema": None,
           "hparams": {"bottleneck_type": "rq", "embed_dim": n_z, "n_embed": k, "latent_shape": [h, w, n_z],
                       "code_shape": [h, w, d], "shared_codebook": True, "decay": 0.99,
                       "restart_unused_codes": True, "loss_type": "mse", "latent_loss_weight": 0.25},
           "ddconfig": {"double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3, "out_ch": 3,
                        "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                        "dropout": 0.0}}

    def stack(n: int) -> dict:
        return {"n_layer": n, "block": {"embed_dim": width, "n_head": heads, "mlp_bias": True,
                                        "attn_bias": True, "attn_pdrop": 0.0, "resid_pdrop": 0.0,
                                        "gelu": "v1"}}
    ar = {"type": "rq-transformer", "ema": None, "ar_hierarchy": None, "vocab_size": k,
          "block_size": [h, w, d], "vocab_size_cond": CLASSES, "block_size_cond": 1, "embed_dim": width,
          "input_embed_dim": n_z, "use_padding_emb": False, "input_emb_vqvae": True, "head_emb_vqvae": True,
          "scaled_head_emb_vqvae": False, "cumsum_depth_ctx": True, "shared_tok_emb": True,
          "embd_pdrop": 0.0, "body": stack(n_spatial), "head": stack(n_depth), "shared_cls_emb": True}
    return vae, ar


def _official_models(folder: Path):
    """Child side: the official models of ``folder`` (built and saved there on first use, seed 0)."""
    from omegaconf import OmegaConf  # the official code's dependency, only in its child process
    # the official package, also named rqvae (its folder is first on sys.path in this process)
    create_model = importlib.import_module("rqvae.models").create_model
    augment_arch_defaults = importlib.import_module("rqvae.utils.config").augment_arch_defaults
    spec = json.loads((folder / "spec.json").read_text())
    vae_arch, ar_arch = official_arch(*spec["config"])
    torch.manual_seed(0)
    models = []
    for arch, sub in ((vae_arch, "vae"), (ar_arch, "ar")):
        m = create_model(augment_arch_defaults(OmegaConf.create({"arch": arch}).arch))
        m = (m[0] if isinstance(m, tuple) else m).eval()
        models.append(m)
        if not (folder / sub / "model.pt").is_file():
            (folder / sub).mkdir(parents=True, exist_ok=True)
            torch.save({"epoch": 0, "state_dict": m.state_dict()}, folder / sub / "model.pt")
            (folder / sub / "config.yaml").write_text(OmegaConf.to_yaml({"arch": arch}))
    return models


def _sampler(side: str, folder: Path):
    """Child side: a function (cond, top_k) -> codes (B, H, W, D) for ``side``: official, or ours in fp32
    or with its default dtype (auto)."""
    if side == "official":
        vae, ar = _official_models(folder)

        def sample(cond: torch.Tensor, top_k: int | None) -> torch.Tensor:
            partial = torch.zeros(len(cond), *CODE_SHAPE, dtype=torch.long)
            with torch.no_grad():
                return ar.sample(partial, vae, cond=cond, top_k=top_k, is_tqdm=False)
        return sample
    from rqvae.official.transformer import convert_official_rqtransformer_dir
    model = convert_official_rqtransformer_dir(folder / "ar", folder / "vae")
    dtype = torch.float32 if side == "fp32" else None  # None: our default, the faster dtype per matmul

    def sample(cond: torch.Tensor, top_k: int | None) -> torch.Tensor:
        return model.generate(cond, top_k=top_k, dtype=dtype, generator=torch.Generator().manual_seed(0))
    return sample


def child(side: str, folder: Path, batches: list[int], threads: int, greedy: bool) -> dict:
    """Time one call per batch size (after a warm-up at that size); optionally the greedy codes."""
    torch.set_num_threads(threads)
    sample = _sampler(side, folder)
    out = {"times": {}}
    for b in batches:
        cond = torch.arange(b) % CLASSES
        sample(cond, None)  # warm-up
        w, c = time.perf_counter(), time.process_time()
        sample(cond, None)
        out["times"][str(b)] = (time.perf_counter() - w, time.process_time() - c)
    if greedy:
        out["greedy"] = sample(torch.arange(4) % CLASSES, 1).tolist()
    return out


def run_child(side: str, folder: Path, batches: list[int], args: argparse.Namespace, greedy: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if side == "official":
        env["RQ_OFFICIAL_SRC"] = args.official_src
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.official_deps,) if p)
    cmd = [sys.executable, __file__, "--child", side, "--folder", str(folder), "--threads", str(args.threads),
           "--batches", ",".join(map(str, batches)), "--official-import", args.official_import]
    cmd += ["--greedy"] if greedy else []
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if res.returncode != 0:
        sys.exit(f"{side} child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(name: str, args: argparse.Namespace, batches: list[int], work: Path) -> list[dict]:
    folder = work / name.replace(" ", "_").replace("+", "p")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps({"config": CONFIGS[name]}))
    times: dict[str, dict[int, list[tuple[float, float]]]] = {side: {} for side in SIDES}
    greedy = {}
    for r in range(args.rounds):
        for side in SIDES:  # official first: it writes the checkpoint folder
            res = run_child(side, folder, batches, args, greedy=(r == 0 and side != "auto"))
            for b, t in res["times"].items():
                times[side].setdefault(int(b), []).append(tuple(t))
            greedy[side] = res.get("greedy", greedy.get(side))
        print(f"  {name} round {r + 1}: " + ", ".join(
            f"b{b} " + " / ".join(f"{times[s][b][-1][1]:.2f}" for s in SIDES) for b in batches)
            + " CPU s (official / ours fp32 / ours auto)", flush=True)
    rows = []
    for b in batches:
        cpu = {s: min(t[1] for t in times[s][b]) for s in SIDES}
        wall = {s: min(t[0] for t in times[s][b]) for s in SIDES}
        rows.append({"config": name, "batch": b, "cpu": cpu, "wall": wall,
                     "same_greedy": greedy["official"] == greedy["fp32"]})
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"`{' '.join(sys.argv)}` (torch {torch.__version__}, {args.threads} thread(s) per process, "
             f"best of {args.rounds} alternating rounds; load average before: {args.load})", "",
             "| config | batch | official CPU s | ours fp32 CPU s | ours auto CPU s | speed-up fp32 / auto "
             "(by wall time) | target | greedy codes equal (fp32) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cpu, wall = r["cpu"], r["wall"]
        target = 3.0 if r["batch"] < 64 else 5.0
        best = max(cpu["official"] / cpu["fp32"], cpu["official"] / cpu["auto"])
        verdict = "met" if best >= target else "MISSED"
        lines.append(f"| {r['config']} | {r['batch']} | {cpu['official']:.3f} | {cpu['fp32']:.3f} | "
                     f"{cpu['auto']:.3f} | {cpu['official'] / cpu['fp32']:.2f}x / "
                     f"{cpu['official'] / cpu['auto']:.2f}x ({wall['official'] / wall['fp32']:.2f}x / "
                     f"{wall['official'] / wall['auto']:.2f}x) | {target:.0f}x: {verdict} | "
                     f"{r['same_greedy']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-src", default=os.environ.get("RQ_OFFICIAL_SRC"),
                   help="folder holding the official `rqvae` package (default: $RQ_OFFICIAL_SRC)")
    p.add_argument("--official-deps", default="", help="extra import path for its dependencies (omegaconf)")
    p.add_argument("--official-import", default=str(ROOT.parent / "shared" / "tools" / "official_import.py"),
                   help="the shim that lets the official code import on Python >= 3.11")
    p.add_argument("--batch-sizes", default="8,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    p.add_argument("--greedy", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child == "official":
            shim = Path(args.official_import)
            exec(compile(shim.read_text(), str(shim), "exec"), {})
        res = child(args.child, Path(args.folder), [int(b) for b in args.batches.split(",")], args.threads,
                    args.greedy)
        print(json.dumps(res))
        return
    if not args.official_src or not Path(args.official_src, "rqvae", "models").is_dir():
        sys.exit("error: --official-src must be a folder holding the official rqvae package "
                 "(e.g. an extract of kakaobrain/rq-vae-transformer)")
    args.load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    batches = [int(b) for b in args.batch_sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            rows += compare(name, args, batches, Path(tmp))
    text = markdown(rows, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
