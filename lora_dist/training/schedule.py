"""Deterministic data order and the learning-rate schedule, both functions of the step alone.

Because the samples of step s depend only on (seed, s, dataset size, global batch), a run
resumed at step s reads exactly what an uninterrupted run would, whatever the world size. A step
is an applied optimizer update: one the fp16 loss scaler skips is tried again on the same batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from lora_dist.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class DataOrder:
    """Which dataset indices form each global batch: a fresh permutation every epoch."""

    num_samples: int
    global_batch: int
    seed: int

    def __post_init__(self) -> None:
        if self.num_samples < self.global_batch:
            raise ConfigError(
                f"the training split has {self.num_samples} examples, fewer than one global "
                f"batch of {self.global_batch}; lower train_batch_size or add data"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch  # the incomplete last batch is dropped

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_indices(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.num_samples, generator=gen)
        start = within * self.global_batch
        return perm[start : start + self.global_batch].tolist()

    def rank_micro_batches(
        self, step: int, dp_rank: int, dp: int, micro_batch: int
    ) -> list[list[int]]:
        """This data-parallel rank's share of step `step`, split into micro-batches."""
        indices = self.global_indices(step)
        per_rank = len(indices) // dp
        mine = indices[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        return [mine[i : i + micro_batch] for i in range(0, per_rank, micro_batch)]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Linear warmup to 1, then linear or cosine decay to 0 at `total_steps` (or constant)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"unknown lr schedule {kind!r}; use linear, cosine or constant")


# fp16's dynamic loss scale halves on every overflow: 2^32 falls to 1 in 32 skipped steps.
MAX_SKIPPED_IN_A_ROW = 32


def step_until_applied(
    run_step: Callable[[], T], applied: Callable[[], bool], max_skipped: int
) -> tuple[T, int]:
    """Run one optimizer step until the optimizer applies it; returns its result and the
    number of tries the optimizer skipped.

    Under fp16 DeepSpeed skips the update when the gradients overflowed and lowers the loss
    scale. Counting that as a step would end the run short of its updates and let the step
    count, the LR schedule (which DeepSpeed does not advance on a skip) and Adam's step count
    drift apart. The same batch is tried again instead, so step N always means N updates on
    the batches of steps 0..N-1.
    """
    for skipped in range(max_skipped + 1):
        result = run_step()
        if applied():
            return result, skipped
    raise RuntimeError(
        f"the optimizer skipped {max_skipped + 1} tries of one step in a row (gradient "
        "overflow at every loss scale): the loss has diverged or the fp16 settings are wrong"
    )
