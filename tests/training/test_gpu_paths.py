"""What NCCL and a GPU cluster would break, caught on 2 CPU ranks by tests/trainer_probe.py.

One TP=2 run on the shipped bf16 config covers the step, checkpoints, dev loss, a task
evaluation, the TP replica check and the final adapter; SIGTERM arrives as the final task
evaluation starts. A second run resumes it. The probe records every collective's tensors, the
training step's host reads, and the evaluations with whether the final adapter was on disk.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests import runs
from tests.runs import TrainedRun

pytestmark = pytest.mark.multirank
STEPS = 4
FLAGS = (
    "--max_steps", str(STEPS), "--save_every", "2", "--eval_every", str(STEPS),
    "--task_eval_every", "2", "--eval_limit", "4", "--eval_batch_size", "1",
    "--eval_max_new_tokens", "4", "--max_length", "64",
)  # fmt: skip


def probe_run(out: Path, probe: Path, ds: Path, *extra: str, **env: str):
    cmd = runs.train_cmd(2, "--ds_config", str(ds), "--output_dir", str(out), *FLAGS, *extra)
    cmd[cmd.index(str(runs.REPO / "launcher" / "train.py"))] = str(
        runs.REPO / "tests" / "trainer_probe.py"
    )
    done = subprocess.run(
        cmd,
        cwd=runs.REPO,
        env=runs.run_env(PROBE_OUT=str(probe), **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    records = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    return done, records


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    """The TP=2 run stopped in its final evaluation, then the run that resumes it."""
    tmp = tmp_path_factory.mktemp("gpu_paths")
    cfg = json.loads((runs.REPO / "ds_configs" / "zero3_tp2.json").read_text())
    cfg |= {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2}
    ds = tmp / "ds.json"
    ds.write_text(json.dumps(cfg))
    out = tmp / "run"
    stopped = probe_run(out, tmp / "probe1", ds, PROBE_SIGNAL_AT="final_task_eval")
    written = out / "adapter" / "adapter_model.safetensors"
    adapter = written.read_bytes() if written.is_file() else None
    resumed = probe_run(out, tmp / "probe2", ds, "--resume", "auto")
    return out, stopped, adapter, resumed


def test_collectives_only_see_tensors_on_the_engine_device(tp_runs) -> None:
    _, (done, records), _, (_, records2) = tp_runs
    violations = [v for rec in records + records2 for v in rec["violations"]]
    assert violations == [], json.dumps(violations[:3], indent=1)
    assert all(rec["calls"] > 100 for rec in records + records2)  # every path made collectives
    assert "bit-identical on all 2 TP ranks" in done.stderr  # the TP replica check ran


def test_tp_slices_are_partitioned_over_dp_as_they_are_built(tp_runs) -> None:
    _, (_, records), _, (_, records2) = tp_runs
    assert all(rec["zero_after_tp"] for rec in records + records2)


def test_the_training_step_reads_the_device_once(tp_runs) -> None:
    _, (_, records), _, _ = tp_runs
    for rec in records:
        assert sorted(rec["host_reads"]) == [str(s) for s in range(1, STEPS + 1)]
        for step, reads in rec["host_reads"].items():
            # 2 micro-batches per step; the one read is the step's summed loss/tokens/norm.
            assert len(reads) == 1 and reads[0].startswith("tolist at"), (step, reads)


def test_the_final_adapter_is_on_disk_before_any_evaluation_of_it(tp_runs) -> None:
    _, (_, records), _, (_, records2) = tp_runs
    for rec in records + records2:
        final = [e for e in rec["evals"] if e["final"]]
        assert {e["kind"] for e in final} == {"dev_loss", "task_eval"}
        assert all(e["adapter_on_disk"] for e in final), final


def test_evaluation_honours_preemption_and_the_requeued_run_only_evaluates(tp_runs) -> None:
    out, (done, _), adapter, (done2, _) = tp_runs
    assert adapter is not None, done.stderr[-3000:]  # saved before the evaluation began
    assert done.returncode == 75, done.stderr[-3000:]
    assert "stopped after 1 of 4 batches on SIGTERM" in done.stderr
    assert (out / "eval" / "predictions_step2.jsonl").is_file()  # the periodic one finished
    assert (out / "checkpoints" / f"step-{STEPS}").is_dir()
    # The requeued job resumes at the last step, trains nothing and evaluates.
    assert done2.returncode == 0, done2.stderr[-3000:]
    m = TrainedRun(out).metrics
    assert m["resumed_from"].endswith(f"step-{STEPS}") and m["train_losses"] == []
    assert m["task_metrics"]["n"] == 4
    assert (out / "eval" / f"predictions_step{STEPS}.jsonl").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
