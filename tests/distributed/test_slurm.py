"""The Slurm scripts on a real local cluster: rank mapping, signal forwarding, requeue policy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.runs import (
    GPT3_SMALL_ENV,
    SMALL_FLAGS,
    SMALL_STEPS,
    TrainedRun,
    assert_same_adapter,
    assert_same_losses,
    free_port,
    launch_env,
)
from tests.slurm_cluster import TERMINAL_STATES, SlurmCluster

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
EXIT_PREEMPTED = 75

# A stand-in for launcher/train.py: records what each rank saw, then behaves per PROBE_MODE.
PROBE = """
import json, os, signal, sys, time
from lora_dist.distributed.launch import discover_ranks

info = discover_ranks()
out, mode = os.environ["PROBE_DIR"], os.environ.get("PROBE_MODE", "ok")
run = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "MASTER_ADDR", "MASTER_PORT",
        "CUDA_VISIBLE_DEVICES", "TORCH_EXTENSIONS_DIR", "NCCL_DEBUG", "OMP_NUM_THREADS")
env = {k: os.environ.get(k) for k in keys}
rec = {"info": vars(info), "argv": sys.argv[1:], "run": run, "env": env}
code = 0
if mode == "preempt_once":
    code = 75 if run == 0 else 0
elif mode == "crash":
    code = 3
elif mode == "wait_signal" and run == 0:
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    open(f"{out}/ready.{info.rank}", "w").close()
    t = time.time()
    while not got and time.time() - t < 60:
        time.sleep(0.05)
    rec["signals"] = got
    code = 75 if got else 9
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # as PreemptionWatch.close() in the trainer
with open(f"{out}/rank{info.rank}.run{run}.json", "w") as f:
    json.dump(rec, f)
