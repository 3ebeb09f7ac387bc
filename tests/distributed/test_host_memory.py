"""The trainer's fixed glibc mmap threshold: freed gather-sized buffers leave the heap."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.runs import run_env

# In a fresh process: free one 8 MiB tensor (glibc's default then raises its mmap threshold past
# 8 MiB), allocate another, and report whether it was mmapped (mallinfo2's hblkhd grows).
PROBE = """
import ctypes, json, sys
import torch
from lora_dist.distributed.host_memory import (
    MMAP_THRESHOLD, pin_mmap_threshold, returning_freed_host_memory,
)

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in FIELDS.split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
pinned = pin_mmap_threshold(int(sys.argv[1]))
if sys.argv[2:] == ["load"]:  # the streamed loader's block must give the pinned value back
    with returning_freed_host_memory():
        torch.empty(3 * MMAP_THRESHOLD, dtype=torch.uint8)
size = 2 * MMAP_THRESHOLD
first = torch.empty(size, dtype=torch.uint8)
del first
before = libc.mallinfo2().hblkhd
second = torch.empty(size, dtype=torch.uint8)
print(json.dumps({"pinned": pinned, "mmapped": libc.mallinfo2().hblkhd - before >= size}))
"""


def _probe(threshold: int, *args: str, **env: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(threshold), *args],
        env=run_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_fixed_threshold_keeps_large_buffers_off_the_heap() -> None:
    from lora_dist.distributed.host_memory import MMAP_THRESHOLD

    assert _probe(MMAP_THRESHOLD) == {"pinned": MMAP_THRESHOLD, "mmapped": True}
    assert _probe(MMAP_THRESHOLD, "load") == {"pinned": MMAP_THRESHOLD, "mmapped": True}
    # glibc's default: the freed block raised the threshold, the next one comes from the heap.
    assert _probe(0) == {"pinned": None, "mmapped": False}
    # The user's MALLOC_MMAP_THRESHOLD_ wins and is left alone (32 MiB: 8 MiB stays on the heap).
    assert _probe(MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_=str(32 * 2**20)) == {
        "pinned": None,
        "mmapped": False,
    }
