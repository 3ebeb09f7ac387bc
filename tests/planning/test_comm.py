"""The communication plan against hand-worked layouts; its "auto" sizes against the trainer's."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from lora_dist.distributed.ds_config import zero3_budgets
from lora_dist.distributed.zero import gathered_sizes
from lora_dist.inject import inject_lora
from lora_dist.lora import LoraConfig
from lora_dist.models.tiny import tiny_model_config
from lora_dist.planning.comm import Layout, Links, gathered_per_micro, layer_numel, plan_comm
from lora_dist.planning.memory import auto_sizes
from lora_dist.planning.presets import load_shape
from lora_dist.planning.shapes import lora_param_count, shape_from_hf_config

H, FFN, L, V, S = 4096, 11008, 32, 32000, 2048  # LLaMA-2-7B
LAYER = 4 * H * H + 3 * H * FFN  # q, k, v, o, gate, up, down


def layout(**kw) -> Layout:
    base = dict(
        nodes=2,
        gpus_per_node=8,
        tp=1,
        micro_batch=1,
        seq_len=S,
        global_batch=32,
        dtype_bytes=2,
        lora_r=8,
        targets=("q", "v"),
        checkpointing=True,
        persistence_threshold=0,
        reuse_distance=0,
    )
    return Layout(**(base | kw))


def test_zero3_regathers_the_base_in_forward_and_backward() -> None:
    shape = load_shape("llama-2-7b")
    fwd, bwd = gathered_per_micro(shape, layout())
    # Norms (4096) sit under the LoRA threshold (8 x 4096): never gathered.
    assert fwd == L * LAYER + 2 * V * H  # every layer, the embedding and the untied head
    # Backward skips layer 0's q, k, v (their inputs carry no gradient); DeepSpeed gathers
    # the input embedding again all the same (tests/planning/test_comm_count.py counts it).
    assert bwd == fwd - 3 * H * H
    # A reuse distance keeps the last modules gathered from forward into backward: the head
    # (nothing after it), then down_proj of the last layer once 2 x (head + norm) fits.
    _, kept_head = gathered_per_micro(shape, layout(reuse_distance=1))
    assert kept_head == bwd - V * H
    _, kept_more = gathered_per_micro(shape, layout(reuse_distance=2 * (V * H + H) + 1))
    assert kept_more == bwd - V * H - H * FFN


def test_across_nodes_the_gathers_run_at_the_nic_and_bound_the_step() -> None:
    shape = load_shape("llama-2-7b")
    lay, links = layout(), Links(nvlink_gbs=400, ib_gbs=40, gpu_tflops=800)
    plan = plan_comm(shape, lay, links)
    per_micro = 2 * (2 * (L * LAYER + 2 * V * H) - 3 * H * H)  # bf16 bytes
    dp, k, m = 16, 8, 2  # 2 nodes of 8 ranks; global 32 = micro 1 x 2 x DP 16
    assert plan.gather_inside_bytes == pytest.approx(m * per_micro * (k - 1) / dp)
    assert plan.gather_across_bytes == pytest.approx(m * per_micro * (dp - k) / dp)
    assert plan.gather_seconds_per_micro == pytest.approx(per_micro * 15 / 16 / 40e9)
    # Frozen base: 2N forward + 2N input gradients + 2N recompute, N = projections + head.
    n = L * LAYER + V * H
    flops = S * 3 * (2 * n + 4 * S * H * L)
    assert plan.compute_seconds_per_sequence == pytest.approx(flops / 800e12)
    assert plan.bound == "communication"
    b = plan.balanced_micro_batch
    assert b == pytest.approx(plan.gather_seconds_per_micro / plan.compute_seconds_per_sequence)
    at_b = plan_comm(shape, layout(micro_batch=8, global_batch=8 * 16), links)
    assert at_b.bound == "compute" and b < 8


def test_hpz_keeps_every_gather_of_a_frozen_base_inside_the_node() -> None:
    shape = load_shape("llama-2-7b")
    plain = plan_comm(shape, layout(), Links())
    hpz = plan_comm(shape, layout(hpz=8), Links())
    assert hpz.gather_across_bytes == 0
    total = plain.gather_inside_bytes + plain.gather_across_bytes  # (DP-1)/DP of the gathers
    assert hpz.gather_inside_bytes == pytest.approx(total * 16 / 15 * 7 / 8)
    assert hpz.comm_seconds < plain.comm_seconds / 5
    tp = plan_comm(shape, layout(hpz=8, tp=2), Links())  # DeepSpeed's groups would be TP peers
    assert tp.gather_across_bytes > 0 and "hpZ ignored" in tp.notes[0]


def test_one_node_and_tensor_parallelism() -> None:
    shape = load_shape("llama-2-7b")
    one = plan_comm(shape, layout(nodes=1, global_batch=16), Links(nvlink_gbs=300))
    assert one.gather_across_bytes == 0
    assert one.gather_seconds_per_micro == pytest.approx(
        2 * (2 * (L * LAYER + 2 * V * H) - 3 * H * H) * 7 / 8 / 300e9
    )
    tp8 = plan_comm(shape, layout(nodes=1, tp=8, global_batch=4), Links())
    assert tp8.gather_inside_bytes == tp8.gather_across_bytes == 0  # DP 1: nothing to gather
    # Per sequence: 6 activation all-reduces per layer of S x H bf16 values, 2 x 7/8 of them
    # moved per GPU, plus the LM head's output gather.
    ar = L * 6 * S * H * 2 * 2 * 7 / 8 + S * V * 2 * 7 / 8
    assert tp8.tp_bytes == pytest.approx(4 * ar)  # 4 sequences per step


def test_plan_sizes_auto_buffers_as_the_trainer_does() -> None:
    cfg = tiny_model_config()  # what `--model tiny` trains
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    inject_lora(model, LoraConfig(r=8, targets="q_proj,v_proj"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = zero3_budgets(*gathered_sizes(model), trainable)
    shape = shape_from_hf_config(cfg, "tiny")
    n_lora = lora_param_count(shape, 8, "q,v")
    largest = max(n for n, _, _ in shape.tensors())
    planner = auto_sizes(layer_numel(shape, 1) + n_lora // shape.layers, largest, n_lora)
    assert planner == trainer
