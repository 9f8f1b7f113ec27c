"""The one prepared check to run when a GPU machine is lent (about 5 minutes on one GPU).

    python benchmarks/gpu_check.py                      # CUDA; exits 2 with one line if there is none
    python benchmarks/gpu_check.py --device cpu --quick  # smoke test of the script itself (seconds)

Each check runs on its own (a failure is reported, the others still run; exit code 1 if any failed):

1. ``train``: a few steps of ``train_vae`` / ``train_ar`` (the library's trainer) on synthetic in-memory data
   (random images; stage 2 on the codes of a saved random RQ-VAE), fp32 and bf16 autocast: seconds per step
   after the warm-up (the trainer's ``time/step_s``, with a metrics line and so a host sync every step),
   first and last loss, all losses finite, the bf16 speed-up.
2. ``sampling``: ``RQTransformer.generate`` on the issue's two configs (w256 4+2 layers K 256; w512 8+2
   layers K 2048; 8x8x4 class-conditional codes, random weights) at batch 8 and 64: the optimised sampler
   (``impl="fast"``) and the reference decode in fp32, the fast one in bf16, and on CUDA the fast one with
   every step recorded as a CUDA graph (``impl="graphs"``, fp32 and bf16, its first call recording); best of
   3 calls after a warm-up (``torch.cuda.synchronize`` around each). Each must draw the reference decode's
   codes for a fixed seed in fp32.
3. ``memory``: the paper's ``imagenet-480m`` preset, two AdamW steps in bf16 autocast at small batches:
   parameter count, ``torch.cuda.max_memory_allocated``, step time.
4. ``distributed``: a one-rank process group (NCCL on CUDA, gloo on CPU), one all-reduce, and a short
   ``train-vae`` run inside it (the trainer's barriers then go through the backend).

Prints one JSON object and markdown tables and writes the JSON to ``--out`` (default ``$OUT/gpu_check.json``
when ``$OUT`` is set, else ``gpu_check.json``). ``--quick`` shrinks every size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as torch_dist

from rqvae import distributed as rq_dist
from rqvae.data import TensorImageDataset
from rqvae.models.transformer import AR_PRESETS, RQTransformer, RQTransformerConfig
from rqvae.models.vae import RQVAE, VAE_PRESETS, RQVAEConfig
from rqvae.train.ar import TrainARConfig, train_ar
from rqvae.train.ar_loss import ar_image_loss
from rqvae.train.optim import build_optimizer
from rqvae.train.precision import autocast, bf16_is_fast
from rqvae.train.vae import TrainVAEConfig, train_vae

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling_speed import OFFICIAL  # noqa: E402  (the issue's two sampling configs)

Row = dict[str, object]
Job = tuple[str, Callable[[], list[Row]]]


@dataclass(frozen=True)
class VAERun:
    preset: str
    batch: int
    model: dict = field(default_factory=dict)  # RQVAEConfig fields over the preset
    image_size: int | None = None


@dataclass(frozen=True)
class ARRun:
    preset: str
    batch: int
    vae: VAERun  # the random RQ-VAE whose codes it trains on (code shape, K, n_z)


@dataclass(frozen=True)
class Sizes:
    steps: int  # training steps per run, of which the first `warmup` are not timed
    warmup: int
    vae_runs: tuple[VAERun, ...]
    ar_runs: tuple[ARRun, ...]
    sample_configs: dict[str, RQTransformerConfig]
    sample_batches: tuple[int, ...]
    repeats: int
    memory_preset: str
    memory_batches: tuple[int, ...]


FMNIST_VAE = VAERun("fmnist32-8x8x4", 64)
FULL = Sizes(
    steps=10, warmup=3,
    vae_runs=(FMNIST_VAE, VAERun("imagenet256-8x8x4", 8)),
    ar_runs=(ARRun("fmnist-small", 64, FMNIST_VAE),
             ARRun("ffhq-355m", 32, VAERun("tiny", 32, dict(codebook_size=2048, embed_dim=256)))),
    sample_configs={name: cfg for name, (cfg, _) in OFFICIAL.items()},
    sample_batches=(8, 64), repeats=3, memory_preset="imagenet-480m", memory_batches=(8, 32))
TINY_VAE = VAERun("tiny", 4, dict(ch=16), image_size=16)
QUICK = Sizes(
    steps=3, warmup=1, vae_runs=(TINY_VAE,),
    ar_runs=(ARRun("tiny", 8, TINY_VAE), ARRun("tiny", 8, replace(TINY_VAE, model=dict(ch=16, embed_dim=8)))),
    sample_configs={f"{name} (quick: shrunk)": replace(cfg, code_shape=(2, 2, 2), width=32, n_heads=2,
                                                       vocab_size=32, embed_dim=8)
                    for name, (cfg, _) in OFFICIAL.items()},
    sample_batches=(2, 3), repeats=1, memory_preset="tiny", memory_batches=(2,))


# ------------------------------------------------------------------------------------------- helpers
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_seconds(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls (the caller has warmed ``fn`` up)."""
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def random_images(n: int, channels: int, size: int, num_classes: int = 10) -> TensorImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    return TensorImageDataset(images, torch.arange(n) % num_classes)


