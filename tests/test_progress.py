"""Progress output: plain lines (no carriage-return frames) when stderr is not a terminal."""

import io

from rqvae.eval.batches import progress_bar
from rqvae.progress import PlainProgress, progress_iter


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_lines_every_interval_and_at_the_end(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("rqvae.progress.time.perf_counter", clock)
    out = io.StringIO()
    bar = PlainProgress(total=10, initial=0, desc="reference stats", stream=out, interval=30.0, unit="batch")
    for _ in range(10):
        clock.t += 7.0  # a line after every 5th update (35 s >= 30 s), and one at close
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == ["reference stats batch 5/10 0.143 it/s", "reference stats batch 10/10 0.143 it/s"]
    assert "\r" not in out.getvalue()


def test_iterables_keep_their_items_and_write_no_bar_frames_in_a_log(capsys):
    assert list(progress_iter(range(7), 7, "x")) == list(range(7))
    assert list(progress_bar(iter(range(3)), 3, "y", enabled=True)) == [0, 1, 2]
    err = capsys.readouterr().err  # pytest's captured stderr is not a terminal
    assert "\r" not in err and err.count("\n") == 2  # one closing line each
    assert list(progress_bar(iter(range(3)), 3, "z", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
