"""A real one-node Slurm cluster (munged, slurmctld, slurmd) in a temporary directory, for tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# Debian's packages; `apt-get update` is retried once because a fresh image has no package lists.
SLURM_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


class ClusterUnavailable(RuntimeError):
    """Raised when this machine cannot run a local Slurm cluster (not root, no packages)."""


def ensure_slurm_installed() -> None:
    """Install Slurm and munge with apt-get when slurmctld is missing; raise if impossible."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("Slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable("Slurm is not installed and there is no apt-get")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *SLURM_PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise ClusterUnavailable(f"apt-get could not install Slurm: {done.stderr[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_line() -> str:
    """The node's hardware as slurmd itself detects it, so slurmctld never drains it as 'low'."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0].strip()


def _read_pid(path: Path, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text().split()[0])
        time.sleep(0.05)
    raise RuntimeError(f"daemon did not write its pid file {path}")


TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE",
}  # fmt: skip


@dataclass(frozen=True)
class JobResult:
    """How a batch job ended: Slurm's state, its exit code, requeue count and its output file."""

    job_id: int
    state: str
    returncode: int
    restarts: int
    output: str
    daemon_log: str = ""
    """The daemons' log lines about this job: why Slurm failed or requeued it."""

    def describe(self) -> str:
        """Everything a failed assertion should show: state, job output, daemon log lines."""
        return (
            f"job {self.job_id}: {self.state}, exit {self.returncode}, {self.restarts} restarts"
            f"\n--- output ---\n{self.output}\n--- slurmctld/slurmd ---\n{self.daemon_log}"
        )


@dataclass
class SlurmCluster:
    """A running local cluster: its directory, config file and the daemons' PIDs."""

    root: Path
    conf: Path
    node: str
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The environment Slurm client commands need to talk to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sinfo, scontrol, ...) against this cluster."""
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, **kw)

    def submit(
        self,
        script: str | Path,
        *args: str,
        sbatch_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> int:
        """Submit `script args` and return the job id; `env` is added to the job's environment."""
        cmd = ["sbatch", "--parsable", *sbatch_args, str(script), *args]
        done = subprocess.run(
            cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"sbatch failed ({done.returncode}): {done.stderr}")
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: int, timeout: float = 300) -> JobResult:
        """Wait until the job is over for good, as `sbatch --wait` does, but polling every 0.2 s.

        A requeued job is made eligible within a second: Slurm otherwise holds it back for about
        two minutes (EligibleTime = requeue time + 120 s), which says nothing about our scripts.
        """
        deadline = time.monotonic() + timeout
        released = set()  # restart counts whose hold was already shortened
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in TERMINAL_STATES:
                code, _, sig = info.get("ExitCode", "0:0").partition(":")
                out_path = Path(info.get("StdOut", ""))
                output = out_path.read_text() if out_path.is_file() else ""
                rc = int(code) if int(code or 0) or not int(sig or 0) else 128 + int(sig)
                restarts = int(info.get("Restarts", 0))
                return JobResult(job_id, state, rc, restarts, output, self.daemon_log(job_id))
            restart = info.get("Restarts", "0")
            if state == "PENDING" and info.get("Reason") == "BeginTime" and restart not in released:
                released.add(restart)
                # The requeue revoked the job's credential on slurmd, in this second or earlier;
                # a relaunch within the same second gets a credential slurmd counts as revoked
                # (whole-second timestamps) and the job dies "non-startable" with exit 1. So
                # release it at the next second. (A future StartTime would wait for the
                # backfill scheduler's next pass, up to 30 s; `now` triggers a pass at once.)
                time.sleep(1.01 - time.time() % 1)
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            time.sleep(0.2)
        self.run("scancel", str(job_id))
        raise TimeoutError(f"job {job_id} did not finish in {timeout} s: {self.job(job_id)}")

    def daemon_log(self, job_id: int) -> str:
        """Lines of slurmctld.log and slurmd.log that name the job, oldest first."""
        marks = (f"JobId={job_id} ", f"job {job_id} ", f"[{job_id}.", f"StepId={job_id}.")
        lines = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.is_file():
                text = path.read_text(errors="replace") + "\n"
                lines += [
                    f"{name}: {ln}" for ln in text.splitlines() if any(m in ln + " " for m in marks)
                ]
        return "\n".join(sorted(lines, key=lambda ln: ln.split(": ", 1)[1]))

    def sbatch(
        self,
        script: str | Path,
        *args: str,
        sbatch_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        timeout: float = 300,
    ) -> JobResult:
        """Submit a job and wait for its final outcome (`sbatch --wait` semantics)."""
        job_id = self.submit(script, *args, sbatch_args=sbatch_args, env=env, cwd=cwd)
        return self.wait(job_id, timeout=timeout)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until the node reports idle (up and with nothing running)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%t").stdout.strip()
            if state == "idle":
                return
            time.sleep(0.2)
        logs = "\n".join(p.read_text()[-2000:] for p in self.root.glob("*.log"))
        raise RuntimeError(f"node never became idle (last state {state!r}); logs:\n{logs}")

    def stop(self) -> None:
        """Stop every daemon this cluster started, by PID, and wait for each to exit."""
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); the daemons are not our children, so check /proc.
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def _write_conf(root: Path, node_line: str, munge_socket: Path) -> tuple[Path, str]:
    node = node_line.split()[0].split("=", 1)[1]
    lines = [
        "ClusterName=loradisttest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        # CR_Core with the detected cores (2 here, ThreadsPerCore=1) lets 2 tasks share the node.
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerParameters=batch_sched_delay=0",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "JobRequeue=1",
        "KillWait=5",
        "MinJobAge=600",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        f"{node_line} NodeAddr=127.0.0.1 State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf, node


def start_cluster(root: Path) -> SlurmCluster:
    """Write a config under `root`, start munged, slurmctld and slurmd, and wait for an idle node.

    On any failure the daemons already started are stopped before the error propagates.
    """
    if os.geteuid() != 0:
        raise ClusterUnavailable("a local Slurm cluster needs root (slurmd runs jobs as any user)")
    ensure_slurm_installed()
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    # A private munged on its own socket: nothing else on the machine is touched or relied on.
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o755, exist_ok=True)
    shutil.chown(munge_dir, "munge", "munge")
    munge_socket = munge_dir / "munge.socket"
    conf, node = _write_conf(root, _node_line(), munge_socket)
    cluster = SlurmCluster(root=root, conf=conf, node=node)
    try:
        subprocess.run(
            [
                "runuser", "-u", "munge", "--", "munged", "--force",
                f"--socket={munge_socket}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={munge_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        cluster.pids["munged"] = _read_pid(munge_dir / "munged.pid")
        env = cluster.env
        # -c: start from a clean state, so no job from an earlier run comes back.
        subprocess.run(["slurmctld", "-c"], env=env, check=True, capture_output=True)
        cluster.pids["slurmctld"] = _read_pid(root / "slurmctld.pid")
        subprocess.run(["slurmd"], env=env, check=True, capture_output=True)
        cluster.pids["slurmd"] = _read_pid(root / "slurmd.pid")
        cluster.wait_idle()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextmanager
def local_cluster() -> Iterator[SlurmCluster]:
    """A started cluster in a fresh directory, stopped and removed afterwards even on errors."""
    root = Path(tempfile.mkdtemp(prefix="lora_dist_slurm_"))
    root.chmod(0o755)  # munged runs as the munge user and must reach its socket under here
    try:
        cluster = start_cluster(root)
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
