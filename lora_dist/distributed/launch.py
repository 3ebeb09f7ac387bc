"""Rank discovery for every launcher we support, and the one call that joins the process group.

Precedence of `discover_ranks` (first match wins), and why:

1. ``RANK`` + ``WORLD_SIZE`` (+ ``LOCAL_RANK``) already in the environment. The deepspeed
   launcher, torchrun, and ``slurm/srun_task.sh`` all set them, and they are the innermost
   launcher's word: a ``deepspeed`` run inside an ``sbatch`` job still carries the batch shell's
   ``SLURM_PROCID=0``/``SLURM_NTASKS``, which must not win.
2. A Slurm job *step* (``SLURM_STEP_ID`` and ``SLURM_PROCID`` set): one process per ``srun``
   task. The batch shell itself has ``SLURM_PROCID``/``SLURM_NTASKS`` but no ``SLURM_STEP_ID``, so
   a plain ``python`` in the batch script is a single process, not rank 0 of N. When MPI
   variables are also present and disagree (``mpirun`` inside an allocation starts its ranks
   under one proxy task per node), MPI is the innermost launcher and wins.
3. MPI: Open MPI's ``OMPI_COMM_WORLD_*``, MPICH/Intel Hydra's ``PMI_RANK``/``PMI_SIZE``,
   MVAPICH's ``MV2_COMM_WORLD_*``; else mpi4py, but only when a PMIx/PMI launcher left a trace
   (``PMIX_RANK``, ``PMI_FD``), because importing mpi4py outside mpirun starts a singleton MPI.
4. A single process.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

logger = logging.getLogger(__name__)

DEFAULT_PORT = 29500  # torch.distributed's and DeepSpeed's default
LAUNCHERS = ("deepspeed", "torchrun", "slurm", "mpi", "env", "single")


class RankDiscoveryError(RuntimeError):
    """The environment describes an inconsistent or incomplete process layout."""


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job, and how ranks find each other."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    launcher: str  # one of LAUNCHERS; "env" means RANK/WORLD_SIZE set by an unknown launcher

    def env(self) -> dict[str, str]:
        """The torch.distributed env:// variables for this layout."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def _int(environ: Mapping[str, str], name: str) -> int:
    raw = environ[name]
    try:
        return int(raw)
    except ValueError:
        raise RankDiscoveryError(f"{name}={raw!r} is not an integer") from None


def _first_int(environ: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if environ.get(name, "") != "":
            return _int(environ, name)
    return None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist ("gpu[01-03,07],login1") like `scontrol show hostnames` does."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        parts = re.split(r"\[([^\]]*)\]", item)
        expanded = [""]
        for i, part in enumerate(parts):
            if i % 2 == 0:
                expanded = [e + part for e in expanded]
                continue
            choices: list[str] = []
            for rng in part.split(","):
                lo, _, hi = rng.partition("-")
                if not hi:
                    choices.append(lo)
                    continue
                width = len(lo)  # zero padding is kept: node[08-10] -> node08 node09 node10
                choices += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
            expanded = [e + c for e in expanded for c in choices]
        hosts += expanded
    return hosts


def slurm_hostnames(nodelist: str) -> list[str]:
    """Hosts of a Slurm nodelist, asking `scontrol` (the authority) when it is installed."""
    if shutil.which("scontrol"):
        done = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
        )
        if done.returncode == 0 and done.stdout.split():
            return done.stdout.split()
    return expand_nodelist(nodelist)


