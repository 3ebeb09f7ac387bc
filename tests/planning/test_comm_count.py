"""`lora-dist plan`'s all-gather volume against the bytes DeepSpeed's collectives really move.

tests/trainer_probe.py sums, per training step, what each all-gather delivers to a rank (its
output minus its own input) on 2 CPU ranks; the planner predicts the same from the model's
config and the run's layout alone.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from lora_dist.models.tiny import tiny_model_config
from lora_dist.planning.comm import Layout, Links, layer_numel, plan_comm
from lora_dist.planning.shapes import lora_param_count, shape_from_hf_config
from tests import runs

GLOBAL, MICRO, STEPS = 8, 2, 3  # 2 micro-batches per rank and step


@pytest.mark.multirank
def test_planned_allgather_volume_matches_the_counted_bytes(tmp_path) -> None:
    cfg = json.loads((runs.REPO / runs.TEST_DS_CONFIG).read_text())  # fp32, ZeRO-3, "auto" sizes
    cfg |= {"train_batch_size": GLOBAL, "train_micro_batch_size_per_gpu": MICRO}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    flags = ["--ds_config", str(tmp_path / "ds.json"), "--output_dir", str(tmp_path / "run")]
    flags += ["--max_steps", str(STEPS), "--eval_every", str(STEPS), "--skip_task_eval"]
    flags += ["--lora_r", "8", "--lora_targets", "attn", "--max_length", "64"]
    cmd = runs.train_cmd(2, *flags)
    cmd[cmd.index(str(runs.REPO / "launcher" / "train.py"))] = str(
        runs.REPO / "tests" / "trainer_probe.py"
    )
    env = runs.run_env(PROBE_OUT=str(tmp_path / "probe"))
    done = subprocess.run(cmd, cwd=runs.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    shape = shape_from_hf_config(tiny_model_config(), "tiny")
    n_lora = lora_param_count(shape, 8, "q,v")
    layout = Layout(
        nodes=1,
        gpus_per_node=2,
        tp=1,
        micro_batch=MICRO,
        seq_len=64,
        global_batch=GLOBAL,
        dtype_bytes=4,
        lora_r=8,
        targets=("q", "v"),
        checkpointing=False,
        persistence_threshold=0,
        reuse_distance=layer_numel(shape, 1) + n_lora // shape.layers,  # "auto", as trained
    )
    planned = plan_comm(shape, layout, Links()).allgather_bytes
    assert planned > 1e6  # the base's fp32 gathers, not just the LoRA factors
    for rank in (0, 1):
        counted = json.loads((tmp_path / "probe" / f"rank{rank}.json").read_text())
        # Step 1 records ZeRO-3's trace (no prefetch, no reuse yet); later steps are steady.
        for step in range(2, STEPS + 1):
            got = counted["allgather_bytes"][str(step)]
            assert abs(got / planned - 1) < 0.10, (rank, step, got, planned)
