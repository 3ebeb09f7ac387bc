"""What a run reports: TensorBoard scalars, rank-0 progress bars, log lines, peak memory.

The training bar's rate and ETA count training steps only: the trainer hands each step's own
duration to `progress`, so time spent evaluating or checkpointing between steps never enters
the s/step or the ETA. Evaluation shows its own bar (`phase`), and ends with one log line.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

Progress = Callable[[int, int], None]
"""progress(done, total): how far a phase has come, in its own units (batches)."""

NO_PROGRESS_ENV = "LORA_DIST_NO_PROGRESS"


@dataclass(frozen=True)
class PeakMemory:
    """The largest memory this rank used since the last `reset_peak_memory()`, in bytes.

    On a GPU: what the CUDA caching allocator handed out (`allocated`) and what it held from
    the driver (`reserved`: what must fit, and what no other process can have). On the CPU both
    are the process's peak resident set size.
    """

    allocated: int
    reserved: int
    kind: str
    """cuda (the allocator's counters) or rss (the process's peak resident set)."""


def _on_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def reset_peak_memory() -> bool:
    """Start a new peak here, so that loading, TP setup and evaluation do not count as training.

    CUDA's counters are per device; on the CPU, writing 5 to /proc/self/clear_refs resets the
    kernel's VmHWM (Linux 4.0 and later). Returns False where the peak could not be reset.
    """
    if _on_cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _rss_peak() -> int:
    """VmHWM of this process; ru_maxrss (never reset) where /proc is not readable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def peak_memory() -> PeakMemory:
    """This rank's peak since the last reset_peak_memory() (or since the process started)."""
    if _on_cuda():
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        return PeakMemory(int(allocated), int(reserved), "cuda")
    rss = _rss_peak()
    return PeakMemory(rss, rss, "rss")


def format_duration(seconds: float) -> str:
    """[H:]MM:SS, as tqdm prints its times."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class StepClock:
    """The mean duration of the training steps seen so far, and what is left at that pace."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.seconds = 0.0
        self.steps = 0

    def add(self, step_seconds: float) -> None:
        self.seconds += step_seconds
        self.steps += 1

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else float("nan")

    def eta(self, step: int) -> float:
        """Seconds until `total_steps`, at the mean pace of the steps seen."""
        return max(self.total_steps - step, 0) * self.seconds_per_step

    def summary(self, step: int) -> str:
        if not self.steps:
            return ""
        return f"{self.seconds_per_step:.2f} s/step, ETA {format_duration(self.eta(step))}"


class Monitor:
    """Rank 0 writes; every other rank's monitor is silent and writes nothing."""

    def __init__(self, output_dir: Path, is_main: bool, total_steps: int) -> None:
        self.is_main = is_main
        self.total_steps = total_steps
        self.clock = StepClock(total_steps)
        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard")) if is_main else None
        self.bar: tqdm | None = None
        self.show_bars = is_main and os.environ.get(NO_PROGRESS_ENV) != "1"

    def start(self, step: int) -> None:
        """Open the training bar at `step` (a resumed run starts past 0)."""
        if self.is_main:
            self.bar = tqdm(
                total=self.total_steps,
                initial=step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                disable=not self.show_bars,
                # tqdm's own rate and ETA would count evaluation time; StepClock's do not.
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}",
            )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def progress(self, step: int, loss: float, tokens_per_s: float, step_seconds: float) -> None:
        """One training step done in `step_seconds` (the step alone, nothing around it)."""
        self.clock.add(step_seconds)
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"{self.clock.summary(step)}, loss={loss:.4f}, tok/s={tokens_per_s:,.0f}",
                refresh=False,
            )
            self.bar.update(step - self.bar.n)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Progress]:
        """A separate bar for work between training steps (evaluation), then one log line."""
        bar: tqdm | None = None
        started = time.perf_counter()
        if self.show_bars:
            bar = tqdm(desc=name, unit="batch", leave=False, dynamic_ncols=True, file=sys.stderr)

        def update(done: int, total: int) -> None:
            if bar is not None:
                bar.total = total
                bar.update(done - bar.n)

        try:
            yield update
        finally:
            if bar is not None:
                bar.close()
            self.log(f"{name}: {time.perf_counter() - started:.1f} s")

    def log(self, message: str) -> None:
        if self.is_main:
            if self.bar is not None:
                self.bar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr, flush=True)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.writer is not None:
            simple = (int, float, str, bool)
            clean = {k: v if isinstance(v, simple) else str(v) for k, v in hparams.items()}
            self.writer.add_hparams(clean, metrics, run_name=".")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
