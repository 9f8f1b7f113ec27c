"""train-ar --fsdp: two gloo processes under torchrun, FSDP2 on CPU.

One launch runs every sharded run (process start-up dominates); the checks compare them with each other
and with single-process runs on the global batch: the same loss curve within float tolerance, a stopped
and resumed run equal to the uninterrupted one, sharded checkpoints whose joined weights are the gathered
RUN/model, and the EMA / best-model copies and sample grids working on a sharded model.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from rqvae.data import TensorImageDataset
from rqvae.models.transformer import RQTransformer
from rqvae.models.vae import RQVAE
from rqvae.train.ar import TrainARConfig, train_ar
from rqvae.train.export import consolidate, export_model
from rqvae.train.sharded import SHARD_FILE

# Greedy codes (the stochastic ones are drawn per rank) and no condition dropout (the global RNG differs
# per rank): then 2 ranks x batch 4 see the same data and targets as 1 process x batch 8.
COMMON = dict(cond="class", preset="tiny", steps=6, warmup_steps=2, stochastic=False, log_every=1,
              checkpoint_every=3, sample_every=0, progress=False, tensorboard=False, seed=0, device="cpu",
              model={"dropout": 0.0})

SCRIPT = textwrap.dedent("""
    import json, logging, sys
    import torch
    from safetensors.torch import load_file
    from rqvae import distributed
    from rqvae.data import TensorImageDataset
    from rqvae.train.ar import TrainARConfig, train_ar

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    data = load_file(sys.argv[2])
    for kw in json.loads(sys.argv[1]):
        train_ar(TrainARConfig(**kw), dataset=TensorImageDataset(data["images"], data["labels"]))
    distributed.cleanup()
""")


def losses(run):
    return [json.loads(line)["loss/image"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss/image" in line]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every two-process run, launched once: {name: run folder}, plus the common settings."""
    tmp = tmp_path_factory.mktemp("fsdp")
    torch.manual_seed(0)
    RQVAE.from_preset("tiny").save_pretrained(tmp / "vae")
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(64, 3, 32, 32, generator=g) * 2 - 1, torch.arange(64) % 4
    save_file({"images": images, "labels": labels}, str(tmp / "data.safetensors"))
    base = dict(COMMON, vae=str(tmp / "vae"), data="mem", feature_cache=str(tmp / "cache"), batch_size=4)
    ds = TensorImageDataset(images, labels)
    single = dict(base, batch_size=8)  # one process on the global batch
    train_ar(TrainARConfig(**dict(single, run_dir=str(tmp / "to_fsdp"), stop_after=3)), dataset=ds)
    kws = [dict(base, run_dir=str(tmp / "fsdp"), fsdp=True),
           dict(base, run_dir=str(tmp / "part"), fsdp=True, stop_after=3),
           dict(base, run_dir=str(tmp / "part"), fsdp=True, resume=True),
           dict(base, run_dir=str(tmp / "ac"), fsdp=True, activation_checkpointing=True),
           dict(base, run_dir=str(tmp / "ema"), fsdp=True, ema_decay=0.9, val_split=0.25, steps=4,
                checkpoint_every=2, sample_every=2),
           dict(base, run_dir=str(tmp / "to_fsdp"), fsdp=True, resume=True)]
    (tmp / "script.py").write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp / "script.py"), json.dumps(kws), str(tmp / "data.safetensors")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "sharded over 2 processes" in r.stdout + r.stderr
    return tmp, ds, single


def test_sharded_run_follows_the_single_process_loss_curve_on_the_global_batch(runs):
    tmp, ds, single = runs
    model = train_ar(TrainARConfig(**dict(single, run_dir=str(tmp / "single"))), dataset=ds)
    two, one = losses(tmp / "fsdp"), losses(tmp / "single")
    assert len(two) == len(one) == 6 and one[-1] < one[0]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-6)
    gathered = weights(tmp / "fsdp" / "model")
    diff = torch.cat([(gathered[k] - v).flatten().double() for k, v in model.state_dict().items()])
    start = RQTransformer.from_pretrained(tmp / "fsdp" / "model").state_dict()
    assert diff.abs().max() < 1e-4, diff.abs().max()  # Adam: rounding noise, far below a step
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())


