"""Smoke test of benchmarks/bench_memory_speed.py --quick: it runs and its JSON has the ratios."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests import runs

RATIOS = (
    "lora_over_full_peak_rss",
    "lora_over_full_model_state",
    "lora_over_full_step_time",
    "lora_over_peft_peak_rss",
    "lora_over_peft_step_time",
    "merged_over_base_latency",
    "frozen_base_2rank_over_1rank",
    "planner_lora_error",
    "planner_full_error",
)


@pytest.mark.multirank
def test_quick_benchmark_writes_ratios(tmp_path: Path) -> None:
    script = runs.REPO / "benchmarks" / "bench_memory_speed.py"
    cmd = [sys.executable, str(script), "--quick", "--name", "smoke"]
    cmd += ["--results", str(tmp_path), "--work_dir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=runs.REPO, env=runs.run_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "smoke.json").read_text())
    for key in RATIOS:
        assert math.isfinite(res["ratios"][key]), key
    # Two ranks store half of the frozen base that one rank stores (up to padding).
    assert res["ratios"]["frozen_base_2rank_over_1rank"] == pytest.approx(0.5, abs=0.01)
    # r=4 on q and v (square, hidden x hidden here): r * (in + out) per module, 2 per layer.
    shape = res["shape"]
    want = 4 * 2 * shape["hidden"] * 2 * shape["layers"]
    assert res["lora"]["trainable_numel"] == res["peft"]["trainable_numel"] == want
    # Every configuration trains the same base on the same tokens: the same first loss.
    first = {w: res[w]["losses_rank0"][0] for w in ("lora", "full", "peft")}
    assert max(first.values()) - min(first.values()) < 1e-3, first
    # Full fine-tuning keeps gradients and Adam states for every weight; LoRA does not.
    assert res["ratios"]["lora_over_full_model_state"] < 0.5
    assert res["latency"]["lora_modules_left"] == 0 and res["latency"]["max_logit_diff"] > 0
