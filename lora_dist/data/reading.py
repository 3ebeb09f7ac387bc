"""Reading a data file with `datasets` into checked rows; a bad row is named by file and line.

Sources: a local JSON Lines or JSON-array file (`.jsonl`, `.json`, `.ndjson`), Parquet,
an Arrow file, a `save_to_disk` directory, or a hub dataset name where the cluster is online.
JSON goes through `datasets`' fast Arrow reader; when that reader refuses the file (a malformed
line, a field whose type changes between rows) the file is read again line by line in Python,
which can say which line is wrong and skip it under `--skip_bad_rows`.

Every stage writes a memory-mapped Arrow file under `cache_dir`, named by a fingerprint of its
inputs, so a second process (another rank on the node) opens the files the first one wrote
instead of parsing again. Rows keep `row`, their index in the source, for error messages:
JSON Lines rows map to the n-th non-blank line, JSON-array rows to the line their object
starts on, and Parquet/Arrow rows are named by row number.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc

from lora_dist.data.formats import BAD_KINDS, BadRow, check_format, detect_format, normalize_row
from lora_dist.errors import DataError

READER_VERSION = "1"  # bump when the checked rows change for the same input
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_CHAT = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
_BOOKKEEPING = {
    "row": datasets.Value("int64"),
    "status": datasets.Value("string"),
    "why": datasets.Value("string"),
}
ROW_FEATURES = {
    "chat": datasets.Features({"messages": _CHAT, **_BOOKKEEPING}),
    "completion": datasets.Features(
        {"prompt": datasets.Value("string"), "completion": datasets.Value("string"), **_BOOKKEEPING}
    ),
}
BAD_PREFIX = "bad:"
MAX_REPORTED = 5


def row_features(fmt: str) -> datasets.Features:
    return ROW_FEATURES["completion" if fmt == "completion" else "chat"]


@dataclass
class Rows:
    """A source's usable rows in their format's common shape, and what was skipped."""

    dataset: datasets.Dataset
    fmt: str
    source: str
    skipped: dict[str, int] = field(default_factory=dict)
    """bad-row kind -> rows skipped under --skip_bad_rows"""
    examples: list[str] = field(default_factory=list)
    """the first few skipped rows as 'file:line: kind: detail'"""
    fingerprint: str = ""


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Show (or hide) `datasets`' progress bars inside the block, then restore the setting."""
    was = datasets.utils.logging.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()


def is_user_data(source: str | None) -> bool:
    """Whether `--data` names a user's data file or saved dataset rather than a task's
    release directory: a .jsonl/.json/.ndjson/.parquet/.arrow file or a save_to_disk
    directory. (A hub name is told apart by the caller, e.g. with --data_format.)"""
    if not source:
        return False
    path = Path(source)
    if path.is_file():
        return path.suffix in (*JSON_SUFFIXES, ".parquet", ".arrow")
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    return path.is_dir() and any((path / m).is_file() for m in markers)


def source_stamp(source: str) -> str:
    """What identifies a source's content cheaply: path, size and mtime of every file."""
    path = Path(source)
    if not path.exists():
        return f"hub:{source}"
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    parts = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return "\n".join(parts)


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:24]


# --- where a row is ---------------------------------------------------------------------------


