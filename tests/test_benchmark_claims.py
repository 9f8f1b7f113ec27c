"""The benchmarks' resumability and verdict helpers (benchmarks/claims): marked sections of
docs/results.md, the seed-spread rule, chunked caches, plateau curves."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from claims import chunks, curves, sections, spread  # noqa: E402


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