def vae_fields(run: VAERun) -> dict:
    """The RQVAEConfig fields of the run's RQ-VAE (the preset, its overrides and the image size)."""
    fields = {**VAE_PRESETS[run.preset], **run.model}
    if run.image_size is not None:
        fields["image_size"] = run.image_size
    return fields


def common_options(device: str, sizes: Sizes, run_dir: Path, bf16: bool) -> dict:
    return dict(run_dir=str(run_dir), steps=sizes.steps, log_every=1, checkpoint_every=0, sample_every=0,
                progress=False, tensorboard=False, seed=0, device=device, bf16=bf16)


def step_stats(run_dir: Path, warmup: int) -> Row:
    """Seconds per step after the warm-up, losses and their finiteness, from the run's metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "time/step_s" in m]
    timed = sorted(m["time/step_s"] for m in steps[warmup:])
    losses = [m["loss/total"] for m in steps]
    return {"s_per_step": timed[len(timed) // 2], "loss_first": losses[0], "loss_last": losses[-1],
            "finite": all(math.isfinite(v) for v in losses), "steps_timed": len(timed)}


def dtype_pair(name: str, batch: int, device: str, run_one: Callable[[bool], Row]) -> list[Row]:
    """The fp32 and bf16 rows of one training run, the bf16 one with its speed-up over fp32. "dtype" says
    what ran: the trainer trains in fp32 when bf16 is requested on a device without fast bf16."""
    rows = []
    for bf16 in (False, True):
        t = time.perf_counter()
        dtype = ("bf16" if bf16_is_fast(device) else "fp32 (bf16 asked, slow here)") if bf16 else "fp32"
        row: Row = {"run": name, "batch": batch, "dtype": dtype, **run_one(bf16)}
        row["total_s"] = time.perf_counter() - t
        if not row["finite"]:
            row["problem"] = "non-finite loss"
        rows.append(row)
    rows[1]["bf16_speedup"] = rows[0]["s_per_step"] / rows[1]["s_per_step"]
    return rows


# --------------------------------------------------------------------------------------------- checks
def train_jobs(device: str, sizes: Sizes, tmp: Path) -> list[Job]:
    jobs: list[Job] = []
    for i, run in enumerate(sizes.vae_runs):
        def vae_one(bf16: bool, run: VAERun = run, i: int = i) -> Row:
            fields = vae_fields(run)
            run_dir = tmp / f"vae{i}-{bf16}"
            cfg = TrainVAEConfig(data="(synthetic)", preset=run.preset, model=dict(run.model),
                                 image_size=fields["image_size"],
                                 batch_size=run.batch, **common_options(device, sizes, run_dir, bf16))
            train_vae(cfg, dataset=random_images(run.batch * 4, fields["in_channels"], fields["image_size"]))
            return step_stats(run_dir, sizes.warmup)

        name = f"train-vae {run.preset}"
        jobs.append((name, lambda run=run, name=name, f=vae_one: dtype_pair(name, run.batch, device, f)))
    for i, run in enumerate(sizes.ar_runs):
        def ar_one(bf16: bool, run: ARRun = run, i: int = i) -> Row:
            vae_dir, fields = tmp / f"ar-vae{i}", vae_fields(run.vae)
            if not vae_dir.exists():
                torch.manual_seed(0)
                RQVAE(RQVAEConfig(**fields)).save_pretrained(vae_dir)
            run_dir = tmp / f"ar{i}-{bf16}"
            cfg = TrainARConfig(vae=str(vae_dir), data="(synthetic)", cond="class", preset=run.preset,
                                feature_cache=str(tmp / "features"), batch_size=run.batch,
                                samples_per_class=1, **common_options(device, sizes, run_dir, bf16))
            images = random_images(run.batch * 4, fields["in_channels"], fields["image_size"], num_classes=4)
            train_ar(cfg, dataset=images)
            return step_stats(run_dir, sizes.warmup)

        vae = vae_fields(run.vae)
        name = f"train-ar {run.preset} (K {vae['codebook_size']}, n_z {vae['embed_dim']})"
        jobs.append((name, lambda run=run, name=name, f=ar_one: dtype_pair(name, run.batch, device, f)))
    return jobs


def random_transformer(cfg: RQTransformerConfig, device: str) -> RQTransformer:
    """Random weights and codebook, built directly on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):
        return RQTransformer(cfg, codebook=torch.randn(cfg.vocab_size, cfg.embed_dim))