def _is_json_lines(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                return not line.lstrip().startswith("[")
    return True


def _array_object_lines(text: str) -> list[int]:
    """1-based line on which each element of a top-level JSON array starts."""
    decoder = json.JSONDecoder()
    lines, pos, line = [], text.index("[") + 1, 1 + text.count("\n", 0, text.index("["))
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            line += text[pos] == "\n"
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return lines
        lines.append(line)
        _, end = decoder.raw_decode(text, pos)
        line += text.count("\n", pos, end)
        pos = end


def locate_rows(source: str, rows: list[int]) -> dict[int, str]:
    """'file:line' (JSON) or 'file: row N' (anything else) for each source row index."""
    path = Path(source)
    if not (path.is_file() and path.suffix in JSON_SUFFIXES):
        return {r: f"{source}: row {r}" for r in rows}
    wanted, found = set(rows), {}
    if _is_json_lines(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            index = 0
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if index in wanted:
                    found[index] = f"{source}:{number}"
                    if len(found) == len(wanted):
                        break
                index += 1
    else:
        lines = _array_object_lines(path.read_text(encoding="utf-8"))
        found = {r: f"{source}:{lines[r]}" for r in rows if r < len(lines)}
    return {r: found.get(r, f"{source}: row {r}") for r in rows}


# --- reading ----------------------------------------------------------------------------------


def _load_raw(source: str, cache_dir: Path, split: str) -> datasets.Dataset | None:
    """The source as an Arrow-backed dataset; None for a JSON file Arrow's reader refuses."""
    path = Path(source)
    if path.is_dir():
        if not is_user_data(source):
            raise DataError(
                f"{path} is a directory but not a dataset saved with save_to_disk; pass a "
                ".jsonl, .json, .parquet or .arrow file, or a save_to_disk directory"
            )
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded and len(loaded) != 1:
                raise DataError(f"{path} has splits {sorted(loaded)} and no {split!r}")
            loaded = loaded[split] if split in loaded else next(iter(loaded.values()))
        return loaded
    if path.is_file():
        raw_cache = str(cache_dir / "raw")
        if path.suffix in JSON_SUFFIXES:
            try:
                return datasets.load_dataset(
                    "json", data_files=str(path), split="train", cache_dir=raw_cache
                )
            except (datasets.exceptions.DatasetGenerationError, ValueError):
                return None
        if path.suffix == ".parquet":
            return datasets.load_dataset(
                "parquet", data_files=str(path), split="train", cache_dir=raw_cache
            )
        if path.suffix == ".arrow":
            return datasets.Dataset.from_file(str(path))
        raise DataError(
            f"{path}: unknown data file type {path.suffix!r}; use .jsonl, .json, .parquet or "
            ".arrow, or a save_to_disk directory"
        )
    if os.sep in source or path.suffix:
        raise DataError(f"data file {source} does not exist")
    return datasets.load_dataset(source, split=split, cache_dir=str(cache_dir / "hub"))


def _json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(row, object or BadRow) for every record of a JSON Lines or JSON-array file."""
    if not _is_json_lines(path):
        text = path.read_text(encoding="utf-8")
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:  # one array: nothing to skip to
            raise DataError(f"{path}:{exc.lineno}: malformed_json: {exc.msg}") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: a JSON file must hold one array of rows (or JSON Lines)")
        yield from enumerate(items)
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        index = 0
        for line in f:
            if not line.strip():
                continue
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as exc:
                yield index, BadRow("malformed_json", f"{exc.msg} at column {exc.colno}")
            index += 1


def _empty(fmt: str) -> dict[str, Any]:
    return {"prompt": "", "completion": ""} if fmt == "completion" else {"messages": []}


def _checked(row: int, value: Any, fmt: str, require_answer: bool) -> dict[str, Any]:
    try:
        if isinstance(value, BadRow):
            raise value
        out = normalize_row(value, fmt, require_answer)
        return {**out, "row": row, "status": "", "why": ""}
    except BadRow as bad:
        return {**_empty(fmt), "row": row, "status": BAD_PREFIX + bad.kind, "why": bad.detail}


def _python_rows(path: str, fmt: str, require_answer: bool, stamp: str) -> Iterator[dict]:
    del stamp  # only in the generator's arguments, so that datasets' cache key sees it
    for row, value in _json_records(Path(path)):
        yield _checked(row, value, fmt, require_answer)


def _first_object_keys(path: Path) -> list[str]:
    for _, value in _json_records(path):
        if isinstance(value, dict):
            return list(value)
    raise DataError(f"{path}: no JSON object in the file")


def _check_batch(
    batch: dict[str, list], indices: list[int], fmt: str, require_answer: bool
) -> dict[str, list]:
    out: dict[str, list] = {}
    for i, index in enumerate(indices):
        row = {k: v[i] for k, v in batch.items()}
        for k, v in _checked(index, row, fmt, require_answer).items():
            out.setdefault(k, []).append(v)
    return out


def status_counts(ds: datasets.Dataset) -> dict[str, int]:
    """status -> rows ('' for a usable row, 'bad:KIND' for a bad one, others by stage)."""
    counts = pc.value_counts(ds.data.column("status")).to_pylist()
    return {c["values"]: c["counts"] for c in counts}


def settle_bad_rows(
    ds: datasets.Dataset,
    source: str,
    skip: bool,
    cache_dir: Path,
    fp: str,
    keep: tuple[str, ...] = ("",),
) -> tuple[datasets.Dataset, dict[str, int], list[str]]:
    """Raise on the first bad row (file:line, and how many there are), or, under `skip`, keep
    only rows whose status is in `keep`. Returns (rows, bad rows by kind, the first few)."""
    counts = status_counts(ds)
    bad = {s[len(BAD_PREFIX) :]: n for s, n in counts.items() if s.startswith(BAD_PREFIX)}
    examples: list[str] = []
    if bad:
        flagged = ds.filter(
            lambda s: [x.startswith(BAD_PREFIX) for x in s],
            input_columns="status",
            batched=True,
            cache_file_name=str(cache_dir / f"badrows-{fp}.arrow"),
            new_fingerprint=f"badrows-{fp}",
        )
        first = flagged.select(range(min(MAX_REPORTED, len(flagged))))
        where = locate_rows(source, first["row"])
        examples = [
            f"{where[r]}: {s[len(BAD_PREFIX) :]}: {w}"
            for r, s, w in zip(first["row"], first["status"], first["why"], strict=True)
        ]
        if not skip:
            kind = first["status"][0][len(BAD_PREFIX) :]
            total = sum(bad.values())
            more = f"; {total} bad rows in all" if total > 1 else ""
            raise DataError(
                f"{examples[0]} ({BAD_KINDS[kind]}{more}); fix the row, or pass "
                "--skip_bad_rows to skip bad rows and count them"
            )
    if set(counts) <= set(keep):
        return ds, {}, []
    kept = ds.filter(
        lambda s: [x in keep for x in s],
        input_columns="status",
        batched=True,
        cache_file_name=str(cache_dir / f"kept-{fp}.arrow"),
        new_fingerprint=f"kept-{fp}",
    )
    return kept, dict(sorted(bad.items())), examples


def read_rows(
    source: str,
    cache_dir: Path,
    fmt: str | None = None,
    skip_bad_rows: bool = False,
    require_answer: bool = True,
    split: str = "train",
    progress: bool = False,
) -> Rows:
    """Load, detect the format, check every row; bad rows raise DataError or are skipped."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if fmt is not None:
        check_format(fmt)
    stamp = source_stamp(source)
    with progress_bars(progress):
        raw = _load_raw(source, cache_dir, split)
        if raw is None:  # a JSON file Arrow cannot read as a whole: Python, line by line
            keys = _first_object_keys(Path(source))  # a malformed JSON array fails here
            fmt = fmt or detect_format(keys, source)
            fp = fingerprint(READER_VERSION, "python", stamp, fmt, require_answer)
            checked = datasets.Dataset.from_generator(
                _python_rows,
                features=row_features(fmt),
                cache_dir=str(cache_dir / "rows"),
                gen_kwargs={
                    "path": source,
                    "fmt": fmt,
                    "require_answer": require_answer,
                    "stamp": stamp,
                },
                fingerprint=fp,
            )
        else:
            fmt = fmt or detect_format(raw.column_names, source)
            fp = fingerprint(READER_VERSION, "arrow", stamp, split, fmt, require_answer)
            checked = raw.map(
                _check_batch,
                with_indices=True,
                batched=True,
                remove_columns=raw.column_names,
                features=row_features(fmt),
                fn_kwargs={"fmt": fmt, "require_answer": require_answer},
                cache_file_name=str(cache_dir / f"rows-{fp}.arrow"),
                new_fingerprint=f"rows-{fp}",
                desc="checking rows",
            )
        kept, skipped, examples = settle_bad_rows(checked, source, skip_bad_rows, cache_dir, fp)
    if len(kept) == 0:
        raise DataError(f"{source}: no usable rows ({sum(skipped.values())} bad rows skipped)")
    return Rows(kept, fmt, source, skipped, examples, fp)


def skipped_summary(skipped: dict[str, int]) -> str:
    """'3 bad rows skipped (2 malformed_json, 1 unknown_role)' or ''."""
    if not skipped:
        return ""
    kinds = ", ".join(f"{n} {k}" for k, n in Counter(skipped).most_common())
    return f"{sum(skipped.values())} bad rows skipped ({kinds})"