def _tasks_on_node(tasks_per_node: str, node_index: int) -> int | None:
    """Entry `node_index` of a Slurm tasks-per-node string such as "8(x2),4"."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_index] if node_index < len(counts) else None


def _check(rank: int, world_size: int, local_rank: int, local_world_size: int, source: str) -> None:
    if world_size < 1:
        raise RankDiscoveryError(f"{source}: world size {world_size} must be at least 1")
    if not 0 <= rank < world_size:
        raise RankDiscoveryError(f"{source}: rank {rank} is outside 0..{world_size - 1}")
    if not 0 <= local_rank < local_world_size:
        raise RankDiscoveryError(
            f"{source}: local rank {local_rank} is outside 0..{local_world_size - 1}"
        )


def _from_explicit(environ: Mapping[str, str]) -> tuple[int, int, int, int, int, str]:
    missing = [v for v in ("RANK", "WORLD_SIZE") if environ.get(v, "") == ""]
    if missing:
        present = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if v not in missing]
        raise RankDiscoveryError(
            f"{', '.join(present)} set but {', '.join(missing)} missing: a launcher sets all of "
            "RANK, WORLD_SIZE and LOCAL_RANK; set the missing ones or unset the others"
        )
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    # deepspeed's launcher sets CROSS_RANK/LOCAL_SIZE, torchrun GROUP_RANK/LOCAL_WORLD_SIZE.
    if "CROSS_RANK" in environ or "LOCAL_SIZE" in environ:
        launcher = "deepspeed"
    elif "TORCHELASTIC_RUN_ID" in environ or "GROUP_RANK" in environ:
        launcher = "torchrun"
    elif environ.get("SLURM_PROCID") == str(rank) and "SLURM_STEP_ID" in environ:
        launcher = "slurm"
    else:
        launcher = "env"
    local = _first_int(environ, "LOCAL_RANK")
    if local is None:
        if world != 1:
            raise RankDiscoveryError(
                f"RANK and WORLD_SIZE={world} set but LOCAL_RANK missing: set LOCAL_RANK to this "
                "process's index on its node (it picks the GPU)"
            )
        local = 0
    local_world = _first_int(environ, "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    node = _first_int(environ, "GROUP_RANK", "CROSS_RANK", "NODE_RANK")
    if local_world is None and "SLURM_STEP_ID" in environ:
        local_world = _from_slurm(environ)[3]
        node = _first_int(environ, "SLURM_NODEID") if node is None else node
    if local_world is None:
        local_world = world  # nothing says otherwise: assume one node
    if node is None:
        node = rank // max(local_world, 1)
    return rank, world, local, local_world, node, launcher


def _from_slurm(environ: Mapping[str, str]) -> tuple[int, int, int, int, int, str]:
    rank = _int(environ, "SLURM_PROCID")
    world = _first_int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if world is None:
        raise RankDiscoveryError("SLURM_PROCID set but SLURM_NTASKS missing")
    local = _first_int(environ, "SLURM_LOCALID") or 0
    node = _first_int(environ, "SLURM_NODEID") or 0
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "")
    local_world = _tasks_on_node(per_node, node) if per_node else None
    return rank, world, local, local_world or local + 1, node, "slurm"


def _from_mpi_env(environ: Mapping[str, str]) -> tuple[int, int, int, int, int, str] | None:
    for prefix in ("OMPI_COMM_WORLD_", "MV2_COMM_WORLD_"):
        if f"{prefix}RANK" in environ and f"{prefix}SIZE" in environ:
            rank, world = _int(environ, f"{prefix}RANK"), _int(environ, f"{prefix}SIZE")
            local = _first_int(environ, f"{prefix}LOCAL_RANK") or 0
            local_world = _first_int(environ, f"{prefix}LOCAL_SIZE") or local + 1
            node = _first_int(environ, "OMPI_COMM_WORLD_NODE_RANK")
            return (
                rank,
                world,
                local,
                local_world,
                rank // max(local_world, 1) if node is None else node,
                "mpi",
            )
    if "PMI_RANK" in environ and "PMI_SIZE" in environ:
        rank, world = _int(environ, "PMI_RANK"), _int(environ, "PMI_SIZE")
        # Hydra (MPICH, Intel MPI) exports the node-local layout under these names.
        local = _first_int(environ, "MPI_LOCALRANKID") or 0
        local_world = _first_int(environ, "MPI_LOCALNRANKS") or local + 1
        return rank, world, local, local_world, rank // max(local_world, 1), "mpi"
    return None


def _from_mpi4py() -> tuple[int, int, int, int, int, str]:
    # Imported here only: importing mpi4py outside mpirun starts a singleton MPI.
    from mpi4py import MPI

    world_comm = MPI.COMM_WORLD
    node_comm = world_comm.Split_type(MPI.COMM_TYPE_SHARED)
    local, local_world = node_comm.Get_rank(), node_comm.Get_size()
    rank, world = world_comm.Get_rank(), world_comm.Get_size()
    return rank, world, local, local_world, rank // local_world, "mpi"


def _mpi_master() -> tuple[str, int]:
    """Rank 0's hostname and a port free there, broadcast over MPI: mpirun exports neither.

    A fixed default port would collide with other jobs on the same node (29500 is everyone's).
    """
    try:
        from mpi4py import MPI
    except ImportError:
        return "127.0.0.1", DEFAULT_PORT
    comm = MPI.COMM_WORLD
    choice = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            choice = (socket.gethostname(), int(s.getsockname()[1]))
    return comm.bcast(choice, root=0)


def discover_ranks(
    environ: Mapping[str, str] = os.environ,
    *,
    hostnames: Callable[[str], list[str]] = slurm_hostnames,
    mpi_master: Callable[[], tuple[str, int]] = _mpi_master,
) -> RankInfo:
    """Work out this process's rank layout from its environment (see the module docstring).

    `hostnames` expands a Slurm nodelist and `mpi_master` agrees on rank 0's host and a free port
    under MPI (collectively: every rank must call it); both are parameters so the function stays
    pure when given pure stand-ins.
    """
    slurm_step = "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ
    if environ.get("RANK", "") != "" or environ.get("WORLD_SIZE", "") != "":
        layout = _from_explicit(environ)
    elif slurm_step:
        layout = _from_slurm(environ)
        mpi = _from_mpi_env(environ)
        if mpi is not None and mpi[:2] != layout[:2]:
            layout = mpi
    elif (mpi := _from_mpi_env(environ)) is not None:
        layout = mpi
    elif "PMIX_RANK" in environ or "PMI_FD" in environ:
        layout = _from_mpi4py()
    else:
        layout = (0, 1, 0, 1, 0, "single")
    rank, world, local, local_world, node, launcher = layout
    _check(rank, world, local, local_world, f"{launcher} launcher")

    addr = environ.get("MASTER_ADDR", "")
    port = _first_int(environ, "MASTER_PORT")
    if launcher == "mpi" and (not addr or port is None):
        mpi_addr, mpi_port = mpi_master()
        addr = addr or ("127.0.0.1" if world == local_world else mpi_addr)
        port = mpi_port if port is None else port
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
    if not addr:
        if world == 1 or (world == local_world and launcher != "env"):
            addr = "127.0.0.1"  # every rank is on this node
        elif launcher == "slurm" and nodelist:
            addr = hostnames(nodelist)[0]
        else:
            raise RankDiscoveryError(
                f"{launcher} launcher: {world} ranks span several nodes but MASTER_ADDR is not "
                "set; export MASTER_ADDR=<rank 0's host>"
            )
    if port is None:
        job_id = _first_int(environ, "SLURM_JOB_ID")
        # Derived from the job id so two jobs sharing a node do not collide on one port.
        port = DEFAULT_PORT if job_id is None else 10000 + job_id % 20000
    return RankInfo(rank, world, local, local_world, node, addr, port, launcher)


def prepare_rank_process() -> None:
    """Process-wide settings every rank of a job wants; entry points call it, imports never do.

    Tokenizers must not fork thread pools in ranks that may fork again, and DeepSpeed calls
    torch's deprecated collective names on every step: one FutureWarning per call would flood
    every rank's log.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings(
        "ignore", category=FutureWarning, module="torch.distributed.c10d_logger"
    )


