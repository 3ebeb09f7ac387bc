"""What a run reports: TensorBoard scalars, a rank-0 progress bar, peak memory."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def peak_memory_bytes() -> int:
    """CUDA max-allocated bytes on a GPU; the process's peak resident set size otherwise."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def memory_kind() -> str:
    return "cuda_max_allocated" if torch.cuda.is_available() else "peak_rss"


class Monitor:
    """Rank 0 writes; every other rank's monitor is silent and writes nothing."""

    def __init__(self, output_dir: Path, is_main: bool, total_steps: int, start_step: int = 0):
        self.is_main = is_main
        self.writer = None
        self.bar = None
        if not is_main:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=os.environ.get("LORA_DIST_NO_PROGRESS") == "1",
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")

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
