"""Shared fixtures: a local Slurm cluster, and one uninterrupted 2-rank run to match launchers."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.runs import REPO, SMALL_FLAGS, TrainedRun, launch_env, train_cmd
from tests.slurm_cluster import ClusterUnavailable, SlurmCluster, local_cluster


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
