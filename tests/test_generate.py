"""Greedy generation: batched left-padded decoding against Hugging Face's own greedy generate."""

from __future__ import annotations

import io
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from lora_dist.generate import greedy_generate, num_batches_for, shard_indices

WORDS = (
    "the a cat dog sat on mat ran fast slow red blue green house tree river food pub near "
    "city centre price high low rating coffee shop family friendly area serves"
).split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> LlamaTokenizer:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=96,
        model_type="bpe",
        num_threads=1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    directory: Path = tmp_path_factory.mktemp("tok")
    (directory / "tokenizer.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(directory)
    tok.pad_token = "<pad>"
    return tok


def make_model(tokenizer: LlamaTokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    # Spread the logits so argmax has clear winners and float rounding cannot flip it.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


PROMPTS = [
    "the cat sat on the mat",
    "dog",
    "red house near the river serves food at a high price",
    "coffee shop",
    "a",
]


def hf_greedy_ids(
    model: torch.nn.Module, tokenizer: LlamaTokenizer, prompt: str, n: int
) -> list[int]:
    """One prompt, no padding, through transformers' own generate as the reference."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def hf_greedy(model: torch.nn.Module, tokenizer: LlamaTokenizer, prompt: str, n: int) -> str:
    ids = hf_greedy_ids(model, tokenizer, prompt, n)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def make_gpt2(tokenizer: LlamaTokenizer, seed: int = 0) -> GPT2LMHeadModel:
    """Learned absolute positions: unlike rotary ones they break if padding shifts positions."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(50.0)
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.mark.parametrize("build", [make_model, make_gpt2])
def test_batched_left_padded_matches_one_prompt_at_a_time(
    tokenizer: LlamaTokenizer, build: Callable[[LlamaTokenizer], torch.nn.Module]
) -> None:
    model = build(tokenizer)
    batched = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    alone = [greedy_generate(model, tokenizer, [p], 12, batch_size=1)[0] for p in PROMPTS]
    reference = [hf_greedy(model, tokenizer, p, 12) for p in PROMPTS]
    assert batched == alone == reference
    assert any(text for text in batched)


def test_prompt_lengths_really_differ(tokenizer: LlamaTokenizer) -> None:
    lengths = {len(tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) >= 3  # otherwise the padding test above would pad nothing


def test_max_new_tokens_respected(tokenizer: LlamaTokenizer) -> None:
    model = make_model(tokenizer)
    # EOS logit pinned at 0 while the best of the other 95 is far above it: no sequence stops.
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    calls = count_forwards(model)
    for n in (0, 1, 5):
        reference = [hf_greedy(model, tokenizer, p, n) if n else "" for p in PROMPTS]
        calls[0] = 0
        outs = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=n, batch_size=len(PROMPTS))
        assert outs == reference
        assert calls == [n]  # one prefill plus n - 1 cached steps, one token each


def test_eos_stops_sequence(tokenizer: LlamaTokenizer) -> None:
    model = make_model(tokenizer)
    prompt = PROMPTS[0]
    tokens = hf_greedy_ids(model, tokenizer, prompt, 6)
    k = next(i for i, t in enumerate(tokens) if t not in tokens[:i] and i >= 2)
    # Declare the model's (k+1)-th greedy token the end of sequence: generation stops there.
    model.generation_config.eos_token_id = tokens[k]
    calls = count_forwards(model)
    out = greedy_generate(model, tokenizer, [prompt], max_new_tokens=10, batch_size=1)
    assert out == [tokenizer.decode(tokens[:k], skip_special_tokens=True).strip()]
    assert calls == [k + 1]
    # In a batch, the stopped row stays stopped while the others go on as they would alone.
    batched = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=5)
    alone = [greedy_generate(model, tokenizer, [p], 10, batch_size=1)[0] for p in PROMPTS]
    assert batched == alone and batched[0] == out[0]
    assert max(len(t) for t in batched) > len(out[0])


def count_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    model.register_forward_hook(hook)
    return calls


def test_all_done_keeps_finished_rank_stepping(tokenizer: LlamaTokenizer) -> None:
    """Two ranks (threads) whose all_done is a real AND over both flags step in lockstep."""
    model_a, model_b = make_model(tokenizer), make_model(tokenizer)
    prompt_a, prompt_b = PROMPTS[1], PROMPTS[0]
    # Rank A's first greedy token is its EOS; rank B's EOS is its k-th token, k > 1.
    model_a.generation_config.eos_token_id = hf_greedy_ids(model_a, tokenizer, prompt_a, 1)[0]
    tokens_b = hf_greedy_ids(model_b, tokenizer, prompt_b, 8)
    k = next(i for i, t in enumerate(tokens_b) if t not in tokens_b[:i] and i >= 3)
    model_b.generation_config.eos_token_id = tokens_b[k]
    calls_a, calls_b = count_forwards(model_a), count_forwards(model_b)

    flags = [False, False]
    barrier = threading.Barrier(2)

    def and_over_ranks(rank: int) -> Callable[[bool], bool]:
        def all_done(local: bool) -> bool:  # what an all-reduce with MIN computes
            flags[rank] = local
            barrier.wait()
            result = all(flags)
            barrier.wait()  # nobody overwrites a flag before both have read
            return result

        return all_done

    outs: dict[int, list[str]] = {}

    def rank_main(rank: int, model: torch.nn.Module, prompt: str) -> None:
        outs[rank] = greedy_generate(model, tokenizer, [prompt], 20, 1, and_over_ranks(rank))

    threads = [
        threading.Thread(target=rank_main, args=(0, model_a, prompt_a)),
        threading.Thread(target=rank_main, args=(1, model_b, prompt_b)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert outs[0] == [""]
    assert outs[1] == [tokenizer.decode(tokens_b[:k], skip_special_tokens=True).strip()]
    assert calls_b == [k + 1]  # B stopped at its own EOS, not at max_new_tokens
    assert calls_a == calls_b  # A kept stepping until B was done
    # Alone, the finished rank stops after its single prefill forward.
    greedy_generate(model_a, tokenizer, [prompt_a], 20, 1)
    assert calls_a == [k + 2]


def test_num_batches_pads_with_dummy_batches(tokenizer: LlamaTokenizer) -> None:
    model = make_model(tokenizer)
    calls = count_forwards(model)
    assert (
        greedy_generate(model, tokenizer, [], 4, 2, all_done=lambda d: False, num_batches=2) == []
    )
    assert calls == [8]  # two dummy batches, each stepping max_new_tokens under all_done
    with pytest.raises(ValueError, match="num_batches"):
        greedy_generate(model, tokenizer, PROMPTS, 4, 2, num_batches=2)


@pytest.mark.parametrize("n_items", [0, 1, 7, 10, 33])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shard_indices_cover_each_item_once(n_items: int, world_size: int) -> None:
    shards = [shard_indices(n_items, r, world_size) for r in range(world_size)]
    assert [i for shard in shards for i in shard] == list(range(n_items))
    batch_size = 3
    need = num_batches_for(n_items, world_size, batch_size)
    assert all(-(-len(shard) // batch_size) <= need for shard in shards)
    assert need == max(-(-len(shard) // batch_size) for shard in shards)
