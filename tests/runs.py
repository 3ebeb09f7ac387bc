"""Launching real training runs from tests: deepspeed with N CPU ranks, or one plain process."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# A fresh model cache for every test session, so every run proves a cold start (a fixed cache
# once hid a build that only worked when an earlier run had left a complete model behind).
CACHE = Path(tempfile.mkdtemp(prefix="lora_dist_test_cache-"))
atexit.register(shutil.rmtree, CACHE, True)
TEST_MODEL = "tiny"  # the random 1M-parameter LLaMA; a test that wants another passes --model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        LORA_DIST_CACHE=str(CACHE),
        LORA_DIST_NO_PROGRESS="1",
        PATH=f"{BIN}:{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def with_test_model(args: tuple[str, ...] | list[str]) -> list[str]:
    """ARGS with `--model tiny` added unless they name a model."""
    return [*args] if "--model" in args else [*args, "--model", TEST_MODEL]


def train_cmd(ranks: int, *args: str) -> list[str]:
    """`deepspeed --num_gpus N launcher/train.py ARGS` (N CPU ranks over gloo)."""
    launcher = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port())]
    return [*launcher, str(REPO / "launcher" / "train.py"), *with_test_model(args)]


def train(ranks: int, *args: str, check: bool = True, timeout: float = 600):
    """Run a training job to completion; returns the CompletedProcess (output captured)."""
    proc = subprocess.run(
        train_cmd(ranks, *args),
        cwd=REPO,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def start(ranks: int, *args: str) -> subprocess.Popen:
    """Start a training job in its own process group, so a test can signal all of it."""
    return subprocess.Popen(
        train_cmd(ranks, *args),
        cwd=REPO,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(predicate, timeout: float = 300, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(out: Path) -> int:
    path = out / "train_log.jsonl"
    if not path.is_file():
        return 0
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return max((row["step"] for row in lines), default=0)


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def losses(out: Path) -> dict[int, float]:
    return {int(step): loss for step, loss in metrics(out)["train_losses"]}


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))
