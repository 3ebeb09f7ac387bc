"""prepare_user_data: every format loads, bad rows are counted under --skip_bad_rows, dev
splits, the over-length rule, the tokenization cache, and tokenizing once per node."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from lora_dist.data.chat import IGNORE_INDEX, ChatRenderer
from lora_dist.data.reading import is_user_data
from lora_dist.data.userdata import DataSpec, prepare_user_data
from lora_dist.errors import DataError
from lora_dist.tasks.wikisql import TASK as WIKISQL
from tests import runs
from tests.data.chat_data import ALPACA, CONVERSATIONS, GOOD, smollm2_tokenizer, write_jsonl

ALPACA_MESSAGES = [
    [
        {"role": "user", "content": "Add the numbers.\n\n2 and 2"},
        {"role": "assistant", "content": "4"},
    ],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
]


COMPLETIONS = {"prompt": ["2+2=", "Capital of France:"], "completion": ["4", " Paris <|im_end|>"]}


SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def _spec(train: Path | str, **kw) -> DataSpec:
    return DataSpec(train=str(train), **kw)


def _tokens(split) -> list[tuple[list[int], list[int]]]:
    return [(ex["input_ids"], ex["labels"]) for ex in split.tokens]


def test_every_format_loads(tmp_path: Path, tok) -> None:
    chat = ChatRenderer(tok)
    want_chat = [(i.tolist(), lab.tolist()) for i, lab in chat.encode(CONVERSATIONS)]
    sharegpt = [
        {"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in c]}
        for c in CONVERSATIONS
    ]
    sharegpt_file = tmp_path / "sharegpt.json"
    sharegpt_file.write_text(
        datasets.Dataset.from_list(sharegpt).to_pandas().to_json(orient="records", indent=1)
    )
    alpaca_file = tmp_path / "alpaca.parquet"
    datasets.Dataset.from_list(ALPACA).to_parquet(str(alpaca_file))
    saved = tmp_path / "completion_saved"
    datasets.Dataset.from_dict(COMPLETIONS).save_to_disk(str(saved))
    arrow_file = next(saved.glob("*.arrow"))
    cases = {
        "messages": write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS]),
        "sharegpt": sharegpt_file,
        "alpaca": alpaca_file,
        "completion": arrow_file,
    }
    assert all(is_user_data(str(p)) for p in [*cases.values(), saved])
    assert not is_user_data(str(WIKISQL.sample_dir())) and not is_user_data(None)
    cache = tmp_path / "cache"
    for fmt, path in cases.items():
        data = prepare_user_data(_spec(path), tok, cache)
        assert data.fmt == fmt, path
        if fmt in ("messages", "sharegpt"):
            assert _tokens(data.train) == want_chat
        elif fmt == "alpaca":
            want = [(i.tolist(), lab.tolist()) for i, lab in chat.encode(ALPACA_MESSAGES)]
            assert _tokens(data.train) == want
    # save_to_disk directory and its Arrow file: the same rows; BOS + prompt + completion + EOS,
    # loss on completion + EOS, the literal <|im_end|> in the completion stays text
    from_dir = prepare_user_data(_spec(saved), tok, cache)
    from_file = prepare_user_data(_spec(arrow_file), tok, cache)
    assert _tokens(from_dir.train) == _tokens(from_file.train)
    kw = {"add_special_tokens": False, "split_special_tokens": True}
    for (ids, labels), p, c in zip(_tokens(from_dir.train), *COMPLETIONS.values(), strict=True):
        p_ids, c_ids = tok(p, **kw)["input_ids"], tok(c, **kw)["input_ids"]
        assert ids == [tok.bos_token_id, *p_ids, *c_ids, tok.eos_token_id]
        assert labels == [IGNORE_INDEX] * (1 + len(p_ids)) + c_ids + [tok.eos_token_id]
    assert ids.count(tok.eos_token_id) == 1


def test_skip_bad_rows_counts_them_by_kind(tmp_path: Path, tok) -> None:
    rows = [GOOD, {"messages": [{"role": "robot", "content": "x"}]}, GOOD, {"messages": "str"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows + [GOOD], {2: "{not json", 7: "[1, 2]"})
    data = prepare_user_data(_spec(path, skip_bad_rows=True), tok, tmp_path / "cache")
    report = data.report()["train"]
    assert report["bad_rows_skipped"] == {
        "malformed_json": 1,
        "not_an_object": 1,
        "unknown_role": 1,
        "wrong_type": 1,
    }
    assert report["bad_row_examples"][0].startswith(f"{path}:2: malformed_json")
    assert [e.split(": ")[0] for e in report["bad_row_examples"]] == [
        f"{path}:{n}" for n in (2, 3, 5, 7)
    ]
    assert report["examples"] == len(data.train.tokens) == 3
    refusing = tmp_path / "refusing.jinja"
    refusing.write_text(
        "{% for m in messages %}{% if m['content'] == 'refused' %}{{ raise_exception('no') }}"
        "{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    )
    refused = {"messages": [{"role": "user", "content": "refused"}, *GOOD["messages"][1:]]}
    path = write_jsonl(tmp_path / "refused.jsonl", [GOOD, refused, GOOD])
    spec = _spec(path, chat_template=str(refusing))
    with pytest.raises(DataError, match=re.escape(f"{path}:2: template_error: no")):
        prepare_user_data(spec, tok, tmp_path / "cache")
    skipped = prepare_user_data(
        _spec(path, chat_template=str(refusing), skip_bad_rows=True), tok, tmp_path / "cache"
    )
    assert skipped.train.report["template_refused"] == {"template_error": 1}
    assert len(skipped.train.tokens) == 2


def test_dev_file_or_seeded_dev_fraction(tmp_path: Path, tok) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(20)
    ]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    cache = tmp_path / "cache"
    a = prepare_user_data(_spec(path, dev_fraction=0.25, seed=1), tok, cache)
    train, dev = list(a.train.tokens["row"]), list(a.dev.tokens["row"])
    assert len(dev) == 5 and sorted(train + dev) == list(range(20))
    assert [m[-1]["content"] for m in a.dev.rows["messages"]] == [f"a{i}" for i in dev]
    again = prepare_user_data(_spec(path, dev_fraction=0.25, seed=1), tok, cache)
    assert list(again.dev.tokens["row"]) == dev
    other_seed = prepare_user_data(_spec(path, dev_fraction=0.25, seed=2), tok, cache)
    assert list(other_seed.dev.tokens["row"]) != dev
    dev_file = write_jsonl(tmp_path / "dev.jsonl", rows[:3])
    b = prepare_user_data(_spec(path, dev=str(dev_file)), tok, cache)
    assert len(b.train.tokens) == 20 and b.dev.report["source"] == str(dev_file)
    assert _tokens(b.dev) == _tokens(b.train)[:3]


def test_overlong_rows_are_truncated_or_dropped_and_counted(tmp_path: Path, tok) -> None:
    long_answer = " ".join(f"word{i}" for i in range(60))
    late = [{"role": "user", "content": long_answer}, CONVERSATIONS[2][3]]  # answer past the cut
    rows = [
        {"messages": CONVERSATIONS[2][:2]},
        {
            "messages": CONVERSATIONS[2][:2]
            + [{"role": "user", "content": "x"}, {"role": "assistant", "content": long_answer}]
        },
        {"messages": late},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    full = ChatRenderer(tok).encode([r["messages"] for r in rows])
    lengths = [len(ids) for ids, _ in full]
    max_length = lengths[0] + 10
    assert lengths[1] > max_length and lengths[2] > max_length
    cut = prepare_user_data(_spec(path, max_length=max_length), tok, tmp_path / "cache")
    r = cut.train.report
    assert r["truncated"] == 1 and r["dropped"] == {"no_loss_after_truncation": 1}
    [(ids0, lab0), (ids1, lab1)] = _tokens(cut.train)
    assert ids0 == full[0][0].tolist() and lab0 == full[0][1].tolist()
    assert ids1 == full[1][0][:max_length].tolist() and lab1 == full[1][1][:max_length].tolist()
    dropped = prepare_user_data(
        _spec(path, max_length=max_length, overlong="drop"), tok, tmp_path / "cache"
    )
    assert dropped.train.report["dropped"] == {"over_max_length": 2}
    assert _tokens(dropped.train) == [(ids0, lab0)]
    # prompt/completion: the prompt loses tokens from the left, BOS stays
    comp = write_jsonl(tmp_path / "comp.jsonl", [{"prompt": long_answer, "completion": "end"}])
    data = prepare_user_data(_spec(comp, max_length=12), tok, tmp_path / "cache")
    [(ids, labels)] = _tokens(data.train)
    kw = {"add_special_tokens": False, "split_special_tokens": True}
    p_ids, c_ids = tok(long_answer, **kw)["input_ids"], tok("end", **kw)["input_ids"]
    tail = p_ids[len(p_ids) - (12 - 2 - len(c_ids)) :]
    assert ids == [tok.bos_token_id, *tail, *c_ids, tok.eos_token_id]


def test_tokenized_once_then_opened_from_the_cache(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    first = prepare_user_data(_spec(path, dev_fraction=0.34), tok, tmp_path / "cache")
    files = sorted(f["filename"] for f in first.train.tokens.cache_files)
    stamps = [Path(f).stat().st_mtime_ns for f in files]
    second = prepare_user_data(_spec(path, dev_fraction=0.34), tok, tmp_path / "cache")
    assert sorted(f["filename"] for f in second.train.tokens.cache_files) == files
    assert [Path(f).stat().st_mtime_ns for f in files] == stamps  # not written again
    assert isinstance(second.train.tokens.data, datasets.table.MemoryMappedTable)
    assert _tokens(second.train) == _tokens(first.train)
    other = prepare_user_data(
        _spec(path, dev_fraction=0.34, max_length=64), tok, tmp_path / "cache"
    )
    assert sorted(f["filename"] for f in other.train.tokens.cache_files) != files


@pytest.mark.multirank
def test_two_ranks_tokenize_once(tmp_path: Path, tok) -> None:
    """Local rank 0 tokenizes; rank 1 opens its Arrow files without tokenizing anything."""
    tok_dir = tmp_path / "tokenizer"
    tok.save_pretrained(str(tok_dir))
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS] * 4)
    out = tmp_path / "out"
    out.mkdir()
    port = str(runs.free_port())
    probe = [sys.executable, str(runs.REPO / "tests" / "data" / "userdata_probe.py")]
    probe += [str(tok_dir), str(data), str(tmp_path / "cache"), str(out)]
    procs = [
        subprocess.Popen(
            probe,
            cwd=runs.REPO,
            env=runs.run_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    first, second = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert first["calls"] > 0 and second["calls"] == 0
    assert first["files"] == second["files"] and first["input_ids"] == second["input_ids"]
