"""What a run shows: the bar's rate and ETA count training steps only; evaluation has its own."""

from __future__ import annotations

import mmap
import time
from pathlib import Path

import pytest

from lora_dist.training.monitor import (
    Monitor,
    StepClock,
    format_duration,
    peak_memory,
    reset_peak_memory,
)


def test_step_clock_is_the_mean_step_and_what_is_left() -> None:
    clock = StepClock(total_steps=10)
    for seconds in (1.0, 2.0, 3.0):
        clock.add(seconds)
    assert clock.seconds_per_step == 2.0
    assert clock.eta(3) == 14.0 and clock.eta(12) == 0.0
    assert clock.summary(3) == "2.00 s/step, ETA 00:14"
    assert format_duration(3725) == "1:02:05"


def test_evaluation_time_does_not_enter_the_rate_or_the_eta(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORA_DIST_NO_PROGRESS", raising=False)
    monitor = Monitor(tmp_path, is_main=True, total_steps=6)
    monitor.start(0)
    # Steps reported as 2 s each, in a test that takes a fraction of a second in all: a rate
    # from wall time would be far from 2 s/step, and one including the evaluation would differ.
    monitor.progress(1, loss=2.0, tokens_per_s=100.0, step_seconds=2.0)
    with monitor.phase("dev loss at step 1") as progress:
        for done in range(1, 4):
            time.sleep(0.1)
            progress(done, 3)
    monitor.progress(2, loss=1.5, tokens_per_s=100.0, step_seconds=2.0)
    monitor.close()
    err = capsys.readouterr().err
    assert "2/6, 2.00 s/step, ETA 00:08, loss=1.5000" in err
    assert "dev loss at step 1: 100%" in err and "| 3/3 [" in err  # its own bar
    assert "dev loss at step 1: 0.3 s" in err  # and its own closing line


def test_other_ranks_and_disabled_bars_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    silent = Monitor(tmp_path / "r1", is_main=False, total_steps=3)
    silent.start(0)
    silent.progress(1, 1.0, 1.0, 0.5)
    with silent.phase("dev loss") as progress:
        progress(1, 1)
    silent.log("hello")
    silent.close()
    assert capsys.readouterr().err == "" and not (tmp_path / "r1").exists()
    monkeypatch.setenv("LORA_DIST_NO_PROGRESS", "1")
    quiet = Monitor(tmp_path / "r0", is_main=True, total_steps=3)
    quiet.start(0)
    quiet.progress(1, 1.0, 1.0, 0.5)
    with quiet.phase("dev loss") as progress:
        progress(1, 1)
    quiet.close()
    assert capsys.readouterr().err.splitlines() == ["dev loss: 0.0 s"]  # lines, never bars


def touched_pages(size: int) -> mmap.mmap:
    """`size` bytes of new anonymous memory, every page written (so resident)."""
    pages = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        pages[offset] = 1
    return pages


def test_peak_memory_after_a_reset_leaves_out_what_came_before() -> None:
    # A 256 MiB spike (as loading or TP setup makes), freed, then a reset: the peak reported
    # afterwards is the later, smaller use, not the spike. The spike is fresh anonymous pages
    # (mmap, every page touched) on top of a reset peak, so neither memory this process freed
    # earlier nor an earlier test's higher peak can hide it.
    spike = 256 * 2**20
    assert reset_peak_memory()
    before = peak_memory()
    buf = touched_pages(spike)
    assert peak_memory().allocated >= before.allocated + spike * 0.9
    buf.close()
    assert reset_peak_memory()
    after = peak_memory()
    small = touched_pages(16 * 2**20)
    later = peak_memory()
    small.close()
    assert later.allocated < after.allocated + spike / 2
    assert later.kind == "rss" and later.reserved == later.allocated
