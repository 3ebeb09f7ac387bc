"""Host memory: stop glibc from keeping freed ZeRO-3 buffers resident.

glibc serves allocations above its mmap threshold with mmap, starting at 128 KiB, and raises the
threshold to the size of every mmapped block that is freed (up to 32 MiB). ZeRO-3 allocates and
frees each layer's gathered weights on every step, so after the first step those buffers come
from the heap instead, where they fragment and stay resident. On the 551M benchmark that was most
of LoRA's peak (benchmarks/README.md). A fixed threshold stops the raising; it costs a page-fault
pass over each buffer when it is mapped again, which on CPU-only ranks makes steps slower.
Tensors on a GPU are not allocated by malloc and are not affected.

Everything here is a no-op where glibc is absent, and MALLOC_MMAP_THRESHOLD_ in the environment
(which glibc applies itself at startup) always wins.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

MMAP_THRESHOLD = 4 * 2**20  # the trainer's default (--host_mmap_threshold)
LOADING_THRESHOLD = 2**20  # while loading, when every weight passes through whole once
GLIBC_CEILING = 32 * 2**20  # where glibc's dynamic threshold stops rising (64-bit)
ENV = "MALLOC_MMAP_THRESHOLD_"
_M_MMAP_THRESHOLD = -3  # mallopt parameter, from <malloc.h>
_pinned: int | None = None  # what pin_mmap_threshold set, restored after loading


def _libc() -> ctypes.CDLL | None:
    if ENV in os.environ:
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> int | None:
    """Serve host allocations of `nbytes` or more with mmap, at a threshold glibc will not raise.

    Returns the threshold set, or None where nothing was changed: not glibc, or
    MALLOC_MMAP_THRESHOLD_ is set, or `nbytes` is 0 (keep glibc's dynamic default).
    """
    global _pinned
    libc = _libc()
    if nbytes <= 0 or libc is None or libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)) != 1:
        return None
    _pinned = int(nbytes)
    return _pinned


@contextlib.contextmanager
def returning_freed_host_memory() -> Iterator[None]:
    """Inside the block, blocks of 1 MiB and up are mmapped; afterwards the heap is trimmed.

    Building under zero.Init allocates every weight whole and frees it once partitioned, and
    each gather allocates and frees a whole tensor: a 220 MB fp32 model grew RSS by ~480 MB on
    one rank with glibc's default and by ~270 MB with this. On exit the threshold goes back to
    what pin_mmap_threshold set, or to glibc's 32 MiB ceiling when nothing was pinned.
    """
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, LOADING_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _pinned or GLIBC_CEILING)
        libc.malloc_trim(0)
