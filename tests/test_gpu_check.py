"""benchmarks/gpu_check.py, the script to run when a GPU is lent: its quick CPU mode runs every check
(training of both stages through the trainer, both samplers, the memory step, a one-rank process group) and
passes; a failing check is reported while the others still run; without CUDA it refuses with exit 2."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_check  # noqa: E402


def test_quick_cpu_run_passes_every_check(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0, result["failed"]
    assert result["failed"] == [] and list(result["checks"]) == list(gpu_check.CHECKS)
    checks = result["checks"]
    assert all(c["ok"] and not c["errors"] for c in checks.values())
    train = checks["train"]["rows"]  # fp32 and bf16 of one VAE run and two AR runs, all finite
    assert len(train) == 2 * (len(gpu_check.QUICK.vae_runs) + len(gpu_check.QUICK.ar_runs))
    assert all(r["finite"] and r["s_per_step"] > 0 and r["steps_timed"] == 2 for r in train)
    assert all("bf16_speedup" in r for r in train[1::2])
    sampling = checks["sampling"]["rows"]
    assert len(sampling) == 2 * len(gpu_check.QUICK.sample_batches)
    assert all(r["identical_fp32"] and r["equal_code_fraction"] == 1.0 for r in sampling)
    (memory,) = checks["memory"]["rows"]
    assert memory["params"] == sum(p.numel() for p in gpu_check.random_transformer(
        gpu_check.AR_PRESETS["tiny"], "cpu").parameters())
    assert all(r["all_reduce_ok"] and r["backend"] == "gloo" for r in checks["distributed"]["rows"])
    printed = capsys.readouterr().out
    assert "### sampling (ok" in printed and "| config |" in printed


def test_a_failing_check_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(device, sizes, tmp):
        return [("boom", lambda: 1 / 0)]

    monkeypatch.setitem(gpu_check.CHECKS, "memory", broken)
    out = tmp_path / "r.json"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--checks", "memory,sampling", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 1 and result["failed"] == ["memory"]
    assert "ZeroDivisionError" in result["checks"]["memory"]["errors"][0]
    assert result["checks"]["sampling"]["ok"] and result["checks"]["sampling"]["rows"]


def test_a_sampler_mismatch_fails_the_check(monkeypatch):
    calls = []
    real = gpu_check.RQTransformer.generate

    def generate(self, *args, impl, **kw):  # the reference decode draws one different code
        codes = real(self, *args, impl=impl, **kw)
        calls.append(impl)
        if impl == "reference":
            codes[0, 0, 0, 0] = (codes[0, 0, 0, 0] + 1) % self.config.vocab_size
        return codes

    monkeypatch.setattr(gpu_check.RQTransformer, "generate", generate)
    sizes = gpu_check.QUICK
    check = gpu_check.run_check("sampling", gpu_check.sampling_jobs, "cpu", sizes, Path("."))
    assert not check["ok"] and "reference" in calls
    assert all(r["identical_fp32"] is False and r["equal_code_fraction"] < 1 for r in check["rows"])


def test_without_cuda_it_refuses_with_exit_code_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().out
