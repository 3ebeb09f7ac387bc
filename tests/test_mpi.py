"""Rank discovery and process-group setup under a real `mpirun -np 2` (MPICH's Hydra)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")

PROBE = """
import json, sys
import torch
import torch.distributed as dist
from lora_dist.distributed.launch import discover_ranks, init_distributed

found = discover_ranks()
info = init_distributed("gloo")
value = torch.tensor([float(info.rank + 1)])
dist.all_reduce(value)
print(json.dumps({"found": vars(found), "info": vars(info), "sum": value.item(),
                  "torch_rank": dist.get_rank(), "torch_world": dist.get_world_size()}))
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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI", "OMPI_"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [MPIRUN, "-np", "2", sys.executable, str(probe)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["info"]["rank"] for r in results) == [0, 1]
    assert len({r["info"]["master_port"] for r in results}) == 1  # both ranks met on one port
    for r in results:
        assert r["found"]["launcher"] == "mpi"
        # Each discovery agrees on a fresh free port collectively; all else must match.
        assert {**r["found"], "master_port": 0} == {**r["info"], "master_port": 0}
        assert (r["info"]["world_size"], r["torch_world"]) == (2, 2)
        assert r["torch_rank"] == r["info"]["rank"] == r["info"]["local_rank"]
        assert r["sum"] == 1.0 + 2.0


def _train(launch: list[str], out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    args = ["--ds_config", "ds_configs/zero3.json", "--output_dir", str(out), "--max_steps", "3"]
    args += ["--seed", "7", "--lora_r", "4"]
    return subprocess.run(
        [*launch, "launcher/train.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for events in run_dir.rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return series


@pytest.mark.skipif(
    os.environ.get("LORA_DIST_TRAINER_READY") != "1",
    reason="2-rank DeepSpeed training: set LORA_DIST_TRAINER_READY=1",
)
def test_mpirun_training_matches_the_deepspeed_launcher(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI", "OMPI_"))}
    env["PYTHONPATH"] = str(REPO)
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    ds = _train([deepspeed, "--num_gpus", "2"], tmp_path / "ds", env)
    assert ds.returncode == 0, ds.stderr[-3000:]
    mpi = _train([MPIRUN, "-np", "2", sys.executable], tmp_path / "mpi", env)
    assert mpi.returncode == 0, mpi.stderr[-3000:]

    ds_scalars, mpi_scalars = _scalars(tmp_path / "ds"), _scalars(tmp_path / "mpi")
    loss_tags = [t for t in ds_scalars if "loss" in t.lower()]
    assert loss_tags, f"no loss scalars among {sorted(ds_scalars)}"
    for tag in loss_tags:
        assert [s for s, _ in mpi_scalars[tag]] == [s for s, _ in ds_scalars[tag]], tag
        torch.testing.assert_close(
            torch.tensor([v for _, v in mpi_scalars[tag]]),
            torch.tensor([v for _, v in ds_scalars[tag]]),
            msg=tag,
        )
    a = load_file(tmp_path / "ds/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "mpi/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], msg=name)
