"""Packing equals no packing: loss and LoRA gradients of packed rows against examples one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AttentionInterface
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from lora_dist.data.chat import IGNORE_INDEX
from lora_dist.data.packing import (
    block_causal_mask,
    collate_packed,
    cu_seq_lens,
    packed_model_inputs,
    plan_packs,
)
from lora_dist.inject import inject_lora
from lora_dist.lora import LoraConfig
from lora_dist.training.schedule import DataOrder
from tests.tiny_models import VOCAB, randomize_lora_b, tiny_llama

MAX_LENGTH = 40


def examples(n: int = 14, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random examples with a masked prompt of random length, like chat rows."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(3, 24))
        ids = rng.integers(0, VOCAB, length)
        labels = ids.copy()
        labels[: int(rng.integers(1, length - 1))] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def reference_best_fit_decreasing(lengths: list[int], max_length: int) -> list[list[int]]:
    """The textbook algorithm, quadratic: each example, longest first (ties by index), goes
    into the open row with the least free space that still fits it (ties: the row most
    recently given that free space... stated simply: the lowest free space, then the row
    that reached it last)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    stamp: list[int] = []  # when each row last changed, to break ties as the plan does
    for t, i in enumerate(order):
        fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (free[r], -stamp[r]))
        else:
            r = len(rows)
            rows.append([])
            free.append(max_length)
            stamp.append(0)
        rows[r].append(i)
        free[r] -= lengths[i]
        stamp[r] = t
    return rows


def test_plan_is_best_fit_decreasing_and_deterministic() -> None:
    rng = np.random.default_rng(3)
    lengths = np.minimum(rng.lognormal(np.log(30), 0.9, 500).astype(int) + 1, 200)
    plan = plan_packs(lengths, 200)
    packs = [plan.pack(p).tolist() for p in range(len(plan))]
    assert packs == reference_best_fit_decreasing(lengths.tolist(), 200)
    assert sorted(plan.members.tolist()) == list(range(len(lengths)))  # each example once
    assert all(lengths[p].sum() <= 200 for p in packs)
    assert plan.tokens == lengths.sum()
    again = plan_packs(lengths.copy(), 200)
    assert again.fingerprint() == plan.fingerprint()
    assert plan_packs(lengths, 201).fingerprint() != plan.fingerprint()
    # Resuming at step s reads the same packs: DataOrder over packs is a function of the step.
    a, b = DataOrder(len(plan), 8, seed=5), DataOrder(len(again), 8, seed=5)
    for step in (0, 3, a.steps_per_epoch + 1):
        assert a.global_indices(step) == b.global_indices(step)
    with pytest.raises(ValueError):
        plan_packs(np.array([5, 201]), 200)


def test_collate_restarts_positions_and_masks_boundaries() -> None:
    a = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [8, 9]}
    batch = collate_packed([[a, b], [b]], pad_id=0, width=7)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0], [8, 9, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1, 1]]
    # b's first label is dropped: token 7 must never be asked to predict token 8
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, 6, 7, x, 9, x, x], [x, 9, x, x, x, x, x]]
    mask = block_causal_mask(batch["segment_ids"], torch.float32)[0, 0]
    allowed = (mask == 0).int().tolist()
    assert allowed[4] == [0, 0, 0, 1, 1, 0, 0]  # b's second token sees b only
    assert allowed[2] == [1, 1, 1, 0, 0, 0, 0]
    assert allowed[6] == [0, 0, 0, 0, 0, 1, 1]  # padding sees padding: no empty row
    cu, longest = cu_seq_lens(batch["position_ids"])
    (hf_cu, _), (hf_max, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu.tolist() == hf_cu.tolist() == [0, 3, 5, 7, 9, 14]
    assert longest == int(hf_max) == 5


def _varlen_reference(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    """Flash attention's varlen contract, on the CPU: attend within each cu_seq_lens slice of
    the flattened tokens, causally. Without cu_seq_lens (an unpacked example) each row is one
    sequence."""
    assert attention_mask is None
    b, h, w, d = query.shape
    cu = kw["cu_seq_lens_q"].tolist() if "cu_seq_lens_q" in kw else list(range(0, b * w + 1, w))
    assert kw.get("max_length_q", w) == max(b - a for a, b in zip(cu, cu[1:], strict=False))
    groups = module.num_key_value_groups
    q = query.transpose(1, 2).reshape(b * w, h, d)
    k = key.repeat_interleave(groups, 1).transpose(1, 2).reshape(b * w, h, d)
    v = value.repeat_interleave(groups, 1).transpose(1, 2).reshape(b * w, h, d)
    out = torch.empty_like(q)
    for start, end in zip(cu, cu[1:], strict=False):
        part = torch.nn.functional.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),
            k[start:end].transpose(0, 1),
            v[start:end].transpose(0, 1),
            is_causal=True,
            scale=scaling,
        )
        out[start:end] = part.transpose(0, 1)
    return out.reshape(b, w, h, d), None


AttentionInterface.register("varlen_reference", _varlen_reference)


def _lora_model(attn: str) -> torch.nn.Module:
    model = tiny_llama(seed=2, attn_implementation=attn, max_position_embeddings=MAX_LENGTH)
    inject_lora(model, LoraConfig(r=4, alpha=8, targets="attn-all"))
    randomize_lora_b(model)
    return model.train()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "attn, attention", [("sdpa", "mask"), ("eager", "mask"), ("varlen_reference", "varlen")]
)
def test_packed_loss_and_lora_grads_equal_one_by_one(attn: str, attention: str) -> None:
    exs = examples()
    model = _lora_model(attn)
    # Reference: each example alone, no padding; token-weighted mean of the losses.
    weights = [int((np.asarray(e["labels"][1:]) != IGNORE_INDEX).sum()) for e in exs]
    total = sum(weights)
    ref_loss = 0.0
    model.zero_grad()
    for e, w in zip(exs, weights, strict=True):
        ids = torch.as_tensor(e["input_ids"])[None]
        loss = model(input_ids=ids, labels=torch.as_tensor(e["labels"])[None]).loss
        (loss * w / total).backward()
        ref_loss += loss.item() * w / total
    ref_grads = _grads(model)

    plan = plan_packs(np.array([len(e["input_ids"]) for e in exs]), MAX_LENGTH)
    assert len(plan) < len(exs) // 2  # several examples really share rows
    rows = [[exs[i] for i in plan.pack(p)] for p in range(len(plan))]
    inputs = packed_model_inputs(collate_packed(rows, pad_id=0), attention, torch.float32)
    model.zero_grad()
    packed = model(**inputs).loss
    packed.backward()
    assert packed.item() == pytest.approx(ref_loss, abs=1e-5)
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 4 * 2  # A, B; q,k,v,o; 2 layers
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=0, msg=name)

    # The check can fail: a plain causal mask over the same packed rows gives another loss.
    if attention == "mask":
        plain = dict(inputs)
        plain["attention_mask"] = block_causal_mask(
            torch.zeros_like(inputs["input_ids"]), torch.float32
        )
        assert abs(model(**plain).loss.item() - ref_loss) > 1e-3