def test_checkpoints_are_sharded_and_a_stopped_run_resumes_exactly(runs):
    tmp = runs[0]
    ck = tmp / "fsdp" / "checkpoints" / "step_000003"
    state = json.loads((ck / "state.json").read_text())
    model = RQTransformer.from_pretrained(tmp / "fsdp" / "model")
    params = {f"model.{k}" for k, _ in model.named_parameters()}
    assert state["sharded"]["world_size"] == 2 and set(state["sharded"]["modules"]) == params  # not buffers
    pieces = [load_file(str(ck / SHARD_FILE.format(rank=r, world=2))) for r in range(2)]
    key = next(k for k in state["sharded"]["modules"])
    assert pieces[0][key].shape[0] + pieces[1][key].shape[0] == state["sharded"]["modules"][key][0]
    assert any(k.startswith("optimizers.model.state") for k in pieces[1])  # AdamW moments sharded too
    assert losses(tmp / "part") == losses(tmp / "fsdp")  # 3 steps, then 3 more after --resume
    assert_same(weights(tmp / "part" / "model"), weights(tmp / "fsdp" / "model"))


def test_gathered_model_equals_the_joined_shards_and_exports_as_a_model_folder(runs, tmp_path):
    tmp = runs[0]
    final = tmp / "fsdp" / "checkpoints" / "step_000006"
    joined = {k[len("model."):]: v for k, v in consolidate(final).items() if k.startswith("model.")}
    gathered = weights(tmp / "fsdp" / "model")
    assert_same(joined, gathered)
    out = export_model(tmp / "fsdp", tmp_path / "exported")
    assert_same(RQTransformer.from_pretrained(out).state_dict(), RQTransformer.from_pretrained(
        tmp / "fsdp" / "model").state_dict())


def test_sharded_checkpoint_resumes_in_one_process(runs, tmp_path):
    tmp, ds, single = runs
    shutil.copytree(tmp / "part", tmp_path / "one")  # the finished run; keep only its step-3 checkpoint
    for p in [tmp_path / "one" / "model", tmp_path / "one" / "checkpoints" / "step_000006"]:
        shutil.rmtree(p)
    (tmp_path / "one" / "metrics.jsonl").write_text("")
    train_ar(TrainARConfig(**dict(single, run_dir=str(tmp_path / "one"), resume=True)), dataset=ds)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "one")), torch.tensor(losses(tmp / "fsdp")[3:]),
                               rtol=1e-5, atol=1e-6)


def test_single_process_checkpoint_resumes_sharded(runs):
    tmp = runs[0]
    torch.testing.assert_close(torch.tensor(losses(tmp / "to_fsdp")), torch.tensor(losses(tmp / "fsdp")),
                               rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_under_fsdp_keeps_the_loss_curve(runs):
    tmp = runs[0]
    torch.testing.assert_close(torch.tensor(losses(tmp / "ac")), torch.tensor(losses(tmp / "fsdp")),
                               rtol=1e-6, atol=1e-7)


def test_ema_validation_and_samples_work_on_a_sharded_model(runs):
    tmp = runs[0]
    run = tmp / "ema"
    assert [p.name for p in sorted((run / "samples").iterdir())] == ["step_0000002.png", "step_0000004.png"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/bits" in m for m in metrics)
    joined = consolidate(run / "checkpoints" / "step_000004")
    ema = {k[len("ema.module."):]: v for k, v in joined.items() if k.startswith("ema.module.")}
    assert_same(weights(run / "model-last"), ema)  # the final model is the EMA model
    best = {k[len("best."):]: v for k, v in joined.items() if k.startswith("best.")}
    assert_same(weights(run / "model"), best)
