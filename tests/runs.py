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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.cpp_extension import get_default_build_root

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# A fresh model cache for every test session, so every run proves a cold start (a fixed cache
# once hid a build that only worked when an earlier run had left a complete model behind).
CACHE = Path(tempfile.mkdtemp(prefix="lora_dist_test_cache-"))
atexit.register(shutil.rmtree, CACHE, True)
TEST_MODEL = "tiny"  # the random 1M-parameter LLaMA; a test that wants another passes --model
# The shipped ds_configs/zero3.json trains in bf16, for GPUs. Tests compare runs to 1e-6 and
# bit for bit, which needs fp32: the same config with bf16 off (test_ds_config checks that).
TEST_DS_CONFIG = "tests/configs/zero3_fp32.json"


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
    """ARGS with `--model tiny` and the fp32 test config added unless they name their own."""
    args = [*args] if "--model" in args else [*args, "--model", TEST_MODEL]
    return args if "--ds_config" in args else [*args, "--ds_config", TEST_DS_CONFIG]


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


SMALL_STEPS = 8
# The environment that shrinks slurm/gpt3_wikisql.sh to a CPU smoke run of the trainer's default
# small model, and the trainer flags the script then passes (test_slurm checks the two agree).
# One dev-loss evaluation, no periodic checkpoint and no final generation keep the runs short
# (the generated-SQL evaluation alone takes longer than the 8 steps); a preempted run's only
# checkpoint is then the one written on the signal.
GPT3_SMALL_ENV = {
    "DS_CONFIG": TEST_DS_CONFIG,
    "MODEL_DIR": "tiny",
    "MAX_STEPS": str(SMALL_STEPS),
    "EVAL_EVERY": str(SMALL_STEPS),
    "ACTIVATION_CHECKPOINTING": "0",
    "EXTRA_ARGS": "--skip_task_eval",
}
SMALL_FLAGS = (
    "--ds_config", TEST_DS_CONFIG, "--task", "wikisql", "--model", "tiny",
    "--lora_r", "4", "--lora_alpha", "4", "--lora_targets", "attn", "--resume", "auto",
    "--lr", "2e-4", "--epochs", "2", "--max_steps", str(SMALL_STEPS), "--save_every", "50",
    "--eval_every", str(SMALL_STEPS), "--skip_task_eval",
)  # fmt: skip
# Variables of an enclosing launcher (CI inside a Slurm job or mpirun) that must not leak in.
LAUNCHER_PREFIXES = ("SLURM_", "PMI", "OMPI_", "MV2_", "HYDRA_", "MPI_LOCAL")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")


def launch_env(**extra: str) -> dict[str, str]:
    """tests.runs' training environment without any enclosing launcher's variables.

    Slurm jobs build DeepSpeed's ops in a fresh directory per job unless TORCH_EXTENSIONS_DIR
    is set; on this machine torch's own cache holds the CPU comm op already (a minute to build).
    """
    env = {
        k: v
        for k, v in run_env().items()
        if not k.startswith(LAUNCHER_PREFIXES) and k not in (*LAUNCHER_VARS, "MASTER_PORT")
    }
    env.setdefault("TORCH_EXTENSIONS_DIR", get_default_build_root())
    return {**env, **extra}


@dataclass(frozen=True)
class TrainedRun:
    """A finished run's output directory and what its files say."""

    out: Path

    @property
    def metrics(self) -> dict:
        """metrics.json."""
        return json.loads((self.out / "metrics.json").read_text())

    @property
    def train_losses(self) -> dict[int, float]:
        """step -> mean loss of the steps this process ran (metrics.json)."""
        return {int(step): loss for step, loss in self.metrics["train_losses"]}

    @property
    def logged_losses(self) -> list[tuple[int, float]]:
        """(step, loss) of every line of train_log.jsonl, in order (resumed runs append)."""
        lines = (self.out / "train_log.jsonl").read_text().splitlines()
        return [(row["step"], row["loss"]) for row in map(json.loads, filter(None, lines))]

    @property
    def last_logged_step(self) -> int:
        """The highest step in train_log.jsonl so far; 0 before the first line is written."""
        if not (self.out / "train_log.jsonl").is_file():
            return 0
        return max((step for step, _ in self.logged_losses), default=0)

    def adapter(self) -> dict[str, torch.Tensor]:
        """The final adapter's tensors."""
        return load_file(str(self.out / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(got: TrainedRun, expected: TrainedRun) -> None:
    """Same keys, every tensor within 1e-6: fp32 on CPU repeats itself exactly."""
    a, b = got.adapter(), expected.adapter()
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


def assert_same_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    """Same steps, losses within 1e-6."""
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)
