"""`lora-dist plan`: the paper's headline, JSON round trip, tables, ds_config buffers, errors."""

from __future__ import annotations

import json

import pytest
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

from lora_dist.cli import main
from lora_dist.planning.memory import (
    GIB,
    MemoryPlan,
    RunSettings,
    ZeroBuffers,
    plan_memory,
)
from lora_dist.planning.presets import load_shape


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_paper_vram_headline(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "--paper", "--json", "--nodes", "16")
    assert rc == 0
    d = json.loads(out)
    full, lora = (d[m]["cluster_gib"] * GIB for m in ("full", "lora"))
    assert abs(full / 1.2e12 - 1) < 0.15, full
    assert abs(lora / 350e9 - 1) < 0.15, lora
    rc, text, _ = run_cli(capsys, "--paper")
    assert rc == 0 and "1.2 TB vs 350 GB" in text and "37.7 MB = 36 MiB" in text


def test_json_round_trips(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "llama-2-70b", "--nodes", "4", "--tp", "8", "--offload", "optimizer"]
    rc, out, _ = run_cli(capsys, *argv, "--targets", "all", "-r", "16", "--json")
    assert rc == 0
    printed = json.loads(out)
    comm = printed.pop("comm")  # the communication plan, next to the memory plan
    assert comm["bound"] in ("communication", "compute") and comm["layout"]["tp"] == 8
    from_cli = MemoryPlan.from_dict(printed)
    run = RunSettings(nodes=4, tp=8, offload="optimizer", targets="all", lora_r=16)
    assert from_cli == plan_memory(load_shape("llama-2-70b"), run)
    assert json.loads(json.dumps(from_cli.to_dict())) == printed


def test_table_has_verdicts_and_units(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(
        capsys, "--model", "llama-2-13b", "--gpus-per-node", "1", "--gpu-gib", "40"
    )
    assert rc == 0
    assert "verdict (40 GiB per GPU): full FT does NOT fit, LoRA fits" in out
    assert " MB = " in out and " MiB" in out


def test_ds_config_buffers(tmp_path) -> None:
    defaults = DeepSpeedZeroConfig()  # the installed DeepSpeed's own defaults
    assert ZeroBuffers() == ZeroBuffers(
        defaults.prefetch_bucket_size,
        defaults.max_live_parameters,
        defaults.param_persistence_threshold,
        defaults.reduce_bucket_size,
        defaults.allgather_bucket_size,
        defaults.max_reuse_distance,
    )
    zero = {"stage": 3, "reduce_bucket_size": 1e6, "stage3_max_live_parameters": 1e9}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": zero}))
    args = ["--model", "llama-2-7b", "--json"]
    base = json.loads(_cli_json(args))
    small = json.loads(_cli_json([*args, "--ds_config", str(path)]))
    assert small["run"]["buffers"]["reduce_bucket_size"] == 1_000_000
    assert small["run"]["buffers"]["stage3_prefetch_bucket_size"] == defaults.prefetch_bucket_size
    saved = (base["lora"]["items"]["comm buffers"] - small["lora"]["items"]["comm buffers"]) / 2
    assert saved == defaults.reduce_bucket_size - 1_000_000  # bf16 elements no longer allocated
    # "auto" sizes come from the model, as the trainer sizes them: a LLaMA-2-7B layer (202M
    # elements, its q,v LoRA factors included) is prefetched whole, the reduce bucket holds
    # every LoRA gradient (r=8 on q,v of 32 layers: 4.2M).
    zero |= {"stage3_prefetch_bucket_size": "auto", "reduce_bucket_size": "auto"}
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": zero}))
    auto = json.loads(_cli_json([*args, "--ds_config", str(path)]))
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096 + 2 * 8 * (4096 + 4096)
    lora = 32 * 2 * 8 * (4096 + 4096)
    gathered = auto["lora"]["items"]["comm buffers"] / 2 - lora
    assert gathered == layer + 32000 * 4096  # the prefetched layer plus the largest tensor


def _cli_json(argv: list[str]) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["plan", *argv]) == 0
    return buf.getvalue()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "llama-2-7b", "--nodes", "3", "--gpus-per-node", "1", "--tp", "2"], "--tp in"),
        (["--model", "opt-66b", "--tp", "16", "--nodes", "2"], "72 attention heads"),
        (["--model", "llama-2-70b", "--tp", "16", "--nodes", "2"], "8 kv heads"),
        (["--model", "gpt4"], "llama-2-70b"),  # lists the presets
        (["--model", "gpt3-175b", "--targets", "q,gate"], "comma list of"),
        (["--model", "gpt3-175b", "--zero", "2", "--offload", "param+optimizer"], "--zero 3"),
        (["--model", "gpt3-175b", "--zero", "5"], "--zero must be"),
        ([], "--model is required"),
    ],
)
def test_bad_input_says_what_to_change(capsys, argv: list[str], message: str) -> None:
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2 and out == ""
    assert message in err, err
