"""Continuous batching: every request's tokens equal PEFT's alone, whatever joins or leaves."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from lora_dist.multi_lora import MultiLoraModel
from lora_dist.serving.engine import Engine, Request
from lora_dist.serving.errors import RequestError
from lora_dist.serving.sampling import SamplingParams, pick_tokens
from lora_dist.serving.text import TextStream, encode_chat, encode_prompt
from tests.serving.helpers import peft_greedy, peft_model, tiny_adapters, tiny_base

PROMPTS = [
    "The model",
    "Low-rank adaptation freezes the pretrained weights and",
    "A",
    "We train",
    "Each row of the batch uses its own adapter, and the base",
    "Adapters are small",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    base_dir = tiny_base(root / "base")
    adapters = tiny_adapters(base_dir, root / "adapters")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    mixed = MultiLoraModel(LlamaForCausalLM.from_pretrained(base_dir).eval())
    slots = {name: mixed.add(mixed.read(path)) for name, path in adapters.items()}
    reference = peft_model(LlamaForCausalLM.from_pretrained(base_dir).eval(), adapters)
    return tokenizer, mixed, slots, reference


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def test_staggered_requests_match_peft_alone(tiny):
    tokenizer, mixed, slots, reference = tiny
    names = [None, *slots]
    jobs = [
        (names[i % len(names)], encode_prompt(tokenizer, PROMPTS[i % len(PROMPTS)]), 3 + 2 * i)
        for i in range(12)
    ]
    engine = Engine(mixed, tokenizer, max_batch_size=4)
    results: dict[str, list[int]] = {}
    requests = [
        Request(ids, _greedy(n), slots.get(name, 0) if name else 0) for name, ids, n in jobs
    ]
    for request in requests:
        request.on_update = lambda u: u.finish_reason and results.__setitem__(u.request_id, u)
    batches: list[set[str]] = []
    for i, request in enumerate(requests):
        engine.submit(request)
        if i % 3 == 2:  # three arrive, then a token boundary, then the next three
            engine.step()
            batches.append({row.request.request_id for row in engine._running})
    while engine.has_work():
        engine.step()
        batches.append({row.request.request_id for row in engine._running})
    assert max(len(b) for b in batches) == 4
    joined_late = [b - a for a, b in zip(batches, batches[1:], strict=False) if (b - a) and (a & b)]
    assert joined_late, "no request joined a batch that was already running"
    eos = tokenizer.eos_token_id
    for (name, ids, n), request in zip(jobs, requests, strict=True):
        update = results[request.request_id]
        want = peft_greedy(reference, name, ids, n, eos)
        assert update.token_ids == want, (name, n)
        assert update.finish_reason == ("length" if len(want) == n else "stop")


def test_stop_strings_cut_the_text_and_the_stream_agrees(tiny):
    tokenizer, mixed, slots, reference = tiny
    ids = encode_prompt(tokenizer, PROMPTS[1])
    full = tokenizer.decode(peft_greedy(reference, "qv-r2", ids, 24, tokenizer.eos_token_id))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3
    engine = Engine(mixed, tokenizer)
    pieces = []
    request = Request(ids, _greedy(24, stop=(stop, "\x00never")), slots["qv-r2"])
    request.on_update = lambda u: pieces.append(u.text)
    (result,) = engine.run([request])
    assert result.text == full[: full.index(stop)]
    assert result.finish_reason == "stop"
    assert "".join(pieces) == result.text


def test_text_stream_never_sends_part_of_a_stop_string(tiny):
    tokenizer = tiny[0]
    text = "the stop word ends it"
    stream = TextStream(tokenizer, stop=("stop w", "zz"))
    sent = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        sent.append(stream.push(token))
        assert not "".join(sent).endswith(("s", "st", "sto", "stop", "stop "))
        if stream.stopped:
            break
    assert stream.stopped and "".join(sent) == "the "


def test_seeded_sampling_does_not_depend_on_the_batch(tiny):
    tokenizer, mixed, slots, _ = tiny
    ids = encode_chat(tokenizer, [{"role": "user", "content": "Tell me about adapters."}])
    params = SamplingParams(max_tokens=12, temperature=1.3, top_p=0.9, seed=1234, ignore_eos=True)
    alone = Engine(mixed, tokenizer).run([Request(ids, params, slots["all-r4-rs"])])[0]
    crowd = [Request(encode_prompt(tokenizer, p), params, slots["mlp-r2"]) for p in PROMPTS]
    crowd.insert(3, Request(ids, params, slots["all-r4-rs"]))
    together = Engine(mixed, tokenizer, max_batch_size=3).run(crowd)[3]
    assert together.token_ids == alone.token_ids
    assert len(alone.token_ids) == 12 and alone.finish_reason == "length"
    other = SamplingParams(max_tokens=12, temperature=1.3, top_p=0.9, seed=4321, ignore_eos=True)
    assert Engine(mixed, tokenizer).run([Request(ids, other, 0)])[0].token_ids != alone.token_ids


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]] * 200, dtype=torch.float64)
    probs = torch.softmax(logits[0], dim=-1)  # 0.56, 0.21, 0.13, 0.08, 0.03
    params = SamplingParams(temperature=1.0, top_p=0.8)
    nucleus = {0, 1, 2}  # 0.56 + 0.21 < 0.8 <= 0.56 + 0.21 + 0.13
    assert probs[:2].sum() < 0.8 <= probs[:3].sum()
    gen = torch.Generator().manual_seed(0)
    drawn = pick_tokens(logits.float(), [params] * 200, [gen] * 200)
    assert set(drawn) == nucleus
    assert pick_tokens(logits[:1].float(), [SamplingParams(temperature=0.0)], [gen]) == [0]


def test_limits_and_abort(tiny):
    tokenizer, mixed, slots, _ = tiny
    finished = []
    engine = Engine(mixed, tokenizer, max_model_len=40, on_finish=lambda r, _: finished.append(r))
    with pytest.raises(RequestError, match="maximum context length is 40") as err:
        engine.submit(Request(list(range(30)), _greedy(11)))
    assert err.value.code == "context_length_exceeded" and err.value.status == 400
    with pytest.raises(RequestError, match="empty"):
        engine.submit(Request([], _greedy(1)))
    updates = []
    keep = Request([5, 6, 7], _greedy(20, ignore_eos=True), slots["out-r8"])
    drop = Request([5, 6, 7], _greedy(20, ignore_eos=True), slots["qv-r2"])
    for r in (keep, drop):
        r.on_update = updates.append
        engine.submit(r)
    engine.step()
    engine.step()
    engine.abort(drop.request_id)
    while engine.has_work():
        engine.step()
    ends = {u.request_id: u for u in updates if u.finish_reason}
    assert ends[drop.request_id].finish_reason == "abort"
    assert ends[keep.request_id].finish_reason == "length"
    assert ends[keep.request_id].completion_tokens == 20
    assert [r.request_id for r in finished] == [drop.request_id, keep.request_id]
