"""Two-process (gloo) training through torchrun: every rank ends with the same weights and codebook, and,
where the maths allows it, the same model as one process trained on the global batch."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from rqvae.models.vae import RQVAE
from rqvae.train.vae import TrainVAEConfig, train_vae
from tests.helpers.images import write_pngs

COMMON = dict(preset="tiny", image_size=16, lr=1e-3, steps=4, disc_ndf=16, log_every=2, checkpoint_every=2,
              sample_every=0, progress=False, tensorboard=False, device="cpu")
# No GAN (the discriminator's BatchNorm uses per-rank statistics on CPU) and no dead-code restarts (they
# draw rows by position, and the global batch is ordered differently from the ranks' halves): then
# 2 ranks x batch 4 compute the same gradients and codebook updates as 1 process x batch 8.
EXACT = dict(COMMON, model={"ch": 16, "codebook_size": 32, "restart_dead_codes": False}, disc_weight=0.0)
GAN = dict(COMMON, model={"ch": 16, "codebook_size": 32}, disc_start=1)

SCRIPT = textwrap.dedent("""
    import json, logging, sys
    import torch
    from safetensors.torch import save_file
    from rqvae import distributed
    from rqvae.train.vae import TrainVAEConfig, train_vae

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    for name, kw in json.loads(sys.argv[1]).items():
        model = train_vae(TrainVAEConfig(**kw))
        rank = distributed.get_rank()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{kw['run_dir']}.rank{rank}")
    distributed.cleanup()
""")


def test_two_process_gloo_runs_agree_across_ranks_and_with_one_process(tmp_path):
    data = tmp_path / "imgs"
    write_pngs(data)
    runs = {"exact": dict(EXACT, data=str(data), run_dir=str(tmp_path / "exact"), batch_size=4),
            "gan": dict(GAN, data=str(data), run_dir=str(tmp_path / "gan"), batch_size=4)}
    (tmp_path / "script.py").write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "script.py"), json.dumps(runs)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout + r.stderr

    for name in runs:
        r0 = load_file(str(tmp_path / f"{name}.rank0"))
        r1 = load_file(str(tmp_path / f"{name}.rank1"))
        assert any("codebook" in k for k in r0)
        for k in r0:  # weights and the EMA codebook: bitwise equal on both ranks
            assert torch.equal(r0[k], r1[k]), (name, k)
        saved = RQVAE.from_pretrained(tmp_path / name / "model").state_dict()
        for k, v in saved.items():
            assert torch.equal(v, r0[k]), (name, k)
    metrics = [json.loads(line) for line in (tmp_path / "gan" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4] and "loss/d" in metrics[-1]
    assert (tmp_path / "gan" / "checkpoints" / "step_000004").is_dir()

    single = train_vae(TrainVAEConfig(**dict(EXACT, data=str(data), run_dir=str(tmp_path / "single"),
                                              batch_size=8)))
    two = load_file(str(tmp_path / "exact.rank0"))
    start = RQVAE(TrainVAEConfig(**dict(EXACT, data="", run_dir="")).model_config()).state_dict()
    # The EMA codebook is a plain average of encoder outputs: equal up to float rounding.
    for k in ("quantizer.codebook", "quantizer.ema_sum", "quantizer.ema_count"):
        torch.testing.assert_close(two[k], single.state_dict()[k], rtol=1e-4, atol=1e-5)
    # Adam turns rounding noise in near-zero gradients into +-lr steps, so compare the weights as a whole:
    # the runs differ by far less than either moved from the initial weights.
    diff = torch.cat([(two[k] - v).flatten().double() for k, v in single.state_dict().items()])
    moved = torch.cat([(v - start[k]).flatten().double() for k, v in single.state_dict().items()])
    assert diff.norm() < 1e-3 * moved.norm(), (diff.norm(), moved.norm())