def sampling_row(model: RQTransformer, batch: int, device: str, repeats: int) -> Row:
    cond = torch.arange(batch, device=device) % model.config.num_classes

    def call(impl: str, dtype: torch.dtype) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(0)
        return model.generate(cond, generator=g, dtype=dtype, impl=impl)

    fast, ref = call("fast", torch.float32), call("reference", torch.float32)  # also the warm-ups
    call("fast", torch.bfloat16)
    row: Row = {"batch": batch, "identical_fp32": torch.equal(fast, ref),
                "equal_code_fraction": (fast == ref).float().mean().item()}
    for key, impl, dtype in (("fast_fp32_s", "fast", torch.float32), ("reference_fp32_s", "reference",
                             torch.float32), ("fast_bf16_s", "fast", torch.bfloat16)):
        row[key] = best_seconds(lambda impl=impl, dtype=dtype: call(impl, dtype), device, repeats)
    row["fast_vs_reference"] = row["reference_fp32_s"] / row["fast_fp32_s"]
    row["bf16_vs_fp32"] = row["fast_fp32_s"] / row["fast_bf16_s"]
    differ = "drew other codes than the reference (fp32, same seed)"
    problems = [] if row["identical_fp32"] else [f"the fast sampler {differ}"]
    if torch.device(device).type == "cuda":  # impl="graphs" records CUDA graphs: CUDA only
        try:
            row.update(graphs_fields(call, ref, row["fast_bf16_s"], device, repeats))
            if not row["graphs_identical_fp32"]:
                problems.append(f"the CUDA-graph sampler {differ}")
        except Exception as e:  # reported in the row; the other figures stay
            problems.append(f"impl='graphs' failed: {type(e).__name__}: {e}")
    if problems:
        row["problem"] = "; ".join(problems)
    return row


def graphs_fields(call: Callable[[str, torch.dtype], torch.Tensor], ref: torch.Tensor, fast_bf16_s: float,
                  device: str, repeats: int) -> Row:
    """The CUDA-graph sampler: its first call (recording every step), its codes against the reference's in
    fp32, and its replayed calls' seconds in fp32 and bf16."""
    sync(device)
    t = time.perf_counter()
    graphs = call("graphs", torch.float32)
    sync(device)
    out: Row = {"graphs_first_call_fp32_s": time.perf_counter() - t,
                "graphs_identical_fp32": torch.equal(graphs, ref)}
    call("graphs", torch.bfloat16)
    for key, dtype in (("graphs_fp32_s", torch.float32), ("graphs_bf16_s", torch.bfloat16)):
        out[key] = best_seconds(lambda dtype=dtype: call("graphs", dtype), device, repeats)
    out["graphs_vs_fast_bf16"] = fast_bf16_s / out["graphs_bf16_s"]
    return out


def sampling_jobs(device: str, sizes: Sizes, tmp: Path) -> list[Job]:
    jobs: list[Job] = []
    for name, cfg in sizes.sample_configs.items():
        def one(name: str = name, cfg: RQTransformerConfig = cfg) -> list[Row]:
            model = random_transformer(replace(cfg, dropout=0.0), device).eval()
            params = sum(p.numel() for p in model.parameters())
            return [{"config": name, "params_M": params / 1e6,
                     **sampling_row(model, b, device, sizes.repeats)} for b in sizes.sample_batches]

        jobs.append((name, one))
    return jobs