def local_device_index(local_rank: int, visible_devices: int) -> int:
    """The device ordinal this rank uses among the accelerators it can see.

    Launchers that start one rank per GPU and show every rank all of its node's GPUs (torchrun,
    deepspeed, plain srun) want ordinal LOCAL_RANK. Slurm's `--gpus-per-task=1` and
    `--gpu-bind=single:1`/`map_gpu:` show each rank only its own GPU, as ordinal 0, while
    LOCAL_RANK still counts the ranks of the node: ordinal LOCAL_RANK would not exist. With k
    GPUs per task the rank's own GPUs are ordinals 0..k-1. Ordinal local_rank mod visible covers
    all three, and equals LOCAL_RANK whenever the rank sees the whole node.
    """
    if visible_devices < 1:
        raise RankDiscoveryError(
            f"local rank {local_rank} sees no accelerator: check CUDA_VISIBLE_DEVICES and the "
            "job's GPU request (--gres=gpu:N or --gpus-per-task)"
        )
    return local_rank % visible_devices


def bind_device(environ: MutableMapping[str, str], info: RankInfo, visible_devices: int) -> int:
    """This rank's device ordinal, also written to `environ["LOCAL_RANK"]`.

    DeepSpeed reads LOCAL_RANK as the device ordinal wherever it places tensors (the engine,
    zero.Init, NCCL's `device_id` in init_process_group), so under `--gpus-per-task=1` a rank
    with LOCAL_RANK=5 would ask for cuda:5 of its single visible GPU. The node-local rank
    itself stays in `info.local_rank`.
    """
    ordinal = local_device_index(info.local_rank, visible_devices)
    environ["LOCAL_RANK"] = str(ordinal)
    return ordinal


