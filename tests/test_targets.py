"""One table of target presets: the trainer's injection and the planner's counts agree on it."""

from __future__ import annotations

import pytest
import transformers

from lora_dist.inject import find_targets, inject_lora, resolve_targets
from lora_dist.lora import LoraConfig
from lora_dist.planning.shapes import lora_param_count, shape_from_hf_config
from lora_dist.targets import PROJECTION_NAMES, TARGET_PRESETS, preset_modules

CONFIGS = [
    transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    ),
    transformers.MistralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    ),
    transformers.Qwen2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    ),
    transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32),
    transformers.GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=64,
    ),
    transformers.OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
    ),
    transformers.FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
    ),
    transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64),
    transformers.FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=8, num_kv_heads=2,
        new_decoder_architecture=True, vocab_size=64,
    ),
    transformers.Phi3Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, pad_token_id=0,
    ),
    transformers.GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=64, rotary_dim=4),
]  # fmt: skip


def test_every_architecture_with_presets_is_exercised() -> None:
    assert {c.model_type for c in CONFIGS} == set(PROJECTION_NAMES)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.model_type)
@pytest.mark.parametrize("preset", sorted(TARGET_PRESETS))
def test_preset_adapts_what_the_planner_counts(config, preset: str) -> None:
    """The modules injection adapts in a real model are the ones the planner sizes."""
    model = transformers.AutoModelForCausalLM.from_config(config)
    names = preset_modules(preset, config.model_type)
    assert resolve_targets(preset, config.model_type) == names
    paths = find_targets(model, names)
    assert len(paths) == config.num_hidden_layers * len(names)  # each name once per layer
    report = inject_lora(model, LoraConfig(r=2, targets=preset))
    shape = shape_from_hf_config(config.to_dict())
    assert report.trainable_params == lora_param_count(shape, 2, preset)


def test_unknown_architecture_says_what_to_pass() -> None:
    with pytest.raises(ValueError, match="q_proj,v_proj"):
        preset_modules("attn", "mamba")
