"""Requests from a JSONL file and results to one, for `lora-dist generate`.

A request line is a JSON object with "prompt" (a string) or "messages" (a chat, through the
model's chat template), and optionally "model" (an adapter's name; omitted or the base's name:
the bare base), "id", "max_tokens", "temperature", "top_p", "seed", "stop" and "ignore_eos".
A result line is {"id", "model", "text", "finish_reason", "prompt_tokens", "completion_tokens"},
in the order of the requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_dist.atomic import write_jsonl_atomic
from lora_dist.errors import DataError, UserError
from lora_dist.serving.adapters import AdapterRegistry
from lora_dist.serving.engine import Engine, Request, Result
from lora_dist.serving.sampling import SamplingParams
from lora_dist.serving.text import encode_chat, encode_prompt

_FIELDS = {"id", "model", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed"}
_FIELDS |= {"stop", "ignore_eos"}


@dataclass
class Defaults:
    """Settings of requests that do not set them."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0


@dataclass
class Job:
    """One request line, ready for the engine."""

    id: Any
    model: str
    request: Request


def _job(
    row: Any,
    line: int,
    tokenizer: Any,
    registry: AdapterRegistry,
    engine: Engine,
    defaults: Defaults,
) -> Job:
    if not isinstance(row, dict):
        raise UserError("a request must be a JSON object")
    unknown = sorted(set(row) - _FIELDS)
    if unknown:
        raise UserError(f"unknown fields {unknown}; known: {sorted(_FIELDS)}")
    if ("prompt" in row) == ("messages" in row):
        raise UserError('give exactly one of "prompt" and "messages"')
    if "prompt" in row:
        ids = encode_prompt(tokenizer, row["prompt"])
    else:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise UserError('"messages" must be a list of {"role", "content"} objects')
        ids = encode_chat(tokenizer, messages)
    stop = row.get("stop") or []
    params = SamplingParams(
        max_tokens=row.get("max_tokens", defaults.max_tokens),
        temperature=float(row.get("temperature", defaults.temperature)),
        top_p=float(row.get("top_p", defaults.top_p)),
        seed=row.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        ignore_eos=bool(row.get("ignore_eos", False)),
    )
    engine.check(ids, params)
    model = row.get("model") or registry.base_name
    return Job(row.get("id", line), model, Request(ids, params, registry.acquire(model)))


def read_jobs(
    path: Path, tokenizer: Any, registry: AdapterRegistry, engine: Engine, defaults: Defaults
) -> list[Job]:
    """Every request line of `path`; a bad line raises DataError naming the file and line."""
    jobs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
            jobs.append(_job(row, number, tokenizer, registry, engine, defaults))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc})") from exc
        except (UserError, TypeError, ValueError) as exc:
            raise DataError(f"{path}:{number}: {exc}") from exc
    if not jobs:
        raise DataError(f"{path} holds no requests")
    return jobs


def write_results(path: Path, jobs: list[Job], results: list[Result]) -> None:
    """The results as JSONL in request order, written whole or not at all (into a directory
    created if missing)."""
    rows = []
    for job, result in zip(jobs, results, strict=True):
        row = {
            "id": job.id,
            "model": job.model,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
        }
        if result.error:
            row["error"] = result.error
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(path, rows)