def memory_row(model: RQTransformer, opt: torch.optim.Optimizer, batch: int, device: str) -> Row:
    """Two bf16-autocast AdamW steps at ``batch``: the second's time, the peak memory of both."""
    c = model.config
    H, W, D = c.code_shape
    codes = torch.randint(c.vocab_size, (batch, H, W, D), device=device)
    cond = torch.randint(c.num_classes, (batch,), device=device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(2):
        sync(device)
        t = time.perf_counter()
        with autocast(device, True):
            logits = model(codes, cond)  # (B, T, D, K)
        loss = ar_image_loss(logits, None, codes.reshape(batch, H * W, D), soft_labels=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        seconds.append(time.perf_counter() - t)
    row: Row = {"batch": batch, "step_s": seconds[-1], "first_step_s": seconds[0], "loss": loss.item()}
    if device == "cuda":
        row["max_memory_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        row["max_memory_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
    if not math.isfinite(row["loss"]):
        row["problem"] = "non-finite loss"
    return row


def memory_jobs(device: str, sizes: Sizes, tmp: Path) -> list[Job]:
    def run() -> list[Row]:
        model = random_transformer(AR_PRESETS[sizes.memory_preset], device).train()
        params = sum(p.numel() for p in model.parameters())
        opt = build_optimizer(model, "adamw", lr=5e-4, betas=(0.9, 0.95), weight_decay=1e-4)
        return [{"preset": sizes.memory_preset, "params": params, "params_M": params / 1e6,
                 "bf16_autocast": bf16_is_fast(device), **memory_row(model, opt, b, device)}
                for b in sizes.memory_batches]

    return [(sizes.memory_preset, run)]


@contextlib.contextmanager
def world_of_one(device: str):
    """A process group of one rank (NCCL on CUDA, gloo on CPU) on a free local port; env restored after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cuda = device == "cuda"
    try:
        torch_dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1,
                                      device_id=torch.device("cuda", 0) if cuda else None)
        yield torch_dist.get_backend()
    finally:
        rq_dist.cleanup()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def distributed_jobs(device: str, sizes: Sizes, tmp: Path) -> list[Job]:
    def run() -> list[Row]:
        small = replace(QUICK, vae_runs=(TINY_VAE,), ar_runs=())
        with world_of_one(device) as backend:
            info = rq_dist.init_distributed(device)
            t = torch.arange(4.0, device=info.device)
            torch_dist.all_reduce(t)
            (_, train), = train_jobs(device, small, tmp / "distributed")
            rows = train()
        ok = torch.equal(t.cpu(), torch.arange(4.0))
        return [{"backend": backend, "device": str(info.device), "all_reduce_ok": ok,
                 **{k: r[k] for k in ("run", "dtype", "s_per_step", "finite")}} for r in rows]

    return [("world size 1", run)]


CHECKS = {"train": train_jobs, "sampling": sampling_jobs, "memory": memory_jobs,
          "distributed": distributed_jobs}


# ---------------------------------------------------------------------------------------------- report
def run_check(name: str, make_jobs: Callable[..., list[Job]], device: str, sizes: Sizes, tmp: Path) -> dict:
    """Every job of one check; an exception or a row with a "problem" fails the check, not the script."""
    t, rows, errors = time.perf_counter(), [], []
    try:
        jobs = make_jobs(device, sizes, tmp)
    except Exception:  # noqa: BLE001 - a broken check is reported, the others still run
        jobs, errors = [], [f"setup: {traceback.format_exc(limit=-3)}"]
    for job_name, job in jobs:
        try:
            rows += job()
        except Exception as e:  # noqa: BLE001
            errors.append(f"{job_name}: {type(e).__name__}: {e}")
            rows.append({"job": job_name, "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc(limit=-4)})
            print(rows[-1]["traceback"], file=sys.stderr)
        if device == "cuda":
            torch.cuda.empty_cache()
    errors += [f"{r.get('run') or r.get('config') or r.get('preset')}: {r['problem']}" for r in rows
               if "problem" in r]
    return {"ok": not errors, "seconds": time.perf_counter() - t, "errors": errors, "rows": rows}


def environment(device: str) -> dict:
    env = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "platform": platform.platform(), "threads": torch.get_num_threads()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, device_memory_GiB=props.total_memory / 2**30,
                   capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())),
                   bf16_supported=torch.cuda.is_bf16_supported(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/").replace("\n", " ")


def markdown(result: dict) -> str:
    out = [f"GPU check on {result['env']['device_name']} (torch {result['env']['torch']}, CUDA "
           f"{result['env']['cuda']}){' [quick]' if result['quick'] else ''}: "
           f"{'all checks passed' if not result['failed'] else 'FAILED: ' + ', '.join(result['failed'])}"]
    for name, check in result["checks"].items():
        rows = [{k: v for k, v in r.items() if k != "traceback"} for r in check["rows"]]
        out += ["", f"### {name} ({'ok' if check['ok'] else 'FAILED'}, {check['seconds']:.1f} s)", ""]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        if keys:
            out += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            out += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
        out += [f"- error: {fmt(e)}" for e in check["errors"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--quick", action="store_true", help="shrink every size (a smoke test of the script)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--out", default=None,
                   help="JSON file (default: $OUT/gpu_check.json, else gpu_check.json)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.checks.split(",")) - set(CHECKS))
    if unknown:
        p.error(f"unknown checks {unknown}; choose from {','.join(CHECKS)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None or (device == "cuda" and not torch.cuda.is_available()):
        print("gpu_check: no CUDA device here; pass --device cpu (with --quick) for a smoke test")
        return 2
    sizes, t = QUICK if args.quick else FULL, time.perf_counter()
    result: dict = {"env": environment(device), "quick": args.quick, "checks": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name in args.checks.split(","):
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            result["checks"][name] = run_check(name, CHECKS[name], device, sizes, Path(tmp))
    result["failed"] = [n for n, c in result["checks"].items() if not c["ok"]]
    result["wall_s"] = time.perf_counter() - t
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, default=str))
    print(markdown(result))
    print(f"written to {out}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
