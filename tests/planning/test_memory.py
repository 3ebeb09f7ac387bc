"""Per-rank memory plans: activations, ZeRO scaling, offload, LoRA against full fine-tuning."""

from __future__ import annotations

import dataclasses

import pytest

from lora_dist.planning.memory import (
    RunSettings,
    ZeroBuffers,
    activation_bytes,
    plan_memory,
)
from lora_dist.planning.presets import PRESETS, load_shape

GPT3 = load_shape("gpt3-175b")


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


def test_cpu_device_counts_offloaded_state_in_the_rank() -> None:
    shape = load_shape("llama-2-7b")
    kw = dict(nodes=1, gpus_per_node=2, zero_stage=3, offload="optimizer")
    gpu = plan_memory(shape, RunSettings(**kw)).full
    cpu = plan_memory(shape, RunSettings(device="cpu", overhead_gib=0.0, **kw)).full
    assert gpu.offloaded and not cpu.offloaded
    assert cpu.items["optimizer states"] == gpu.offloaded["optimizer states"]
