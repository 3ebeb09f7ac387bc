"""Shared fixtures: a local Slurm cluster, and one uninterrupted 2-rank run to match launchers."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.runs import REPO, run_env, train_cmd
from tests.slurm_cluster import ClusterUnavailable, SlurmCluster, local_cluster

SMALL_STEPS = 8
# The environment that shrinks slurm/gpt3_wikisql.sh to a CPU smoke run of the trainer's default
# small model, and the trainer flags the script then passes (test_slurm checks the two agree).
# One dev-loss evaluation, no periodic checkpoint and no final generation keep the runs short
# (the generated-SQL evaluation alone takes longer than the 8 steps); a preempted run's only
# checkpoint is then the one written on the signal.
GPT3_SMALL_ENV = {
    "DS_CONFIG": "ds_configs/zero3.json",
    "MODEL_DIR": "tiny",
    "MAX_STEPS": str(SMALL_STEPS),
    "EVAL_EVERY": str(SMALL_STEPS),
    "ACTIVATION_CHECKPOINTING": "0",
    "EXTRA_ARGS": "--skip_task_eval",
}
SMALL_FLAGS = (
    "--ds_config", "ds_configs/zero3.json", "--task", "wikisql", "--model", "tiny",
    "--lora_r", "4", "--lora_alpha", "4", "--lora_targets", "attn", "--resume", "auto",
    "--lr", "2e-4", "--epochs", "2", "--max_steps", str(SMALL_STEPS), "--save_every", "50",
    "--eval_every", str(SMALL_STEPS), "--skip_task_eval",
)  # fmt: skip
# Variables of an enclosing launcher (CI inside a Slurm job or mpirun) that must not leak in.
LAUNCHER_PREFIXES = ("SLURM_", "PMI", "OMPI_", "MV2_", "HYDRA_", "MPI_LOCAL")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")


def launch_env(**extra: str) -> dict[str, str]:
    """tests.runs' training environment without any enclosing launcher's variables."""
    env = {
        k: v
        for k, v in run_env().items()
        if not k.startswith(LAUNCHER_PREFIXES) and k not in (*LAUNCHER_VARS, "MASTER_PORT")
    }
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

    def adapter(self) -> dict:
        """The final adapter's tensors."""
        from safetensors.torch import load_file

        return load_file(self.out / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(got: TrainedRun, expected: TrainedRun) -> None:
    """Same keys, every tensor within 1e-6: fp32 on CPU repeats itself exactly."""
    import torch

    a, b = got.adapter(), expected.adapter()
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)


def assert_same_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    """Same steps, losses within 1e-6."""
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One cluster for the whole session: starting one takes a few seconds."""
    try:
        with local_cluster() as cluster:
            yield cluster
    except ClusterUnavailable as err:
        if os.environ.get("CI"):  # CI runs as root with apt: a missing cluster is a failure there
            pytest.fail(f"no local Slurm cluster on CI: {err}")
        pytest.skip(f"no local Slurm cluster (needs root and apt-get): {err}")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """`deepspeed --num_gpus 2` with SMALL_FLAGS, never interrupted: what srun, mpirun and a
    preempted-and-requeued job must reproduce. Trained once per session."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = subprocess.run(
        train_cmd(2, *SMALL_FLAGS, "--output_dir", str(out)),
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return TrainedRun(out)
