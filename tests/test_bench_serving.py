"""Smoke test of benchmarks/bench_serving.py --quick: it runs, strategies agree, ratios exist."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests import runs


def test_quick_serving_benchmark(tmp_path):
    script = runs.REPO / "benchmarks" / "bench_serving.py"
    cmd = [sys.executable, str(script), "--quick", "--name", "smoke", "--results", str(tmp_path)]
    cmd += ["--work_dir", str(tmp_path / "work")]
    proc = subprocess.run(
        cmd, cwd=runs.REPO, env=runs.run_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "smoke.json").read_text())
    assert sorted(res["runs"]) == ["1", "4"]
    for count, run in res["runs"].items():
        assert run["mixed_equals_grouped"] == 1.0, count  # the same greedy tokens
        for strategy in ("mixed", "grouped", "merged"):
            stats = run[strategy]
            assert 0 < stats["p50_s"] <= stats["p95_s"] <= stats["makespan_s"]
        assert all(math.isfinite(v) and v > 0 for v in res["ratios"][count].values())