def shutdown_distributed() -> None:
    """Wait for every rank, then tear down the default process group (if one is up).

    A process that exits with gloo's group still alive can abort in its destructors ("terminate
    called without an active exception", exit 250) after its work is done, about one run in
    four here; every entry point that joins the group calls this on its way out.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def init_distributed(backend: str | None = None) -> RankInfo:
    """Discover the layout, export it where missing, and join DeepSpeed's process group.

    `backend=None` lets DeepSpeed pick its accelerator's backend (nccl on CUDA, gloo on CPU).
    """
    info = discover_ranks()
    for key, value in info.env().items():
        os.environ.setdefault(key, value)
    # Bind the GPU before NCCL creates its communicator, so rank k never touches GPU 0.
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(bind_device(os.environ, info, accelerator.device_count()))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True)
    release_shm_workspace()
    if info.rank == 0:
        logger.info(
            "distributed: launcher=%s world_size=%d nodes=%d ranks/node=%d master=%s:%d",
            info.launcher,
            info.world_size,
            info.world_size // max(info.local_world_size, 1),
            info.local_world_size,
            info.master_addr,
            info.master_port,
        )
    return info


SHM_DIR = Path("/dev/shm")


def shm_workspace_path(rank: int) -> Path:
    """Where DeepSpeed's CPU comm op keeps rank `rank`'s shared-memory all-reduce buffer.

    The op (deepspeed/ops/csrc/cpu/comm/shm.cpp) names it from the uid, MASTER_ADDR, MASTER_PORT
    and the rank; POSIX shm_open puts it under /dev/shm on Linux.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_workspace() -> Path | None:
    """Unlink this rank's DeepSpeed shm all-reduce buffer once every rank has mapped it.

    DeepSpeed creates a ~66 MiB /dev/shm file per rank when all ranks share a host (its CPU comm
    op) and never unlinks it, so each run leaves them behind in RAM-backed tmpfs until the machine
    fills up; a later run on the same port would also open a stale buffer. Every rank maps all
    peers' buffers inside `deepspeed.init_distributed`, so after a barrier the names are no longer
    needed: the mappings live on and the memory is freed when the last rank exits, crash or not.
    Returns the unlinked path, or None where the accelerator made no such buffer (GPUs).
    """
    if not dist.is_initialized():
        return None
    path = shm_workspace_path(dist.get_rank())
    dist.barrier()  # all ranks are past shm_initialize, which maps every peer's buffer
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    return path
