"""`lora-dist generate` on a JSONL file and `lora-dist serve` as a real process, against PEFT."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import time

import httpx
import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

from lora_dist.cli import main as cli
from lora_dist.serving.text import encode_chat, encode_prompt
from tests import runs
from tests.serving.helpers import peft_greedy, peft_model, tiny_adapters, tiny_base


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("commands")
    base_dir = tiny_base(root / "base")
    adapters = tiny_adapters(base_dir, root / "loras")
    reference = peft_model(LlamaForCausalLM.from_pretrained(base_dir).eval(), adapters)
    return base_dir, adapters, reference, AutoTokenizer.from_pretrained(base_dir)


def _flags(base_dir, adapters) -> list[str]:
    flags = ["--model", str(base_dir)]
    for name, path in adapters.items():
        flags += ["--adapter", f"{name}={path}"]
    return flags


def test_generate_writes_each_requests_answer_in_order(tiny, tmp_path, capsys):
    base_dir, adapters, reference, tokenizer = tiny
    chat = [{"role": "user", "content": "Name an adapter."}]
    rows = [
        {"id": "a", "model": "qv-r2", "prompt": "The base model", "max_tokens": 9},
        {"id": "b", "prompt": "The base model", "max_tokens": 5},
        {"id": "c", "model": "out-r8", "messages": chat, "max_tokens": 7},
        {"model": "all-r4-rs", "prompt": "Rank and alpha", "max_tokens": 12},
        {"id": 5, "model": "mlp-r2", "prompt": "Low rank", "max_tokens": 6, "seed": 3},
        {"id": "f", "model": "qv-r2", "prompt": "Low rank", "max_tokens": 3},
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "results.jsonl"
    flags = ["--input", str(requests), "--output", str(out), "--max_batch_size", "2"]
    assert cli(["generate", *_flags(base_dir, adapters), *flags]) == 0
    assert "6 requests" in capsys.readouterr().out
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == ["a", "b", "c", 4, 5, "f"]  # no id: the line number
    eos = tokenizer.eos_token_id
    for row, result in zip(rows, results, strict=True):
        name = row.get("model")
        if "messages" in row:
            ids = encode_chat(tokenizer, row["messages"])
        else:
            ids = encode_prompt(tokenizer, row["prompt"])
        tokens = peft_greedy(reference, name, ids, row["max_tokens"], eos)
        assert result["text"] == tokenizer.decode(tokens, skip_special_tokens=True), row
        assert result["completion_tokens"] == len(tokens)
        assert result["model"] == (name or "base")

    requests.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"model": "nope", "prompt": "x"}))
    assert cli(["generate", *_flags(base_dir, adapters), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bars
    assert err.startswith("lora-dist generate: error:") and "requests.jsonl:2:" in err
    assert "`nope` does not exist; the models are: base, qv-r2" in err


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            return proc.stdout.readline()
        if proc.poll() is not None:
            break
    raise AssertionError(f"serve printed no address; stderr: {proc.stderr.read()[-2000:]}")


def test_serve_runs_as_a_process_and_stops_on_sigint(tiny):
    base_dir, adapters, reference, tokenizer = tiny
    cmd = [sys.executable, "-m", "lora_dist.cli", "serve", *_flags(base_dir, adapters)]
    cmd += ["--port", "0", "--served_model_name", "tiny", "--log_level", "warning"]
    proc = subprocess.Popen(
        cmd, cwd=runs.REPO, env=runs.run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        line = _read_line(proc, timeout=120)
        url = line.split()[2].removesuffix("/v1")
        assert url.startswith("http://127.0.0.1:"), line
        http = httpx.Client(base_url=url, timeout=60)
        names = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert names == ["tiny", *adapters]
        body = {"model": "out-r8", "prompt": "Served by", "max_tokens": 8, "temperature": 0}
        answer = http.post("/v1/completions", json=body).json()
        ids = encode_prompt(tokenizer, "Served by")
        tokens = peft_greedy(reference, "out-r8", ids, 8, tokenizer.eos_token_id)
        assert answer["choices"][0]["text"] == tokenizer.decode(tokens, skip_special_tokens=True)
        refused = http.post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": "/"})
        assert refused.status_code == 403  # no --lora_root: runtime loading is off
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
