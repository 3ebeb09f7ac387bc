"""Small collectives: a unanimous "all done" vote, gathering to rank 0, broadcasts and sums, and
letting each node's first rank go first.

All of them work over the default process group on whatever backend DeepSpeed chose (gloo on CPU,
NCCL on GPU), and degrade to local no-ops in a single process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator


def is_distributed() -> bool:
    """True when a process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    # NCCL only reduces tensors on this rank's GPU; gloo wants the CPU. The accelerator knows.
    return torch.device(get_accelerator().current_device_name())


def all_done_fn() -> Callable[[bool], bool]:
    """A function mapping this rank's done flag to "every rank is done" (an all-reduce MIN).

    Every rank must call it the same number of times, as with any collective.
    """
    if not is_distributed():
        return lambda local_done: local_done
    device = _device()

    def all_done(local_done: bool) -> bool:
        flag = torch.tensor([1 if local_done else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    return all_done


def gather_objects_to_main(obj: Any) -> list[Any] | None:
    """Every rank's picklable `obj`, in rank order, on rank 0; None on the other ranks.

    In a single process the result is `[obj]`.
    """
    if not is_distributed():
        return [obj]
    rank = dist.get_rank()
    out: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank; the object itself in a single process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if is_distributed():
        dist.barrier()


def is_main_process() -> bool:
    """True on rank 0, and in a single process."""
    return not is_distributed() or dist.get_rank() == 0


def all_reduce_sum(values: list[float], device: torch.device | str) -> list[float]:
    """The element-wise sum of `values` over every rank, in float64; the values themselves in
    a single process."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t)
    return t.tolist()


@contextlib.contextmanager
def node_main_first(local_rank: int) -> Iterator[None]:
    """Run the block on every node's local rank 0 first, then on the other ranks.

    For work whose result the others can reuse from disk, such as tokenizing into the
    `datasets` cache. Every rank must enter it. If the block fails on local rank 0, the others
    are still released, run it themselves and fail the same way, rather than wait forever.
    """
    if local_rank != 0:
        barrier()
    try:
        yield
    finally:
        if local_rank == 0:
            barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over every rank in place (it must be on this rank's accelerator device);
    returns it. Nothing is read back to the host: the caller decides when to wait."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor
