"""The OpenAI-compatible server on 127.0.0.1: the official client, plain HTTP errors, a load test.

Every answer is checked against PEFT running that request's adapter alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

from lora_dist.lora import LoraConfig
from lora_dist.serving.http import serving
from lora_dist.serving.runtime import build
from lora_dist.serving.server import ServerSettings
from lora_dist.serving.text import encode_chat, encode_prompt
from tests.serving.helpers import (
    peft_greedy,
    peft_model,
    random_adapter,
    tiny_adapters,
    tiny_base,
)

PROMPTS = [f"Adapter number {i} says" for i in range(16)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    base_dir = tiny_base(root / "base")
    adapters = tiny_adapters(base_dir, root / "loras")
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    extra_cfg = LoraConfig(r=3, alpha=6.0, targets=["k_proj"])
    extra = random_adapter(base, extra_cfg, root / "loras" / "extra", seed=9)
    reference = peft_model(base, {**adapters, "extra": extra})
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    service = build(base_dir, adapters, base_name="tiny-base", lora_roots=[root / "loras"])
    with serving(service) as url:
        yield url, root, reference, tokenizer, service


def _client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0)


def _expected(served, model, prompt_ids, max_tokens):
    _, _, reference, tokenizer, _ = served
    name = None if model == "tiny-base" else model
    tokens = peft_greedy(reference, name, prompt_ids, max_tokens, tokenizer.eos_token_id)
    return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


def test_models_lists_the_base_and_every_adapter(served):
    listed = _client(served[0]).models.list().data
    assert [m.id for m in listed] == ["tiny-base", "qv-r2", "all-r4-rs", "out-r8", "mlp-r2"]
    assert all(m.parent == "tiny-base" for m in listed[1:]) and listed[0].parent is None


@pytest.mark.parametrize("model", ["tiny-base", "qv-r2", "all-r4-rs", "out-r8", "mlp-r2"])
def test_completion_and_chat_use_the_adapter_named_by_model(served, model):
    client, tokenizer = _client(served[0]), served[3]
    done = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    text, n = _expected(served, model, encode_prompt(tokenizer, PROMPTS[0]), 8)
    assert done.choices[0].text == text and done.usage.completion_tokens == n
    assert done.model == model and done.object == "text_completion"
    messages = [{"role": "user", "content": "What is LoRA?"}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, seed=1, temperature=0
    )
    text, n = _expected(served, model, encode_chat(tokenizer, messages), 6)
    assert chat.choices[0].message.content == text and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == ("length" if n == 6 else "stop")


def test_streaming_sends_the_same_text_as_events(served):
    client, tokenizer = _client(served[0]), served[3]
    stream = client.completions.create(
        model="all-r4-rs", prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    text, _ = _expected(served, "all-r4-rs", encode_prompt(tokenizer, PROMPTS[1]), 10)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    events = client.chat.completions.create(
        model="out-r8",
        messages=messages,
        max_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    events = list(events)
    text, n = _expected(served, "out-r8", encode_chat(tokenizer, messages), 9)
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == text
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == n


def test_adapters_load_and_unload_while_serving(served):
    url, root = served[0], served[1]
    http = httpx.Client(base_url=url, timeout=30)
    loaded = http.post(
        "/v1/load_lora_adapter",
        json={"lora_name": "extra", "lora_path": str(root / "loras" / "extra")},
    )
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["lora_rank"] == 3
    again = http.post(
        "/v1/load_lora_adapter",
        json={"lora_name": "extra", "lora_path": str(root / "loras" / "extra")},
    )
    assert again.status_code == 400 and "taken" in again.json()["error"]["message"]
    client = _client(url)
    done = client.completions.create(model="extra", prompt=PROMPTS[2], max_tokens=7, temperature=0)
    ids = encode_prompt(served[3], PROMPTS[2])
    assert done.choices[0].text == _expected(served, "extra", ids, 7)[0]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
    assert "extra" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="extra", prompt=PROMPTS[2], max_tokens=2)
    gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert not served[4].registry.model.adapters.get(5)  # the slot was freed


def test_a_client_that_leaves_a_stream_aborts_its_request(served):
    url, service = served[0], served[4]
    ends = []
    release = service.engine.on_finish
    service.engine.on_finish = lambda request, update: (
        ends.append(update),
        release(request, update),
    )
    body = {"model": "qv-r2", "prompt": "Go on", "max_tokens": 200, "ignore_eos": True}
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as events:
                next(line for line in events.iter_lines() if line.startswith("data:"))
        deadline = time.monotonic() + 30
        while not ends and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        service.engine.on_finish = release
    assert [u.finish_reason for u in ends] == ["abort"]
    assert ends[0].completion_tokens < 200
    assert service.engine.running == 0 and not any(service.registry._refs.values())


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    return error


def test_bad_requests_get_openai_errors(served):
    url, root = served[0], served[1]
    http = httpx.Client(base_url=url, timeout=30)
    post = http.post
    body = {"model": "nope", "prompt": "hi", "max_tokens": 2}
    assert _error(post("/v1/completions", json=body), 404)["code"] == "model_not_found"
    chat = {"model": "nope", "messages": [{"role": "user", "content": "x" * 2000}]}
    assert _error(post("/v1/chat/completions", json=chat), 404)["param"] == "model"
    bad_json = post(
        "/v1/completions",
        content=b'{"model": "tiny-base", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert "not valid JSON" in _error(bad_json, 400)["message"]
    long = {"model": "qv-r2", "prompt": "adapter " * 300, "max_tokens": 4}
    assert _error(post("/v1/completions", json=long), 400)["code"] == "context_length_exceeded"
    over = {"model": "qv-r2", "prompt": "hi", "max_tokens": 5000}
    assert _error(post("/v1/completions", json=over), 400)["param"] == "max_tokens"
    assert (
        _error(post("/v1/completions", json={**body, "model": "qv-r2", "n": 2}), 400)["param"]
        == "n"
    )
    assert (
        _error(post("/v1/chat/completions", json={"model": "qv-r2", "messages": []}), 400)["param"]
        == "messages"
    )
    assert _error(post("/v1/completions", json={"model": "qv-r2"}), 400)["param"] == "prompt"
    assert _error(http.get("/v1/nothing"), 404)
    assert _error(post("/v1/completions", content=b"x" * (2 << 20)), 413)["code"] == "too_large"
    chunked = post("/v1/completions", content=iter([b"x" * (1 << 19)] * 3))
    assert _error(chunked, 413)["code"] == "too_large"

    def load(name, path):
        return post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})

    other = tiny_base(root / "other-base", hidden=48)
    mismatch = random_adapter(
        LlamaForCausalLM.from_pretrained(other),
        LoraConfig(r=2, targets=["q_proj"]),
        root / "loras" / "mismatch",
        seed=3,
    )
    assert "different base model" in _error(load("m", mismatch), 400)["message"]
    corrupt = root / "loras" / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((mismatch / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00not a header"
    )
    assert "corrupt" in _error(load("c", corrupt), 400)["message"]
    assert _error(load("o", other), 403)["param"] == "lora_path"  # outside the adapter root
    escape = root / "loras" / "escape"
    escape.mkdir()
    (escape / "adapter_config.json").symlink_to(mismatch / "adapter_config.json")
    os.symlink(other / "model.safetensors", escape / "adapter_model.safetensors")
    assert "links outside" in _error(load("e", escape), 403)["message"]
    assert _error(load("bad name!", mismatch), 400)["param"] == "lora_name"
    assert _error(load("n", "a\x00b"), 400)["param"] == "lora_path"
    names = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert names == ["tiny-base", "qv-r2", "all-r4-rs", "out-r8", "mlp-r2"]


def test_api_key_is_required_when_set(served):
    service = build(served[1] / "base", base_name="b")
    settings = ServerSettings(api_key="s3cret-key")
    with serving(service, settings) as url:
        http = httpx.Client(base_url=url, timeout=30)
        assert http.get("/health").status_code == 200
        assert _error(http.get("/v1/models"), 401)["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer s3cret-kez"}
        assert _error(http.get("/v1/models", headers=wrong), 401)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            _client(url, api_key="nope").models.list()
        assert [m.id for m in _client(url, api_key="s3cret-key").models.list().data] == ["b"]
        key = {"Authorization": "Bearer s3cret-key"}
        assert _error(http.post("/v1/load_lora_adapter", json={}, headers=key), 400)


def test_64_concurrent_requests_over_4_adapters(served):
    url, tokenizer = served[0], served[3]
    models = ["qv-r2", "all-r4-rs", "out-r8", "mlp-r2"]
    jobs = [(models[i % 4], PROMPTS[i // 4], 4 + (i // 4) % 5) for i in range(64)]

    async def run_all():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        calls = [
            client.completions.create(model=m, prompt=p, max_tokens=n, temperature=0)
            for m, p, n in jobs
        ]
        try:
            return await asyncio.wait_for(asyncio.gather(*calls), timeout=120)
        finally:
            await client.close()

    start = time.monotonic()
    answers = asyncio.run(run_all())
    elapsed = time.monotonic() - start
    assert elapsed < 60, f"64 requests took {elapsed:.1f} s"
    for (model, prompt, n), answer in zip(jobs, answers, strict=True):
        want, _ = _expected(served, model, encode_prompt(tokenizer, prompt), n)
        assert answer.choices[0].text == want, (model, prompt, n)
        assert answer.model == model
    # The same prompt and length with each adapter: four different answers.
    same = [
        a.choices[0].text for (_, p, n), a in zip(jobs, answers, strict=True) if p == PROMPTS[0]
    ]
    assert len(same) == 4 and len(set(same)) == 4, same
    print(json.dumps({"requests": 64, "seconds": round(elapsed, 2)}))
