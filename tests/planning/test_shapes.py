"""Model shapes for the planner: parameter and LoRA counts against real models and papers."""

from __future__ import annotations

import pytest
import torch
import transformers

from lora_dist.planning.presets import load_shape
from lora_dist.planning.shapes import adapter_bytes, lora_param_count, shape_from_hf_config

GPT3 = load_shape("gpt3-175b")


def test_paper_trainable_params_and_adapter_size() -> None:
    # Hu et al. 2021, Table 4 / Sec. 4.2: GPT-3 175B with W_q, W_v adapted.
    assert abs(GPT3.param_count / 175e9 - 1) < 0.01
    assert round(lora_param_count(GPT3, 1, "q,v") / 1e6, 1) == 4.7
    assert round(lora_param_count(GPT3, 8, "attn") / 1e6, 1) == 37.7
    size = adapter_bytes(GPT3, 4, "q,v", "fp16")
    assert round(size / 1e6, 1) == 37.7 and round(size / 2**20) == 36  # "35MB" in the paper


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


def test_whole_fused_qkv_counts_like_peft_on_gpt2() -> None:
    # "qkv" adapts the whole c_attn, as PEFT's target_modules=["c_attn"] does.
    import peft

    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    shape = shape_from_hf_config(config.to_dict())
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert lora_param_count(shape, 2, "qkv") == trainable


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
        transformers.Phi3Config(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        ),
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


def test_gpt3_paper_counts_are_exact() -> None:
    assert lora_param_count(GPT3, 1, "q,v") == 4_718_592
    assert lora_param_count(GPT3, 8, "attn") == 37_748_736


@pytest.mark.parametrize(
    ("preset", "published"),
    [("bloom-176b", 176_247_271_424), ("llama-3.1-405b", 405_853_388_800)],
)
def test_175b_class_presets(preset: str, published: int) -> None:
    assert load_shape(preset).param_count == published


@pytest.mark.parametrize("preset", ["bloom-176b", "falcon-180b"])
def test_fused_presets_count_q_and_v_slices(preset: str) -> None:
    # Per layer r*(h + heads*head_dim) for q and r*(h + kv_heads*head_dim) for v, as the
    # separate projections would have; the fused k rows get nothing.
    s = load_shape(preset)
    assert s.fused_qkv
    per_layer = 8 * ((s.hidden + s.heads * s.head_dim) + (s.hidden + s.kv_heads * s.head_dim))
    assert lora_param_count(s, 8, "attn") == s.layers * per_layer
    assert lora_param_count(s, 8, "q,v") == lora_param_count(s, 8, "attn")
    assert lora_param_count(s, 8, "qkv") == s.layers * 8 * sum(s.projections["qkv"])
