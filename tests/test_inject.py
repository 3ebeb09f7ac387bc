"""Putting LoRA into a model: target forms, unknown targets, counts."""

import pytest

from lora_dist.inject import inject_lora
from lora_dist.lora import LoraConfig
from tests.tiny_models import tiny_llama


def test_unknown_target_lists_existing_names():
    with pytest.raises(ValueError, match="q_proj.*v_proj|gate_proj") as info:
        inject_lora(tiny_llama(), LoraConfig(targets="query"))
    assert "o_proj" in str(info.value)


def test_target_forms_select_the_same_modules():
    by_preset = set(inject_lora(tiny_llama(), LoraConfig(targets="attn")).layers)
    by_suffix = set(inject_lora(tiny_llama(), LoraConfig(targets="q_proj,v_proj")).layers)
    by_regex = set(
        inject_lora(tiny_llama(), LoraConfig(targets=r"re:.*self_attn\.(q|v)_proj")).layers
    )
    assert by_preset == by_suffix == by_regex and len(by_preset) == 4
    all_linear = inject_lora(tiny_llama(), LoraConfig(targets="all-linear"))
    assert "lm_head" not in all_linear.layers and len(all_linear.layers) == 14


def test_injection_reports_counts():
    model = tiny_llama()
    total_before = sum(p.numel() for p in model.parameters())
    report = inject_lora(model, LoraConfig(r=2, targets="attn"))
    # q: 32->32, v: 32->16 (2 kv heads of 8), two layers
    expected = 2 * (2 * (32 + 32) + 2 * (32 + 16))
    assert report.trainable_params == expected
    assert report.total_params == total_before + expected
    assert "trainable params" in report.summary()
