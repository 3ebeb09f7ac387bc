"""Free-form evaluation: prompts and references from chat and completion rows, exact match and
ROUGE-L, and sharded greedy generation against a plain greedy loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lora_dist.atomic import write_jsonl_atomic
from lora_dist.data.chat import ChatRenderer
from lora_dist.data.freeform import (
    evaluate_generations,
    generation_items,
    perplexity,
    score_generations,
)
from lora_dist.data.reading import read_rows
from tests.data.chat_data import CONVERSATIONS, smollm2_tokenizer, write_jsonl
from tests.tiny_models import tiny_llama

MAX_NEW = 6


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def _chat_items(tmp_path: Path, tok):
    path = write_jsonl(tmp_path / "eval.jsonl", [{"messages": c} for c in CONVERSATIONS])
    rows = read_rows(str(path), tmp_path / "cache", require_answer=False)
    return generation_items(rows.dataset, rows.fmt, tok, ChatRenderer(tok))


def test_prompts_and_references(tmp_path: Path, tok) -> None:
    items = _chat_items(tmp_path, tok)
    asked = [CONVERSATIONS[0][:-1], CONVERSATIONS[1][:-1], CONVERSATIONS[2]]
    for item, conv in zip(items, asked, strict=True):
        want = tok.apply_chat_template(
            conv, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert item.prompt_ids == want and tok.decode(want) == item.prompt
    assert [it.reference for it in items] == [
        CONVERSATIONS[0][-1]["content"],
        CONVERSATIONS[1][-1]["content"],
        None,  # ends on a user turn: generated, not scored
    ]
    path = write_jsonl(
        tmp_path / "comp.jsonl", [{"prompt": "2+2=", "completion": "4"}, {"prompt": "Hi"}]
    )
    rows = read_rows(str(path), tmp_path / "cache", require_answer=False)
    items = generation_items(rows.dataset, rows.fmt, tok, None)
    assert [it.prompt_ids for it in items] == [
        [tok.bos_token_id, *tok("2+2=", add_special_tokens=False)["input_ids"]],
        [tok.bos_token_id, *tok("Hi", add_special_tokens=False)["input_ids"]],
    ]
    assert [it.reference for it in items] == ["4", None]


def _lcs_f1(pred: str, ref: str) -> float:
    p, r = pred.split(), ref.split()
    table = [[0] * (len(r) + 1) for _ in range(len(p) + 1)]
    for i, a in enumerate(p):
        for j, b in enumerate(r):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if a == b else max(table[i][j + 1], table[i + 1][j])
            )
    lcs = table[-1][-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def test_exact_match_and_rouge_l() -> None:
    preds = ["the cat sat", "a b c d", "x", "unscored"]
    refs = ["the  cat\nsat", "a c d e", "y", None]
    got = score_generations(preds, refs)
    assert got["n_scored"] == 3 and got["exact_match"] == pytest.approx(100 / 3)
    want = 100 * sum(_lcs_f1(p, r) for p, r in zip(preds[:3], refs[:3], strict=True)) / 3
    assert got["rougeL"] == pytest.approx(want)
    assert score_generations(["x"], [None]) == {"n_scored": 0}
    assert perplexity(math.log(7.0)) == pytest.approx(7.0) and perplexity(1e4) == math.inf


def _greedy(model, tok, prompt_ids: list[int]) -> str:
    """Argmax, one token at a time, the whole sequence every step, no cache."""
    ids, out = torch.tensor([prompt_ids]), []
    eos = {tok.eos_token_id, model.generation_config.eos_token_id}
    with torch.no_grad():
        for _ in range(MAX_NEW):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt in eos:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out, skip_special_tokens=True).strip()


def test_sharded_generations_match_a_plain_greedy_loop(tmp_path: Path, tok) -> None:
    model = tiny_llama(seed=4, vocab_size=len(tok), max_position_embeddings=256)
    items = _chat_items(tmp_path, tok)
    expected = [_greedy(model, tok, it.prompt_ids) for it in items]
    assert any(expected)
    # make the first reference the model's own answer: that row scores an exact match
    items[0] = type(items[0])(items[0].prompt_ids, items[0].prompt, expected[0], items[0].row)
    metrics, records = evaluate_generations(model, tok, items, 0, 1, MAX_NEW, batch_size=2)
    assert [r["prediction"] for r in records] == expected
    assert metrics["n_scored"] == 2 and metrics["exact_match"] == 50.0
    assert metrics == score_generations(expected, [it.reference for it in items])
    # two data-parallel shards, run one after the other, gathered on "rank 0"
    sent: list = []
    none, _ = evaluate_generations(
        model, tok, items, 1, 2, MAX_NEW, 2, gather=lambda part: sent.append(part)
    )
    assert none == {}
    sharded, sharded_records = evaluate_generations(
        model, tok, items, 0, 2, MAX_NEW, 2, gather=lambda part: [part, *sent]
    )
    assert sharded == metrics and sharded_records == records
    (tmp_path / "out").mkdir()
    write_jsonl_atomic(tmp_path / "out" / "generations.jsonl", records)
    lines = (tmp_path / "out" / "generations.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    assert set(records[0]) == {"index", "row", "prompt", "prediction", "reference"}


def test_eval_command_on_a_chat_file_with_the_default_model(tmp_path: Path, monkeypatch) -> None:
    """`lora-dist eval --data chats.jsonl` answers with SmolLM2 itself: the answer it is known
    to give scores an exact match, a wrong reference does not, a user-final row is unscored."""
    from lora_dist.cli import main as cli_main
    from lora_dist.models import resolve_model_dir
    from tests import runs

    monkeypatch.setenv("LORA_DIST_CACHE", str(runs.CACHE))
    question = [{"role": "user", "content": "What is the capital of France?"}]
    rows = [
        {
            "messages": [
                *question,
                {"role": "assistant", "content": "The capital of France is Paris."},
            ]
        },
        {"messages": [*question, {"role": "assistant", "content": "Lyon, obviously."}]},
        {"messages": question},
    ]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    out = tmp_path / "eval"
    model = str(resolve_model_dir(None, runs.CACHE))
    flags = ["--model", model, "--data", str(data), "--max_new_tokens", "12", "--batch_size", "3"]
    assert cli_main(["eval", "--output_dir", str(out), *flags]) == 0
    payload = json.loads((out / "eval.json").read_text())
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in records] == ["The capital of France is Paris."] * 3
    assert payload["format"] == "messages" and payload["metrics"]["n_scored"] == 2
    assert payload["metrics"]["exact_match"] == 50.0
    assert [r["reference"] for r in records] == [
        "The capital of France is Paris.",
        "Lyon, obviously.",
        None,
    ]
