"""Tiny Hugging Face models built from configs, seeded, for tests."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 97


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def randomize_lora_b(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every LoRA B a non-zero value so that comparisons mean something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _fused_configs() -> dict:
    """One tiny config per fused-QKV layout (GQA where the family has it)."""
    from transformers import BloomConfig, FalconConfig, GPTNeoXConfig, Phi3Config

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2)
    return {
        "gpt2": GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "bloom": BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
        "gpt_neox": GPTNeoXConfig(
            **common, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64
        ),
        "falcon-mq": FalconConfig(
            **common, num_attention_heads=4, multi_query=True, new_decoder_architecture=False
        ),
        "falcon-grouped": FalconConfig(
            **common, num_attention_heads=8, num_kv_heads=2, new_decoder_architecture=True
        ),
        "phi3": Phi3Config(
            **common,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    }


FUSED_KINDS = tuple(_fused_configs())


def tiny_fused(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny causal LM of a fused-QKV family (see FUSED_KINDS), seeded."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _fused_configs()[kind]
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
