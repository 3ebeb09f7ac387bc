"""The default model with adapters trained here: one mixed batch equals PEFT row by row.

Three adapters of different ranks, alphas and targets (one with rsLoRA, one on a regex subset of
layers), and a fourth with the first one's rank (so that their rows share one gathered BGMV
product), each trained for a few steps by lora-dist's own LoRA, plus the bare base: every row of
one mixed forward pass gives PEFT's logits with that row's adapter alone (fp32, 1e-5 of the
logit scale), and continuous-batched greedy generation gives PEFT's tokens exactly.

Most logits are bitwise PEFT's. The rest differ by up to about 1e-4 (a few 1e-6 of the largest
logit): MKL computes a GEMM's tail rows (past the last multiple of its block) with other
kernels, and a LoRA matmul here has other row counts than in PEFT's batch. PEFT itself moves as
much when the same row runs alone instead of in a batch. Hence a tolerance relative to the
row's logits rather than 1e-5 absolute."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_dist.lora import LoraConfig
from lora_dist.multi_lora import MultiLoraModel
from lora_dist.serving.engine import Engine, Request
from lora_dist.serving.kv import left_padded
from lora_dist.serving.sampling import SamplingParams
from lora_dist.serving.text import encode_prompt
from tests.serving.helpers import (
    load_default_model,
    peft_greedy,
    peft_model,
    train_adapter,
)

ADAPTERS = {  # name: (config, training text, learning rate)
    "pirate": (
        LoraConfig(r=4, alpha=8.0, targets=["q_proj", "v_proj"]),
        "Arr matey, the sea be rough and the rum be gone!",
        1e-2,
    ),
    "french": (
        LoraConfig(r=8, alpha=16.0, targets="all", use_rslora=True),
        "Bonjour mon ami, merci beaucoup et bonne journée.",
        2e-3,
    ),
    "sums": (
        LoraConfig(
            r=2,
            alpha=4.0,
            targets=r"re:model\.layers\.(\d|1\d)\.(self_attn\.o_proj|mlp\.down_proj)",
        ),
        "2 + 2 = 4. 3 + 5 = 8. 7 + 6 = 13.",
        1e-2,
    ),
    # pirate's rank with other targets and alpha: their rows share one gathered BGMV product
    "echo": (
        LoraConfig(r=4, alpha=2.0, targets=["k_proj", "up_proj"]),
        "Echo echo echo, said the cave, echo echo.",
        1e-2,
    ),
}
ROWS = [
    ("pirate", "The sea is"),
    ("french", "Bonjour, je"),
    ("sums", "4 + 4 ="),
    (None, "Hello, I am"),
    ("echo", "The cave said"),
]


@pytest.fixture(scope="module")
def default_setup(tmp_path_factory):
    torch.manual_seed(0)
    base, tokenizer = load_default_model()
    root = tmp_path_factory.mktemp("default-adapters")
    dirs, losses = {}, {}
    for name, (cfg, text, lr) in ADAPTERS.items():
        dirs[name] = root / name
        losses[name] = train_adapter(base, tokenizer, cfg, text, dirs[name], steps=3, lr=lr)
    mixed = MultiLoraModel(copy.deepcopy(base))
    slots = {name: mixed.add(mixed.read(path)) for name, path in dirs.items()}
    return base, tokenizer, dirs, losses, mixed, slots


def test_mixed_batch_rows_equal_peft_with_each_adapter(default_setup):
    base, tokenizer, dirs, losses, mixed, slots = default_setup
    for name, trace in losses.items():
        assert trace[-1] < trace[0], (name, trace)  # the adapters were really trained
    prompts = [encode_prompt(tokenizer, text) for _, text in ROWS]
    ids, mask, positions = left_padded(prompts, tokenizer.pad_token_id or 0, torch.device("cpu"))
    assert len({len(p) for p in prompts}) > 1  # some rows are padded
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    with torch.no_grad():
        got = mixed([slots[n] if n else 0 for n, _ in ROWS], **inputs).logits
        reference = peft_model(base, dirs)
        with reference.disable_adapter():
            bare = reference(**inputs).logits
        for row, (name, _) in enumerate(ROWS):
            if name is None:
                want = bare
            else:
                reference.set_adapter(name)
                want = reference(**inputs).logits
            real = mask[row].bool()
            # fp32 through 30 layers: 1e-5 of the row's logit scale. PEFT itself moves this much
            # when the same row runs alone instead of in this batch (2.5e-5 to 3.4e-5 here):
            # the GEMM kernels round rows at the edge of a block differently.
            scale = want[row, real].abs().max()
            torch.testing.assert_close(
                got[row, real], want[row, real], rtol=1e-5, atol=float(1e-5 * scale)
            )
            if name is not None:
                assert (want[row, real] - bare[row, real]).abs().max() > 0.5, name


def test_greedy_generation_equals_peft(default_setup):
    base, tokenizer, dirs, _, mixed, slots = default_setup
    reference = peft_model(base, dirs)
    jobs = [
        (name, encode_prompt(tokenizer, text), 6 + 2 * i) for i, (name, text) in enumerate(ROWS)
    ]
    requests = [
        Request(ids, SamplingParams(max_tokens=n, temperature=0.0), slots[name] if name else 0)
        for name, ids, n in jobs
    ]
    results = Engine(mixed, tokenizer, max_batch_size=3).run(requests)  # the 4th joins later
    eos = tokenizer.eos_token_id
    outputs = []
    for (name, ids, n), result in zip(jobs, results, strict=True):
        want = peft_greedy(reference, name, ids, n, eos)
        assert result.token_ids == want, (
            name,
            tokenizer.decode(result.token_ids),
            tokenizer.decode(want),
        )
        outputs.append(result.text)
    assert len(set(outputs)) == len(outputs)
