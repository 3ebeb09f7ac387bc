"""Stopping on a scheduler's signal: a clean exit 75 survives repeated requests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.runs import run_env

SIGNAL_PROBE = """
import os, signal, subprocess, sys, time
from lora_dist.distributed.preemption import PreemptionWatch

watch = PreemptionWatch()
# A stream of repeated stop requests, still arriving while the interpreter shuts down.
cmd = f"while kill -USR1 {os.getpid()} 2>/dev/null; do :; done"
subprocess.Popen(["bash", "-c", cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while watch.received is None:
    time.sleep(0.001)
watch.close()
assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
sys.exit(75)
"""


def test_a_repeated_usr1_cannot_turn_a_clean_preemption_exit_into_a_crash(tmp_path: Path) -> None:
    # Without close(), CPython restores SIGUSR1's default action during shutdown and a late
    # request kills the rank (exit -10), which the Slurm scripts would count as a crash.
    (tmp_path / "probe.py").write_text(SIGNAL_PROBE)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "probe.py")], env=run_env(), capture_output=True, timeout=60
    )
    assert done.returncode == 75, done.stderr[-2000:]
