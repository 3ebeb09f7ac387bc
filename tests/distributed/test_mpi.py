"""Rank discovery and process-group setup under a real `mpirun -np 2` (MPICH's Hydra)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runs import (
    SMALL_FLAGS,
    SMALL_STEPS,
    TrainedRun,
    assert_same_adapter,
    assert_same_losses,
    launch_env,
)

REPO = Path(__file__).resolve().parents[2]
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")

PROBE = """
import json, os, sys
import torch
import torch.distributed as dist
from lora_dist.distributed.launch import discover_ranks, init_distributed

found = discover_ranks()
info = init_distributed("gloo")
value = torch.tensor([float(info.rank + 1)])
dist.all_reduce(value)
# One file per rank: two ranks printing to one pipe can interleave on a line.
with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:
    json.dump({"found": vars(found), "info": vars(info), "sum": value.item(),
               "torch_rank": dist.get_rank(), "torch_world": dist.get_world_size()}, f)
dist.destroy_process_group()
"""

pytestmark = [
    pytest.mark.multirank,
    pytest.mark.skipif(MPIRUN is None, reason="no mpirun: pip install mpich"),
]


def test_mpirun_two_ranks_discover_and_all_reduce(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    # A clean environment: no launcher variables leaking in from whoever runs pytest.
    done = subprocess.run(
        [MPIRUN, "-np", "2", sys.executable, str(probe), str(tmp_path)],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["info"]["rank"] for r in results) == [0, 1]
    assert len({r["info"]["master_port"] for r in results}) == 1  # both ranks met on one port
    for r in results:
        assert r["found"]["launcher"] == "mpi"
        # Each discovery agrees on a fresh free port collectively; all else must match.
        assert {**r["found"], "master_port": 0} == {**r["info"], "master_port": 0}
        assert (r["info"]["world_size"], r["torch_world"]) == (2, 2)
        assert r["torch_rank"] == r["info"]["rank"] == r["info"]["local_rank"]
        assert r["sum"] == 1.0 + 2.0


def test_mpirun_training_matches_the_deepspeed_launcher(
    reference_run: TrainedRun, tmp_path: Path
) -> None:
    # No MASTER_PORT: under mpirun the ranks agree on a free one over MPI (see launch.py).
    out = tmp_path / "mpi"
    mpirun = [MPIRUN, "-np", "2", sys.executable, "launcher/train.py"]
    done = subprocess.run(
        [*mpirun, *SMALL_FLAGS, "--output_dir", str(out)],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    mpi = TrainedRun(out)
    assert mpi.metrics["world_size"] == 2
    assert_same_losses(mpi.train_losses, reference_run.train_losses)
    assert sorted(mpi.train_losses) == list(range(1, SMALL_STEPS + 1))
    assert_same_adapter(mpi, reference_run)
