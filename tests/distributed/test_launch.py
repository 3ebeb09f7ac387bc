"""discover_ranks on the environments each launcher really sets, and on broken ones."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lora_dist.distributed.launch import (
    SHM_DIR,
    RankDiscoveryError,
    RankInfo,
    bind_device,
    discover_ranks,
    expand_nodelist,
    local_device_index,
)
from tests.runs import BIN, free_port, run_env


def _no_mpi() -> tuple[str, int]:
    raise AssertionError("MPI must not be asked for rank 0's host here")


def discover(env: dict[str, str]) -> RankInfo:
    return discover_ranks(env, hostnames=expand_nodelist, mpi_master=_no_mpi)


# What `sbatch` leaves in the batch shell's environment: inherited by anything it starts.
BATCH_SHELL = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NTASKS": "16",
    "SLURM_TASKS_PER_NODE": "8(x2)",
}


def test_single_process_defaults() -> None:
    info = discover({})
    assert info == RankInfo(0, 1, 0, 1, 0, "127.0.0.1", 29500, "single")


def test_deepspeed_launcher_env_wins_over_batch_shell_slurm_vars() -> None:
    # deepspeed.launcher.launch on node 1 of 2, inside an sbatch job.
    env = {
        **BATCH_SHELL,
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "CROSS_RANK": "1",
        "CROSS_SIZE": "2",
        "LOCAL_SIZE": "8",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": "29500",
    }
    assert discover(env) == RankInfo(9, 16, 1, 8, 1, "gpu07", 29500, "deepspeed")


def test_torchrun_env() -> None:
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
        "TORCHELASTIC_RUN_ID": "abc",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "1234",
    }
    assert discover(env) == RankInfo(5, 8, 1, 4, 1, "10.0.0.1", 1234, "torchrun")


def test_srun_step_env() -> None:
    # Task 13 of `srun --nodes=2 --ntasks-per-node=8`: node 1, local id 5.
    env = {
        **BATCH_SHELL,
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "13",
        "SLURM_LOCALID": "5",
        "SLURM_NODEID": "1",
        "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
    }
    # Port: 10000 + 4242 % 20000.
    assert discover(env) == RankInfo(13, 16, 5, 8, 1, "gpu07", 14242, "slurm")


def test_srun_step_with_uneven_tasks_per_node() -> None:
    env = {
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "6",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "3",
        "SLURM_STEP_NUM_TASKS": "7",
        "SLURM_STEP_TASKS_PER_NODE": "2(x3),1",
        "SLURM_JOB_NODELIST": "n[1-4]",
        "SLURM_JOB_ID": "7",
    }
    info = discover(env)
    assert (info.rank, info.world_size, info.local_world_size, info.node_rank) == (6, 7, 1, 3)


def test_srun_task_wrapper_mapping_is_labelled_slurm() -> None:
    env = {
        "SLURM_STEP_ID": "3",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "0",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "SLURM_JOB_NODELIST": "vm",
        "SLURM_JOB_ID": "12",
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "vm",
        "MASTER_PORT": "10012",
    }
    assert discover(env) == RankInfo(1, 2, 1, 2, 0, "vm", 10012, "slurm")


def test_batch_shell_alone_is_a_single_process() -> None:
    # A plain `python train.py` in the batch script is not rank 0 of SLURM_NTASKS.
    info = discover(dict(BATCH_SHELL))
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "single")


def test_mpich_hydra_env_on_one_node() -> None:
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    info = discover_ranks(env, mpi_master=lambda: ("node-a", 40001))
    # One node: loopback, with the port rank 0 found free (no fixed 29500 to collide on).
    assert info == RankInfo(1, 2, 1, 2, 0, "127.0.0.1", 40001, "mpi")


def test_mpi_keeps_an_exported_master() -> None:
    env = {"PMI_RANK": "0", "PMI_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    assert discover(env) == RankInfo(0, 2, 0, 1, 0, "h", 1234, "mpi")


def test_open_mpi_env_across_nodes_asks_mpi_for_the_master() -> None:
    env = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        "OMPI_COMM_WORLD_NODE_RANK": "1",
    }
    info = discover_ranks(env, hostnames=expand_nodelist, mpi_master=lambda: ("node-a", 40002))
    assert info == RankInfo(5, 8, 1, 4, 1, "node-a", 40002, "mpi")


def test_mpirun_inside_allocation_trusts_mpi_over_the_proxy_step() -> None:
    # Hydra starts one proxy per node with srun; the ranks inherit the proxy's step variables.
    env = {
        **BATCH_SHELL,
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        "PMI_RANK": "3",
        "PMI_SIZE": "4",
        "MPI_LOCALRANKID": "1",
        "MPI_LOCALNRANKS": "2",
    }
    info = discover_ranks(env, hostnames=expand_nodelist, mpi_master=lambda: ("gpu07", 40003))
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (3, 4, 1, "mpi")


def test_srun_with_pmi_agreeing_is_slurm() -> None:
    env = {
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "0",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "SLURM_JOB_NODELIST": "vm",
        "SLURM_JOB_ID": "3",
        "PMI_RANK": "1",
        "PMI_SIZE": "2",
    }
    assert discover(env).launcher == "slurm"


def test_env_round_trip() -> None:
    info = RankInfo(3, 8, 1, 2, 1, "host0", 4321, "torchrun")
    back = discover(info.env())
    assert back == RankInfo(3, 8, 1, 2, 1, "host0", 4321, "env")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "2"}, "RANK missing"),
        ({"RANK": "0"}, "WORLD_SIZE missing"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, "outside 0..1"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x' is not an integer"),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "LOCAL_RANK missing"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "MASTER_ADDR is not set"),
        ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, "at least 1"),
        (
            {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
            "local rank 2 is outside 0..1",
        ),
    ],
)
def test_inconsistent_env_is_explained(env: dict[str, str], message: str) -> None:
    with pytest.raises(RankDiscoveryError, match=message):
        discover(env)


# Task 13 of `srun --nodes=2 --ntasks-per-node=8` again, under each way Slurm hands out GPUs.
TASK_13 = {**BATCH_SHELL, "SLURM_STEP_ID": "0", "SLURM_PROCID": "13", "SLURM_LOCALID": "5"}
TASK_13 |= {"SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}


@pytest.mark.parametrize(
    ("gpu_request", "visible", "ordinal"),
    [
        ("--gres=gpu:8 (every rank sees its node's 8 GPUs)", 8, 5),
        ("--gpus-per-task=1 or --gpu-bind=single:1 (each rank sees only its own GPU)", 1, 0),
        ("--gpus-per-task=2 (each rank sees its own 2 GPUs)", 2, 1),
    ],
)
def test_local_rank_beyond_the_visible_gpus_maps_to_one_the_rank_sees(
    gpu_request: str, visible: int, ordinal: int
) -> None:
    info = discover(TASK_13)
    assert (info.rank, info.local_rank, info.local_world_size) == (13, 5, 8)
    environ = dict(info.env())
    assert bind_device(environ, info, visible) == ordinal < visible, gpu_request
    # DeepSpeed (engine, zero.Init, NCCL's device_id) reads LOCAL_RANK as the device ordinal.
    assert environ["LOCAL_RANK"] == str(ordinal)
    assert info.local_rank == 5  # the layout itself is unchanged


def test_every_local_rank_gets_an_ordinal_it_can_see() -> None:
    for visible in (1, 2, 4, 8):
        for local_rank in range(8):
            ordinal = local_device_index(local_rank, visible)
            assert 0 <= ordinal < visible
            if local_rank < visible:  # a rank that sees the whole node keeps its own GPU
                assert ordinal == local_rank
    with pytest.raises(RankDiscoveryError, match="sees no accelerator"):
        local_device_index(0, 0)


NODELISTS = ["vm", "gpu[07-10],login1", "n[1-2]x[3,5]", "a[008-010,012]", "x1,y[1-2]"]


@pytest.mark.slurm
@pytest.mark.parametrize("nodelist", NODELISTS)
def test_expand_nodelist_matches_scontrol(slurm_cluster, nodelist: str) -> None:
    done = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist],
        env=slurm_cluster.env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert expand_nodelist(nodelist) == done.stdout.split()


# DeepSpeed's CPU comm op leaves a /dev/shm all-reduce buffer per rank behind unless unlinked.
SHM_PROBE = """
import json, os, sys
import torch
import deepspeed
from deepspeed import comm
from lora_dist.distributed.launch import release_shm_workspace, shm_workspace_path

deepspeed.init_distributed()
rank = comm.get_rank()
mine = shm_workspace_path(rank)
existed = mine.exists()
released = release_shm_workspace()
x = torch.full((4096,), float(rank + 1))
comm.inference_all_reduce(x)  # the shm kernel still works on the unlinked mappings
record = {"existed": existed, "released": str(released), "mine": str(mine),
          "after": mine.exists(), "sum": x.unique().tolist()}
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(record, f)
"""


@pytest.mark.multirank
def test_deepspeed_shm_buffers_are_released_and_comm_still_works(tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(SHM_PROBE)
    port = free_port()
    done = subprocess.run(
        [
            *[str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)],
            "--no_local_rank",
            str(tmp_path / "probe.py"),
            str(tmp_path),
        ],
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        rec = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # The path we compute is the one DeepSpeed created, and it is gone once released.
        assert rec["existed"] and rec["released"] == rec["mine"] and not rec["after"]
        assert str(port) in rec["mine"] and rec["mine"].endswith(f"_{rank}")
        assert rec["sum"] == [3.0]
    assert not list(SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
