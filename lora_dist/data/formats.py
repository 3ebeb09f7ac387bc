"""Users' own data formats: which one a file is, and each row checked and put in one shape.

Four formats, told apart by their columns (or forced with `--data_format`):

| format | columns | becomes |
|---|---|---|
| `messages` (OpenAI) | `messages`: [{role, content}]; system, user, assistant | the same |
| `sharegpt` | `conversations`: [{from, value}]; system, human, gpt | messages |
| `alpaca` | `instruction`, `input` (optional), `output` | user, assistant |
| `completion` | `prompt`, `completion` | plain text, no chat template |

Alpaca's user turn is the instruction, then a blank line and the input when there is one.

A row that cannot be used raises `BadRow` with a kind (one of `BAD_KINDS`) and a detail; the
reader turns it into a `DataError` naming the file and line, or counts it under
`--skip_bad_rows`. An assistant turn (or output, or completion) that is empty or only
whitespace is a bad row of kind `empty_assistant`: training on it would teach the model to
answer with nothing, so it is never silently kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lora_dist.errors import DataError

FORMATS = ("messages", "sharegpt", "alpaca", "completion")
CHAT_FORMATS = ("messages", "sharegpt", "alpaca")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
BAD_KINDS = {
    "malformed_json": "the line is not valid JSON",
    "not_an_object": "the row is not a JSON object",
    "missing_field": "a required field is missing or null",
    "wrong_type": "a field has the wrong type",
    "unknown_role": "a turn has a role that is not system, user or assistant",
    "empty_assistant": "an assistant turn, output or completion is empty",
    "no_assistant": "the conversation has no assistant turn to learn from",
    "template_error": "the chat template refused the conversation",
}
# The columns that identify each format; the first format whose columns are all present wins
# only if no other format matches too.
_SIGNATURES = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("completion", ("prompt", "completion")),
)


class BadRow(Exception):
    """One unusable row: `kind` is a key of BAD_KINDS, `detail` says what exactly."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def detect_format(columns: Iterable[str], where: str) -> str:
    """The format whose identifying columns are present; DataError if none or several fit."""
    present = set(columns)
    found = [name for name, need in _SIGNATURES if set(need) <= present]
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(
            f"{where}: cannot tell the data format from the columns {sorted(present)}; expected "
            "'messages', 'conversations', 'instruction'+'output' or 'prompt'+'completion', or "
            "name it with --data_format"
        )
    raise DataError(
        f"{where}: the columns {sorted(present)} fit several formats ({', '.join(found)}); "
        "choose one with --data_format"
    )


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise DataError(f"unknown --data_format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def _field(row: dict[str, Any], name: str, kind: type = str) -> Any:
    value = row.get(name)
    if value is None:
        raise BadRow("missing_field", f"no {name!r}")
    if not isinstance(value, kind):
        raise BadRow("wrong_type", f"{name!r} is {type(value).__name__}, not {kind.__name__}")
    return value


def _turns(items: list[Any], role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    turns = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRow("wrong_type", f"turn {i} is {type(item).__name__}, not an object")
        role, text = item.get(role_key), item.get(text_key)
        if role is None or text is None:
            missing = role_key if role is None else text_key
            raise BadRow("missing_field", f"turn {i} has no {missing!r}")
        if not isinstance(role, str) or not isinstance(text, str):
            raise BadRow("wrong_type", f"turn {i}: {role_key!r} and {text_key!r} must be strings")
        if role not in roles:
            raise BadRow("unknown_role", f"turn {i} has {role_key} {role!r}")
        turns.append({"role": roles[role], "content": text})
    return turns


def _check_answers(messages: list[dict[str, str]], require_answer: bool) -> None:
    if not messages:
        raise BadRow("missing_field", "the conversation is empty")
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if require_answer and not assistant:
        raise BadRow("no_assistant", "no assistant turn")
    for i in assistant:
        if not messages[i]["content"].strip():
            raise BadRow("empty_assistant", f"turn {i} (assistant) is empty")


def normalize_row(row: Any, fmt: str, require_answer: bool = True) -> dict[str, Any]:
    """The row in its format's common shape: {"messages": [...]} for the chat formats,
    {"prompt", "completion"} for `completion`. Raises BadRow.

    `require_answer=False` (evaluation sets) lets a conversation end without an assistant turn
    and a completion be absent: the model's answer is then generated and not scored.
    """
    if not isinstance(row, dict):
        raise BadRow("not_an_object", f"the row is {type(row).__name__}")
    if fmt == "messages":
        items = _field(row, "messages", list)
        messages = _turns(items, "role", "content", {r: r for r in ROLES})
    elif fmt == "sharegpt":
        items = _field(row, "conversations", list)
        messages = _turns(items, "from", "value", SHAREGPT_ROLES)
    elif fmt == "alpaca":
        instruction = _field(row, "instruction")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise BadRow("wrong_type", f"'input' is {type(extra).__name__}, not str")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [{"role": "user", "content": user}]
        if require_answer or row.get("output") is not None:
            messages.append({"role": "assistant", "content": _field(row, "output")})
    elif fmt == "completion":
        prompt = _field(row, "prompt")
        if not require_answer and row.get("completion") is None:
            return {"prompt": prompt, "completion": None}
        completion = _field(row, "completion")
        if not completion.strip():
            raise BadRow("empty_assistant", "'completion' is empty")
        return {"prompt": prompt, "completion": completion}
    else:
        check_format(fmt)
    _check_answers(messages, require_answer)
    return {"messages": messages}
