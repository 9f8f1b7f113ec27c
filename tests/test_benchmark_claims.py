"""The benchmarks' resumability and verdict helpers (benchmarks/claims): marked sections of
docs/results.md, the seed-spread rule, chunked caches, plateau curves."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from claims import chunks, curves, sections, spread, table4  # noqa: E402


def test_replace_section_keeps_the_rest(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# claims\n\ntable\n")
    sections.replace_section(doc, "reference-run", "first")
    sections.replace_section(doc, "reference-run", "second")
    text = doc.read_text()
    assert text.startswith("# claims\n\ntable\n") and "second" in text and "first" not in text
    sections.write_keeping_sections(doc, "# claims v2\n")
    text = doc.read_text()
    assert text.startswith("# claims v2\n") and "table" not in text
    assert text.count("<!-- reference-run:begin -->") == 1 and "second" in text


def test_spread_rule():
    assert spread.compare([10.0, 12.0], [11.0, 11.5], lower_is_better=True)[1] == "no difference"
    diff, verdict = spread.compare([10.0, 10.5], [8.0, 8.4], lower_is_better=True)
    assert diff == pytest.approx(-2.05) and verdict == "b better"
    assert spread.compare([10.0, 10.5], [8.0, 8.4], lower_is_better=False)[1] == "a better"
    assert spread.compare([1.0], [2.0], lower_is_better=True)[1].startswith("undecided")
    assert spread.fmt([1.0, 3.0]) == "2.00 +- 1.00"


def test_chunked_resumes_at_the_first_missing_chunk(tmp_path):
    calls = []

    def fn(i, j):
        calls.append((i, j))
        return torch.arange(i, j)

    assert chunks.missing(tmp_path, 7, chunk=3) == 7
    assert torch.equal(chunks.chunked(tmp_path, 7, fn, chunk=3), torch.arange(7))
    (tmp_path / "000003-000006.pt").unlink()  # as if interrupted during the second chunk
    assert chunks.missing(tmp_path, 7, chunk=3) == 3
    calls.clear()
    assert torch.equal(chunks.chunked(tmp_path, 7, fn, chunk=3), torch.arange(7))
    assert calls == [(3, 6)]


def test_stats_match_the_unbiased_covariance():
    f = torch.randn(50, 4, dtype=torch.float64)
    s = chunks.stats(f)
    assert torch.allclose(s.mu, f.mean(0)) and s.count == 50
    centred = f - f.mean(0)
    assert torch.allclose(s.sigma, centred.T @ centred / 49)


def test_plateau_reads_the_last_two_values(tmp_path):
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "val/x": 4.0}, {"step": 4, "val/x": 5.0},
            {"step": 4, "val/x": 5.5}]  # a resumed run repeats step 4: the last value counts
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    p = curves.plateau(tmp_path, "val/x")
    assert p["last_two"] == [(2, 4.0), (4, 5.5)] and p["rel_change"] == pytest.approx(0.375)
    assert "rel_change" not in curves.plateau(tmp_path, "missing")


def test_plateau_skips_the_end_of_run_validation_right_after_a_regular_one():
    pts = [[333, 20.0], [666, 22.0], [999, 23.0], [1332, 24.0], [1665, 24.4], [1998, 24.6], [2000, 24.6]]
    p = curves.plateau_of(pts, "val/psnr")  # 1998 -> 2000 would show no change: compare with 1665
    assert p["last_two"] == [(1665, 24.4), (2000, 24.6)] and p["rel_change"] == pytest.approx(0.2 / 24.4)


def _t4_rows(values: dict[str, list[float]]) -> dict[str, list[dict]]:
    labels = {"vq-8x8x1-K256": "VQ 8x8x1, K=256", "vq-8x8x1-K4096": "VQ 8x8x1, K=4096",
              "rq-8x8x4-K256": "RQ 8x8x4, K=256", "vq-16x16x1-K256": "VQ 16x16x1, K=256"}
    return {n: [{"label": labels[n], "rfid": v, "psnr": 30 - v / 10, "ssim": 0.9 - v / 1000} for v in vals]
            for n, vals in values.items()}


def test_table4_verdicts_judge_depth_codebook_and_equal_codes():
    rows = _t4_rows({"vq-8x8x1-K256": [32.0, 32.2], "vq-8x8x1-K4096": [27.3, 29.1],
                     "rq-8x8x4-K256": [22.0, 22.4], "vq-16x16x1-K256": [16.5, 16.1]})
    rfid = next(line for line in table4.verdicts(rows) if line.startswith("- rFID"))
    assert "4096: VQ 8x8x1, K=4096 minus VQ 8x8x1, K=256: -3.90 (VQ 8x8x1, K=4096 better)" in rfid
    assert "codebook: RQ 8x8x4, K=256 minus VQ 8x8x1, K=4096: -6.00 (RQ 8x8x4, K=256 better)" in rfid
    assert "per image: RQ 8x8x4, K=256 minus VQ 16x16x1, K=256: +5.90 (VQ 16x16x1, K=256 better)" in rfid
    close = _t4_rows({"vq-8x8x1-K256": [32.0, 32.2], "vq-8x8x1-K4096": [27.3, 29.1],
                      "rq-8x8x4-K256": [22.0, 22.4], "vq-16x16x1-K256": [22.0, 22.6]})
    assert "equal codes per image: RQ 8x8x4, K=256 minus VQ 16x16x1, K=256: -0.10 (no difference)" in \
        next(line for line in table4.verdicts(close) if line.startswith("- rFID"))
    assert "At equal codes per image RQ 8x8x4, K=256 vs VQ 16x16x1, K=256 by rFID: no difference" in \
        "\n".join(table4.verdicts(close))
    del rows["vq-16x16x1-K256"]
    assert "equal codes" not in "".join(table4.verdicts(rows))


def test_table4_summary_names_the_winner_and_how_sure():
    depth = _t4_rows({"vq-8x8x1-K256": [32.0, 32.2], "vq-8x8x1-K4096": [27.3, 29.1],
                      "rq-8x8x4-K256": [22.0, 22.4], "vq-16x16x1-K256": [16.5, 16.1]})
    text = "\n".join(table4.verdicts(depth))
    assert "**Verdict: depth beats codebook size here**" in text and "rFID 3.3x" in text  # 6.0 / 1.8
    assert "the finer map wins" in text
    codebook = _t4_rows({"vq-8x8x1-K256": [32.0, 32.2], "vq-8x8x1-K4096": [20.0, 20.4],
                         "rq-8x8x4-K256": [26.0, 26.4]})
    assert "**Verdict: codebook size beats depth here**" in "\n".join(table4.verdicts(codebook))
    one = _t4_rows({"vq-8x8x1-K256": [32.0], "vq-8x8x1-K4096": [27.3], "rq-8x8x4-K256": [22.0]})
    text = "\n".join(table4.verdicts(one))
    assert "no clear winner" in text and "one seed, no spread measured" in text
