"""Reading users' files: the format from the columns or forced, and bad rows named by file
and line (JSON Lines, JSON arrays, Parquet)."""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import pytest

from lora_dist.data.reading import read_rows
from lora_dist.errors import DataError
from tests.data.chat_data import ALPACA, GOOD, write_jsonl


def test_format_is_detected_or_forced(tmp_path: Path) -> None:
    both = write_jsonl(tmp_path / "both.jsonl", [{**GOOD, "prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match="fit several formats.*--data_format"):
        read_rows(str(both), tmp_path / "cache")
    assert read_rows(str(both), tmp_path / "cache", fmt="completion").fmt == "completion"
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="cannot tell the data format.*--data_format"):
        read_rows(str(odd), tmp_path / "cache")


BAD_CASES = {  # name: (rows, {1-based line: raw text}, the line and kind the error must name)
    "malformed": ([GOOD, GOOD], {2: "", 3: '{"messages": [}'}, 3, "malformed_json"),
    "unknown_role": (
        [GOOD, {"messages": [{"role": "robot", "content": "x"}]}],
        {2: "   "},
        3,
        "unknown_role",
    ),
    "missing": ([GOOD, {"messages": [{"role": "user"}]}], {}, 2, "missing_field"),
    "empty_answer": (
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}],
        {},
        1,
        "empty_assistant",
    ),
    "no_answer": ([GOOD, {"messages": [{"role": "user", "content": "hi"}]}], {}, 2, "no_assistant"),
    "wrong_type": ([GOOD, GOOD, {"messages": "hello"}], {}, 3, "wrong_type"),
}


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_rows_fail_with_file_and_line(tmp_path: Path, name: str) -> None:
    rows, raw, line, kind = BAD_CASES[name]
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows, raw)
    with pytest.raises(DataError, match=re.escape(f"{path}:{line}: {kind}:") + ".*--skip_bad_rows"):
        read_rows(str(path), tmp_path / "cache")


def test_bad_rows_in_json_arrays_and_parquet(tmp_path: Path) -> None:
    array = tmp_path / "rows.json"
    array.write_text(
        '[\n  {"messages": [{"role": "user", "content": "a"},\n'
        '                {"role": "assistant", "content": "b"}]},\n'
        '  {"messages": [\n    {"role": "user", "content": "a"}\n  ]}\n]\n'
    )
    with pytest.raises(DataError, match=re.escape(f"{array}:4: no_assistant")):
        read_rows(str(array), tmp_path / "cache")
    table = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([ALPACA[0], {**ALPACA[1], "output": ""}]).to_parquet(str(table))
    with pytest.raises(DataError, match=re.escape(f"{table}: row 1: empty_assistant")):
        read_rows(str(table), tmp_path / "cache")
