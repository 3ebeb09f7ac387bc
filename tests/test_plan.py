"""Tests for `lora-dist plan`: paper numbers, counts against real models, ZeRO scaling, CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

from lora_dist.cli import main
from lora_dist.planning.memory import (
    GIB,
    MemoryPlan,
    RunSettings,
    ZeroBuffers,
    activation_bytes,
    adapter_bytes,
    lora_param_count,
    plan_memory,
)
from lora_dist.planning.shapes import PRESETS, load_shape, shape_from_hf_config

GPT3 = load_shape("gpt3-175b")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_paper_trainable_params_and_adapter_size() -> None:
    # Hu et al. 2021, Table 4 / Sec. 4.2: GPT-3 175B with W_q, W_v adapted.
    assert abs(GPT3.param_count / 175e9 - 1) < 0.01
    assert round(lora_param_count(GPT3, 1, "q,v") / 1e6, 1) == 4.7
    assert round(lora_param_count(GPT3, 8, "attn") / 1e6, 1) == 37.7
    size = adapter_bytes(GPT3, 4, "q,v", "fp16")
    assert round(size / 1e6, 1) == 37.7 and round(size / 2**20) == 36  # "35MB" in the paper


def test_paper_vram_headline(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "--paper", "--json", "--nodes", "16")
    assert rc == 0
    d = json.loads(out)
    full, lora = (d[m]["cluster_gib"] * GIB for m in ("full", "lora"))
    assert abs(full / 1.2e12 - 1) < 0.15, full
    assert abs(lora / 350e9 - 1) < 0.15, lora
    rc, text, _ = run_cli(capsys, "--paper")
    assert rc == 0 and "1.2 TB vs 350 GB" in text and "37.7 MB = 36 MiB" in text


def _tiny_llama() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,  # GQA, so q and v differ in width
        vocab_size=128,
    )


def _linear_lora_count(model: torch.nn.Module, suffixes: tuple[str, ...], r: int) -> int:
    """r * (in + out) summed over the Linear modules whose names end in `suffixes`."""
    return sum(
        r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.endswith(suffixes)
    )


@pytest.mark.parametrize(
    ("targets", "suffixes"),
    [
        ("attn", ("q_proj", "v_proj")),
        ("attn-all", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("all", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
        ("k,o", ("k_proj", "o_proj")),
    ],
)
def test_lora_count_matches_real_llama(tmp_path, targets: str, suffixes: tuple[str, ...]) -> None:
    config = _tiny_llama()
    model = transformers.LlamaForCausalLM(config)
    config.save_pretrained(tmp_path)
    shape = load_shape(str(tmp_path))  # the model directory holding config.json
    assert shape.param_count == sum(p.numel() for p in model.parameters())
    assert lora_param_count(shape, 4, targets) == _linear_lora_count(model, suffixes, 4)


def test_fused_qkv_counts_like_peft_on_gpt2() -> None:
    # Targeting q,v on GPT-2 adapts the whole c_attn, as PEFT's target_modules=["c_attn"] does.
    import peft

    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    shape = shape_from_hf_config(config.to_dict())
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert lora_param_count(shape, 2, "q,v") == trainable


@pytest.mark.parametrize(
    "config",
    [
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32),
        transformers.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        ),
        transformers.OPTConfig(
            hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
        ),
        transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        transformers.FalconConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
        ),
        transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64),
        transformers.GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=64, rotary_dim=4),
        transformers.MistralConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
        ),
    ],
    ids=lambda c: c.model_type,
)
def test_param_count_matches_real_models(config) -> None:
    config.vocab_size = min(config.vocab_size, 256)  # keep the embedding tiny
    model = transformers.AutoModelForCausalLM.from_config(config)
    shape = shape_from_hf_config(config.to_dict())
    assert shape.param_count == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("preset", "published"),
    [("llama-2-7b", 6_738_415_616), ("llama-2-70b", 68_976_648_192), ("llama-3-8b", 8_030_261_248)],
)
def test_preset_param_counts_match_published(preset: str, published: int) -> None:
    assert load_shape(preset).param_count == published


def test_activations_follow_korthikanti() -> None:
    # Per layer without recomputation: s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes (eq. 2, 16-bit).
    s, b, h, a = 2048, 2, GPT3.hidden, GPT3.heads
    for t in (1, 8):
        run = RunSettings(nodes=1, gpus_per_node=8, tp=t, micro_batch=b, checkpointing=False)
        twice = dataclasses.replace(GPT3, layers=2 * GPT3.layers)
        per_layer = (activation_bytes(twice, run) - activation_bytes(GPT3, run)) / GPT3.layers
        assert per_layer == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    ckpt = RunSettings(micro_batch=b)
    stored = activation_bytes(twice, ckpt) - activation_bytes(GPT3, ckpt)
    assert stored / GPT3.layers == pytest.approx(2 * s * b * h)


def test_zero3_base_weights_scale_with_dp_times_tp() -> None:
    total = GPT3.param_count * 2
    for nodes, tp in [(1, 1), (2, 1), (4, 2), (16, 8)]:
        # No persistent (whole-kept) small tensors, so only sharding decides the size.
        buffers = ZeroBuffers(stage3_param_persistence_threshold=0)
        run = RunSettings(nodes=nodes, gpus_per_node=8, tp=tp, zero_stage=3, buffers=buffers)
        per_gpu = plan_memory(GPT3, run).full.items["base weights"]
        # DP * TP = world; TP leaves positions and norms (0.02% of params) whole: 0.13% at TP 8.
        assert per_gpu * nodes * 8 == pytest.approx(total, rel=2e-3)
        persistent = plan_memory(GPT3, dataclasses.replace(run, buffers=ZeroBuffers()))
        assert per_gpu < persistent.full.items["base weights"] < per_gpu * 1.01
    # ZeRO-2 keeps whole weights per TP rank: only TP divides them.
    run = RunSettings(nodes=2, gpus_per_node=8, tp=4, zero_stage=2)
    assert plan_memory(GPT3, run).full.items["base weights"] * 4 == pytest.approx(total, rel=1e-3)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_lora_needs_less_than_full(preset: str, stage: int) -> None:
    plan = plan_memory(load_shape(preset), RunSettings(zero_stage=stage))
    assert plan.lora.per_gpu < plan.full.per_gpu
    assert plan.lora.items["gradients"] < plan.full.items["gradients"] / 1000


def test_json_round_trips(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "llama-2-70b", "--nodes", "4", "--tp", "8", "--offload", "optimizer"]
    rc, out, _ = run_cli(capsys, *argv, "--targets", "all", "-r", "16", "--json")
    assert rc == 0
    from_cli = MemoryPlan.from_dict(json.loads(out))
    run = RunSettings(nodes=4, tp=8, offload="optimizer", targets="all", lora_r=16)
    assert from_cli == plan_memory(load_shape("llama-2-70b"), run)
    assert json.loads(json.dumps(from_cli.to_dict())) == json.loads(out)


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
    )
    zero = {"stage": 3, "reduce_bucket_size": 1e6, "stage3_prefetch_bucket_size": "auto"}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": zero}))
    args = ["--model", "llama-2-7b", "--json"]
    base = json.loads(_cli_json(args))
    small = json.loads(_cli_json([*args, "--ds_config", str(path)]))
    assert small["run"]["buffers"]["reduce_bucket_size"] == 1_000_000
    assert small["run"]["buffers"]["stage3_prefetch_bucket_size"] == defaults.prefetch_bucket_size
    saved = (base["lora"]["items"]["comm buffers"] - small["lora"]["items"]["comm buffers"]) / 2
    assert saved == defaults.reduce_bucket_size - 1_000_000  # bf16 elements no longer allocated


def _cli_json(argv: list[str]) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["plan", *argv]) == 0
    return buf.getvalue()


def test_cpu_device_counts_offloaded_state_in_the_rank() -> None:
    shape = load_shape("llama-2-7b")
    kw = dict(nodes=1, gpus_per_node=2, zero_stage=3, offload="optimizer")
    gpu = plan_memory(shape, RunSettings(**kw)).full
    cpu = plan_memory(shape, RunSettings(device="cpu", overhead_gib=0.0, **kw)).full
    assert gpu.offloaded and not cpu.offloaded
    assert cpu.items["optimizer states"] == gpu.offloaded["optimizer states"]


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