sys.exit(code)
"""

# A minimal batch script around launch_common.sh, for the launch machinery alone.
JOB = """#!/usr/bin/env bash
set -euo pipefail
source {repo}/slurm/launch_common.sh
lc_main --flag value
"""


@pytest.fixture
def probe(tmp_path: Path) -> dict[str, str]:
    """Environment that makes the batch scripts run the probe instead of the trainer."""
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "job.sh").write_text(JOB.format(repo=REPO))
    return {
        "PROBE_DIR": str(tmp_path),
        "TRAIN_CMD": f"{sys.executable} {tmp_path / 'probe.py'}",
        "PYTHONPATH": str(REPO),
        "DEEPSPEED": str(Path(sys.executable).parent / "deepspeed"),
    }


def records(directory: Path) -> dict[tuple[int, int], dict]:
    """(rank, run) -> what that rank recorded."""
    found = {}
    for path in directory.glob("rank*.run*.json"):
        rec = json.loads(path.read_text())
        found[(rec["info"]["rank"], rec["run"])] = rec
    return found


def parse_flags(argv: list[str]) -> dict[str, str | None]:
    """--name value pairs; a flag followed by another flag (or nothing) maps to None."""
    flags: dict[str, str | None] = {}
    for i, token in enumerate(argv):
        if token.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            flags[token] = None if nxt is None or nxt.startswith("--") else nxt
    return flags


def two_tasks(tmp_path: Path) -> list[str]:
    return [
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",  # the GPU scripts ask 8; this machine has 2 cores
        f"--output={tmp_path}/job-%j.out",
        "--open-mode=append",
        "--requeue",
    ]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="apt-get install -y shellcheck")
def test_scripts_pass_shellcheck() -> None:
    done = subprocess.run(
        ["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout


@pytest.mark.slurm
@pytest.mark.parametrize("mode", ["srun", "deepspeed"])
def test_two_tasks_get_ranks_0_and_1(
    slurm_cluster: SlurmCluster, probe: dict, tmp_path: Path, mode: str
) -> None:
    env = {**probe, "LAUNCH_MODE": mode}
    job = slurm_cluster.sbatch(tmp_path / "job.sh", sbatch_args=two_tasks(tmp_path), env=env)
    assert (job.state, job.returncode, job.restarts) == ("COMPLETED", 0, 0), job.describe()
    recs = records(tmp_path)
    assert sorted(recs) == [(0, 0), (1, 0)]
    # The reference for the master: scontrol's first host of the allocation.
    nodelist = slurm_cluster.job(job.job_id)["NodeList"]
    first_host = slurm_cluster.run("scontrol", "show", "hostnames", nodelist).stdout
    for (rank, _), rec in recs.items():
        info = rec["info"]
        assert (info["rank"], info["world_size"], info["local_rank"]) == (rank, 2, rank)
        assert info["master_addr"] == first_host.split()[0]
        assert info["launcher"] == {"srun": "slurm", "deepspeed": "deepspeed"}[mode]
        assert rec["env"]["RANK"] == str(rank)
        assert rec["env"]["MASTER_PORT"] == str(10000 + job.job_id % 20000)
        assert rec["argv"] == ["--flag", "value"]
    if mode == "srun":  # srun_task.sh's mapping agrees with Slurm's own task ids
        assert all(r["env"]["SLURM_PROCID"] == r["env"]["RANK"] for r in recs.values())


@pytest.mark.slurm
def test_deepspeed_launcher_keeps_the_gpus_slurm_assigned(
    slurm_cluster: SlurmCluster, probe: dict, tmp_path: Path
) -> None:
    # Slurm gave this job GPUs 3 and 5 of a shared node (no cgroup renumbering). deepspeed's
    # launch.py would set CUDA_VISIBLE_DEVICES=0,1 from the hostfile's slots: another job's GPUs.
    env = {**probe, "LAUNCH_MODE": "deepspeed", "CUDA_VISIBLE_DEVICES": "3,5"}
    job = slurm_cluster.sbatch(tmp_path / "job.sh", sbatch_args=two_tasks(tmp_path), env=env)
    assert (job.state, job.returncode) == ("COMPLETED", 0), job.describe()
    recs = records(tmp_path)
    assert sorted(recs) == [(0, 0), (1, 0)]
    for (rank, _), rec in recs.items():
        assert rec["env"]["CUDA_VISIBLE_DEVICES"] == "3,5", rec["env"]
        assert rec["info"]["local_rank"] == rank  # LOCAL_RANK k is the k-th of Slurm's GPUs
    # Settings every rank inherits: node-local op builds, NCCL's log level, CPU threads.
    env = recs[(0, 0)]["env"]
    assert env["NCCL_DEBUG"] == "WARN" and env["OMP_NUM_THREADS"] == "1"
    assert env["TORCH_EXTENSIONS_DIR"].endswith(
        f"lora-dist-ext-{os.environ.get('USER', 'user')}-{job.job_id}"
    )
    # Slurm's GPUs must match the ranks: a count mismatch is refused before anything starts.
    (tmp_path / "rank0.run0.json").unlink()
    (tmp_path / "rank1.run0.json").unlink()
    env = {**probe, "LAUNCH_MODE": "deepspeed", "CUDA_VISIBLE_DEVICES": "3"}
    job = slurm_cluster.sbatch(tmp_path / "job.sh", sbatch_args=two_tasks(tmp_path), env=env)
    assert job.returncode == 2 and "gave this node 1 GPU(s)" in job.output
    assert records(tmp_path) == {}


@pytest.mark.slurm
def test_preempted_payload_is_requeued_once_and_finishes(
    slurm_cluster: SlurmCluster, probe: dict, tmp_path: Path
) -> None:
    env = {**probe, "PROBE_MODE": "preempt_once"}
    job = slurm_cluster.sbatch(tmp_path / "job.sh", sbatch_args=two_tasks(tmp_path), env=env)
    assert (job.state, job.returncode, job.restarts) == ("COMPLETED", 0, 1), job.describe()
    assert sorted(records(tmp_path)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert "requeueing for restart 1" in job.output


@pytest.mark.slurm
def test_crashing_payload_stops_at_the_restart_cap(
    slurm_cluster: SlurmCluster, probe: dict, tmp_path: Path
) -> None:
    env = {**probe, "PROBE_MODE": "crash", "MAX_RESTARTS": "1"}
    job = slurm_cluster.sbatch(tmp_path / "job.sh", sbatch_args=two_tasks(tmp_path), env=env)
    assert (job.state, job.returncode, job.restarts) == ("FAILED", 3, 1), job.describe()
    assert sorted(records(tmp_path)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert "not requeueing again" in job.output


@pytest.mark.slurm
def test_finished_payload_is_never_requeued(
    slurm_cluster: SlurmCluster, probe: dict, tmp_path: Path
) -> None:
    job = slurm_cluster.sbatch(tmp_path / "job.sh", sbatch_args=two_tasks(tmp_path), env=probe)
    assert (job.state, job.returncode, job.restarts) == ("COMPLETED", 0, 0), job.describe()
    assert "not requeueing" in job.output


def wait_for(paths: list[Path], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"never appeared: {paths}"
        time.sleep(0.1)


@pytest.mark.slurm
@pytest.mark.parametrize(
    ("mode", "scope"),
    [("srun", "--batch"), ("deepspeed", "--batch"), ("deepspeed", "--full")],
)
def test_usr1_reaches_every_rank_and_requeues(
    slurm_cluster: SlurmCluster, probe: dict, tmp_path: Path, mode: str, scope: str
) -> None:
    # --batch is what `#SBATCH --signal=B:USR1@N` does; --full signals every process in the job,
    # the deepspeed launchers included, which must survive it.
    env = {**probe, "PROBE_MODE": "wait_signal", "LAUNCH_MODE": mode}
    job_id = slurm_cluster.submit(tmp_path / "job.sh", sbatch_args=two_tasks(tmp_path), env=env)
    wait_for([tmp_path / "ready.0", tmp_path / "ready.1"])
    slurm_cluster.run("scancel", "--signal=USR1", scope, str(job_id), check=True)
    job = slurm_cluster.wait(job_id)
    assert (job.state, job.returncode, job.restarts) == ("COMPLETED", 0, 1), job.describe()
    recs = records(tmp_path)
    assert sorted(recs) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(recs[(rank, 0)]["signals"] for rank in (0, 1))
    # Requeued because the ranks exited 75, not through the crash path (a killed launcher).
    assert "after a signal (exit 75)" in job.output and "crashed" not in job.output


@pytest.mark.slurm
def test_gpt3_script_passes_the_paper_settings(
    slurm_cluster: SlurmCluster, probe: dict, tmp_path: Path
) -> None:
    env = {
        **probe,
        "DS_CONFIG": "ds_configs/zero3.json",
        "MAX_STEPS": "3",
        "OUTPUT_DIR": str(tmp_path / "run"),
        "EXTRA_ARGS": "--eval_every 2",
    }
    args = [*two_tasks(tmp_path), "--gres=none"]
    job = slurm_cluster.sbatch(REPO / "slurm/gpt3_wikisql.sh", sbatch_args=args, env=env, cwd=REPO)
    assert job.returncode == 0, job.describe()
    argv = records(tmp_path)[(0, 0)]["argv"]
    flags = parse_flags(argv)
    assert "--activation_checkpointing" in flags and flags["--eval_every"] == "2"
    assert flags["--lora_r"] == "4" and flags["--lr"] == "2e-4" and flags["--epochs"] == "2"
    assert flags["--lora_targets"] == "attn" and flags["--resume"] == "auto"
    assert flags["--max_steps"] == "3" and flags["--output_dir"] == str(tmp_path / "run")
    assert "--model" not in flags  # MODEL_DIR unset: the trainer's embedded small model


@pytest.mark.slurm
def test_gpt3_script_rejects_rank_outside_the_papers_range(
    slurm_cluster: SlurmCluster, probe: dict, tmp_path: Path
) -> None:
    env = {**probe, "LORA_R": "16", "DS_CONFIG": "ds_configs/zero3.json"}
    args = [*two_tasks(tmp_path), "--gres=none"]
    job = slurm_cluster.sbatch(REPO / "slurm/gpt3_wikisql.sh", sbatch_args=args, env=env, cwd=REPO)
    assert job.returncode == 2 and job.restarts == 0
    assert "LORA_R=16 must be an integer in 1..8" in job.output
    assert records(tmp_path) == {}


# ---- The real trainer under Slurm: slurm/gpt3_wikisql.sh as submitted, 2 ranks on CPU.


@pytest.mark.slurm
def test_gpt3_small_settings_pass_the_reference_flags(
    slurm_cluster: SlurmCluster, probe: dict, tmp_path: Path
) -> None:
    # The runs below compare the script's training with reference_run's; this makes sure both
    # get the same flags (the probe records them instead of training).
    out = str(tmp_path / "run")
    env = {**probe, **GPT3_SMALL_ENV, "OUTPUT_DIR": out}
    args = [*two_tasks(tmp_path), "--gres=none"]
    job = slurm_cluster.sbatch(REPO / "slurm/gpt3_wikisql.sh", sbatch_args=args, env=env, cwd=REPO)
    assert job.returncode == 0, job.describe()
    argv = records(tmp_path)[(0, 0)]["argv"]
    assert parse_flags(argv) == parse_flags([*SMALL_FLAGS, "--output_dir", out])


def submit_gpt3_small(slurm_cluster: SlurmCluster, tmp_path: Path, name: str) -> tuple[int, Path]:
    """Submit slurm/gpt3_wikisql.sh shrunk to the small run; returns the job id and output dir."""
    out = tmp_path / name
    env = launch_env(
        **GPT3_SMALL_ENV,
        OUTPUT_DIR=str(out),
        PYTHON=sys.executable,
        MASTER_PORT=str(free_port()),  # the job-id default collides with other local clusters
    )
    args = [*two_tasks(tmp_path), "--gres=none"]
    job_id = slurm_cluster.submit(
        REPO / "slurm/gpt3_wikisql.sh", sbatch_args=args, env=env, cwd=REPO
    )
    return job_id, out


def scalar_series(run_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of one TensorBoard scalar, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[int, float] = {}
    for events in sorted(run_dir.rglob("events.out.tfevents*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            series.update((e.step, e.value) for e in acc.Scalars(tag))
    return series


@pytest.mark.slurm
@pytest.mark.multirank
def test_gpt3_script_trains_the_small_model(
    slurm_cluster: SlurmCluster, reference_run: TrainedRun, tmp_path: Path
) -> None:
    job_id, out = submit_gpt3_small(slurm_cluster, tmp_path, "run")
    job = slurm_cluster.wait(job_id, timeout=300)
    assert (job.state, job.returncode, job.restarts) == ("COMPLETED", 0, 0), job.describe()
    assert "trainer finished (exit 0)" in job.output
    run = TrainedRun(out)
    assert (out / "adapter/adapter_config.json").is_file()
    # srun + srun_task.sh train exactly what the deepspeed launcher trains.
    assert_same_losses(run.train_losses, reference_run.train_losses)
    assert_same_adapter(run, reference_run)
    losses = scalar_series(out / "tensorboard", "train/loss")
    assert sorted(losses) == list(range(1, SMALL_STEPS + 1))
    for step, loss in run.train_losses.items():  # TensorBoard stores float32
        assert losses[step] == pytest.approx(loss, rel=1e-6), step


def wait_for_step(slurm_cluster: SlurmCluster, job_id: int, out: Path, step: int) -> None:
    """Until train_log.jsonl (one line per step) reaches `step`: the trainer is in its loop."""
    log = out / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while not log.is_file() or log.read_text().count("\n") < step:
        state = slurm_cluster.job(job_id).get("JobState")
        assert state not in TERMINAL_STATES, slurm_cluster.wait(job_id).describe()
        assert time.monotonic() < deadline, f"job {job_id} never logged step {step}"
        time.sleep(0.2)


@pytest.mark.slurm
@pytest.mark.multirank
def test_preempted_training_resumes_to_the_uninterrupted_adapter(
    slurm_cluster: SlurmCluster, reference_run: TrainedRun, tmp_path: Path
) -> None:
    job_id, out = submit_gpt3_small(slurm_cluster, tmp_path, "preempted")
    wait_for_step(slurm_cluster, job_id, out, 1)
    # What `#SBATCH --signal=B:USR1@900` does before the time limit.
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job_id), check=True)
    job = slurm_cluster.wait(job_id, timeout=300)
    assert (job.state, job.returncode, job.restarts) == ("COMPLETED", 0, 1), job.describe()
    assert "after a signal (exit 75)" in job.output and "crashed" not in job.output

    run = TrainedRun(out)
    # The requeued run resumed from the checkpoint written on the signal, at step k < SMALL_STEPS
    # (SAVE_EVERY=50 writes no other), and ran only the steps after it.
    resumed = Path(run.metrics["resumed_from"])
    stopped = int(resumed.name.removeprefix("step-"))
    assert resumed.parent == out / "checkpoints" and 1 <= stopped < SMALL_STEPS
    assert sorted(run.train_losses) == list(range(stopped + 1, SMALL_STEPS + 1))
    # Both runs together logged every step once, with the uninterrupted run's losses.
    logged = run.logged_losses
    assert [step for step, _ in logged] == list(range(1, SMALL_STEPS + 1))
    assert_same_losses(dict(logged), reference_run.train_losses)
    assert_same_adapter(run, reference_run)
