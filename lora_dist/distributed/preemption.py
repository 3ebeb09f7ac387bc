"""Stopping at a step boundary when the scheduler asks: SIGTERM or SIGUSR1, agreed by all ranks.

Slurm sends SIGUSR1 (with --signal) before a time limit and SIGTERM on preemption or scancel.
A handler only raises a flag; at the next step boundary the ranks all-reduce it, so every rank
stops at the same step even if the signal reached only some of them.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch:
    """Remembers a stop signal; `should_stop()` is a collective every rank must call together."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = device
        self.received: int | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def close(self) -> None:
        """Ignore SIGUSR1 from now on: the request to stop has been honoured (or the run is over).

        CPython resets Python-level handlers to the default action while the interpreter shuts
        down, and SIGUSR1's default kills the process. A repeated request arriving then (the batch
        shell's forwarded copy after `scancel --signal=USR1 --full`, an impatient second scancel)
        would turn a clean exit 75 into "killed by signal", which the Slurm scripts count as a
        crash. SIGTERM keeps its handler: during teardown it still means "die now".
        """
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a peer rank"
