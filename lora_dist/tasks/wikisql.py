"""WikiSQL: a question over one table becomes a SQL query, scored by logical form and by SQLite."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from lora_dist.errors import DataError, MissingDataFile

AGG_OPS = ("", "MAX", "MIN", "COUNT", "SUM", "AVG")
COND_OPS = ("=", ">", "<", "OP")
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "assets" / "wikisql"

# `conds` mixes ints with str/int/float values, which Arrow cannot type: each value is stored
# as text plus a type tag, and `sql_of` turns it back into the exact original value.
FEATURES = datasets.Features(
    {
        "phase": datasets.Value("int64"),
        "table_id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "sql": {
            "sel": datasets.Value("int64"),
            "agg": datasets.Value("int64"),
            "conds": datasets.List(
                {
                    "column": datasets.Value("int64"),
                    "op": datasets.Value("int64"),
                    "value": datasets.Value("string"),
                    "value_type": datasets.Value("string"),
                }
            ),
        },
        "header": datasets.List(datasets.Value("string")),
        "types": datasets.List(datasets.Value("string")),
    }
)
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def _is_value(v: Any) -> bool:
    return isinstance(v, (str, int, float)) and not isinstance(v, bool)


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line."""
    if not path.is_file():
        raise MissingDataFile(f"WikiSQL file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, obj


def _table_problem(t: dict[str, Any]) -> str | None:
    for key in ("id", "header", "types", "rows"):
        if key not in t:
            return f"table is missing field {key!r}"
    header, types, rows = t["header"], t["types"], t["rows"]
    if not isinstance(t["id"], str) or not t["id"]:
        return "table 'id' must be a non-empty string"
    if not isinstance(header, list) or not header or not all(isinstance(h, str) for h in header):
        return "'header' must be a non-empty list of strings"
    if not isinstance(types, list) or len(types) != len(header):
        return f"'types' must list one type per column ({len(header)})"
    if any(ty not in ("text", "real") for ty in types):
        return "'types' entries must be 'text' or 'real'"
    if not isinstance(rows, list):
        return "'rows' must be a list"
    for i, r in enumerate(rows):
        if not isinstance(r, list) or len(r) != len(header) or not all(map(_is_value, r)):
            return f"row {i} must be a list of {len(header)} strings or numbers"
    return None


def load_tables(path: Path) -> dict[str, dict[str, Any]]:
    """Read a `*.tables.jsonl` file into {table_id: table}, validating every line."""
    tables: dict[str, dict[str, Any]] = {}
    for lineno, t in _read_jsonl(path):
        problem = _table_problem(t)
        if problem is None and t["id"] in tables:
            problem = f"duplicate table id {t['id']!r}"
        if problem:
            raise DataError(f"{path}:{lineno}: {problem}")
        tables[t["id"]] = t
    return tables


def _question_problem(q: dict[str, Any], tables: dict[str, dict[str, Any]]) -> str | None:
    for key in ("phase", "table_id", "question", "sql"):
        if key not in q:
            return f"missing field {key!r}"
    if not isinstance(q["question"], str) or not isinstance(q["phase"], int):
        return "'question' must be a string and 'phase' an integer"
    if q["table_id"] not in tables:
        return f"table_id {q['table_id']!r} has no table in the tables file"
    sql, n_cols = q["sql"], len(tables[q["table_id"]]["header"])
    if not isinstance(sql, dict) or any(k not in sql for k in ("sel", "agg", "conds")):
        return "'sql' must have 'sel', 'agg' and 'conds'"
    if not _is_index(sql["sel"], n_cols):
        return f"'sel' {sql['sel']!r} is not a column index of a {n_cols}-column table"
    if not _is_index(sql["agg"], len(AGG_OPS)):
        return f"'agg' {sql['agg']!r} is not an index into {list(AGG_OPS)}"
    if not isinstance(sql["conds"], list):
        return "'conds' must be a list"
    for cond in sql["conds"]:
        if not isinstance(cond, list) or len(cond) != 3:
            return f"condition {cond!r} must be [column, op, value]"
        if not _is_index(cond[0], n_cols) or not _is_index(cond[1], len(COND_OPS)):
            return f"condition {cond!r} has a bad column or operator index"
        if not _is_value(cond[2]):
            return f"condition {cond!r} value must be a string or number"
    return None


def _is_index(v: Any, n: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n


def _encode_value(v: str | int | float) -> dict[str, str]:
    if isinstance(v, str):
        return {"value": v, "value_type": "str"}
    return {"value": repr(v), "value_type": type(v).__name__}


def _decode_value(text: str, value_type: str) -> str | int | float:
    return {"str": str, "int": int, "float": float}[value_type](text)


def load_split(data_dir: Path, split: str) -> datasets.Dataset:
    """Load `<split>.jsonl` and `<split>.tables.jsonl`; each row also gets its table's header."""
    data_dir = Path(data_dir)
    tables = load_tables(data_dir / f"{split}.tables.jsonl")
    path = data_dir / f"{split}.jsonl"
    rows = []
    for lineno, q in _read_jsonl(path):
        problem = _question_problem(q, tables)
        if problem:
            raise DataError(f"{path}:{lineno}: {problem}")
        table = tables[q["table_id"]]
        sql = q["sql"]
        conds = [{"column": c, "op": o, **_encode_value(v)} for c, o, v in sql["conds"]]
        rows.append(
            {
                "phase": q["phase"],
                "table_id": q["table_id"],
                "question": q["question"],
                "sql": {"sel": sql["sel"], "agg": sql["agg"], "conds": conds},
                "header": table["header"],
                "types": table["types"],
            }
        )
    return datasets.Dataset.from_list(rows, features=FEATURES)


def sql_of(row: dict[str, Any]) -> dict[str, Any]:
    """The row's query in WikiSQL's own form {"sel", "agg", "conds": [[col, op, value], ...]}."""
    sql = row["sql"]
    conds = []
    for cond in sql["conds"]:
        if isinstance(cond, dict):  # a row from `load_split`
            value = _decode_value(cond["value"], cond["value_type"])
            conds.append([cond["column"], cond["op"], value])
        else:
            conds.append(list(cond))
    return {"sel": sql["sel"], "agg": sql["agg"], "conds": conds}


# --- SQL text: one canonical form, and a parser back to (sel, agg, conds) ---


def quote_identifier(name: str) -> str:
    """SQL identifier quoting: the name can contain anything, including quotes and keywords."""
    return '"' + name.replace('"', '""') + '"'


def _literal(v: str | int | float) -> str:
    return "'" + v.replace("'", "''") + "'" if isinstance(v, str) else repr(v)


def format_sql(sql: dict[str, Any], header: list[str], table_id: str | None = None) -> str:
    """Canonical text: `SELECT COUNT("Name") FROM table WHERE "Team" = 'Leeds' AND "Age" > 3`.

    Like WikiSQL's own logical forms the table is called `table`, unless `table_id` is given.
    """
    col = quote_identifier(header[sql["sel"]])
    agg = AGG_OPS[sql["agg"]]
    text = f"SELECT {agg}({col})" if agg else f"SELECT {col}"
    text += " FROM " + (quote_identifier(table_id) if table_id is not None else "table")
    conds = [
        f"{quote_identifier(header[c])} {COND_OPS[o]} {_literal(v)}" for c, o, v in sql["conds"]
    ]
    return text + (" WHERE " + " AND ".join(conds) if conds else "")


_TOKEN = re.compile(
    r"""\s*(?:(?P<ident>"(?:[^"]|"")*")|(?P<str>'(?:[^']|'')*')|(?P<num>-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"""
    r"""|(?P<word>[A-Za-z_]+)|(?P<sym>[()=<>]))"""
)


def _tokens(text: str) -> list[tuple[str, str]] | None:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            return None if text[pos:].strip() else out
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def parse_sql(text: str, header: list[str]) -> dict[str, Any] | None:
    """Parse text in `format_sql`'s form back to {"sel", "agg", "conds"}; None if malformed."""
    toks = _tokens(text.strip())
    if not toks:
        return None
    lower = {h.lower(): i for i, h in reversed(list(enumerate(header)))}
    pos = 0

    def take(kind: str, value: str | None = None) -> str | None:
        nonlocal pos
        if pos < len(toks) and toks[pos][0] == kind:
            if value is None or toks[pos][1].upper() == value:
                pos += 1
                return toks[pos - 1][1]
        return None

    def column() -> int | None:
        ident = take("ident")
        if ident is None:
            return None
        name = ident[1:-1].replace('""', '"')
        return header.index(name) if name in header else lower.get(name.lower())

    if take("word", "SELECT") is None:
        return None
    agg = 0
    if pos < len(toks) and toks[pos][0] == "word" and toks[pos][1].upper() in AGG_OPS[1:]:
        agg = AGG_OPS.index(toks[pos][1].upper())
        pos += 1
        if take("sym", "(") is None:
            return None
    sel = column()
    if sel is None or (agg and take("sym", ")") is None):
        return None
    if take("word", "FROM") is None or (take("word", "TABLE") is None and take("ident") is None):
        return None
    conds: list[list[Any]] = []
    if take("word", "WHERE") is not None:
        while True:
            col = column()
            op = take("sym") or take("word", "OP")
            if col is None or op is None or op.upper() not in COND_OPS:
                return None
            if (lit := take("str")) is not None:
                value: str | int | float = lit[1:-1].replace("''", "'")
            elif (num := take("num")) is not None:
                value = int(num) if re.fullmatch(r"-?\d+", num) else float(num)
            else:
                return None
            conds.append([col, COND_OPS.index(op.upper()), value])
            if take("word", "AND") is None:
                break
    return {"sel": sel, "agg": agg, "conds": conds} if pos == len(toks) else None


def _norm_value(v: str | int | float) -> str | float:
    """Case and whitespace do not matter; numbers compare numerically."""
    if isinstance(v, (int, float)):
        return float(v)
    s = " ".join(v.split()).lower()
    return float(s) if _NUMBER.fullmatch(s) else s


def same_logical_form(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal select column, aggregation and set of conditions (their order does not matter)."""

    def key(sql: dict[str, Any]) -> tuple[int, int, frozenset[tuple[int, int, str | float]]]:
        return sql["sel"], sql["agg"], frozenset((c, o, _norm_value(v)) for c, o, v in sql["conds"])

    return key(a) == key(b)


# --- Execution in SQLite: names always quoted, values always bound as parameters ---


def _column_names(header: list[str]) -> list[str]:
    """SQLite column names are case-insensitive and must be unique: suffix any repeats."""
    names: list[str] = []
    seen: set[str] = set()
    for i, h in enumerate(header):
        name = h
        while name.lower() in seen:
            name = f"{name} ({i})"
        seen.add(name.lower())
        names.append(name)
    return names


def load_database(tables: Iterable[dict[str, Any]]) -> sqlite3.Connection:
    """An in-memory, read-only SQLite database with one table per WikiSQL table id."""
    conn = sqlite3.connect(":memory:")
    for t in tables:
        cols = ", ".join(
            f"{quote_identifier(n)} {'REAL' if ty == 'real' else 'TEXT'}"
            for n, ty in zip(_column_names(t["header"]), t["types"], strict=True)
        )
        table = quote_identifier(t["id"])
        conn.execute(f"CREATE TABLE {table} ({cols})")
        marks = ", ".join("?" * len(t["header"]))
        conn.executemany(f"INSERT INTO {table} VALUES ({marks})", t["rows"])
    conn.commit()
    conn.execute("PRAGMA query_only = ON")
    return conn


def execute(conn: sqlite3.Connection, table_id: str, sql: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Run `sql` on `table_id`; rows come back sorted and numbers rounded, to compare as sets."""
    table = quote_identifier(table_id)
    info = conn.execute(f"PRAGMA table_info({table})").fetchall()
    if not info:
        raise sqlite3.OperationalError(f"no table {table_id!r}")
    names, types = [r[1] for r in info], [r[2] for r in info]
    col = quote_identifier(names[sql["sel"]])
    agg = AGG_OPS[sql["agg"]]
    query = f"SELECT {agg}({col}) FROM {table}" if agg else f"SELECT {col} FROM {table}"
    where, params = [], []
    for c, o, v in sql["conds"]:
        if COND_OPS[o] == "OP":
            raise sqlite3.OperationalError("condition operator 'OP' has no SQL meaning")
        name, op = quote_identifier(names[c]), COND_OPS[o]
        number = float(v) if not isinstance(v, str) or _NUMBER.fullmatch(v.strip()) else None
        if types[c] == "REAL" or (op != "=" and number is not None):
            lhs = name if types[c] == "REAL" else f"CAST({name} AS REAL)"
            where.append(f"{lhs} {op} ?")
            params.append(number if number is not None else v)
        else:  # text equality ignores case and surrounding spaces, as WikiSQL's own engine does
            where.append(f"lower(trim({name})) {op} lower(trim(?))")
            params.append(v if isinstance(v, str) else _literal(v))
    if where:
        query += " WHERE " + " AND ".join(where)
    rows = conn.execute(query, params).fetchall()
    norm = [tuple(round(x, 6) if isinstance(x, float) else x for x in r) for r in rows]
    return sorted(norm, key=repr)


def _tables_for(data_dir: Path, wanted: set[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(data_dir).glob("*.tables.jsonl")):
        found.update({k: v for k, v in load_tables(path).items() if k in wanted})
    missing = wanted - found.keys()
    if missing:
        raise DataError(f"no table in {data_dir}/*.tables.jsonl for ids {sorted(missing)[:5]}")
    return found


def score(predictions: list[str], rows: list[dict[str, Any]], data_dir: Path) -> dict[str, float]:
    """Logical-form and execution accuracy of predicted SQL text; malformed text counts as wrong."""
    if len(predictions) != len(rows):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
    tables = _tables_for(data_dir, {r["table_id"] for r in rows})
    conn = load_database(tables[k] for k in sorted(tables))
    lf = ex = malformed = 0
    try:
        for text, row in zip(predictions, rows, strict=True):
            gold = sql_of(row)
            gold_result = execute(conn, row["table_id"], gold)
            pred = parse_sql(text, tables[row["table_id"]]["header"])
            if pred is None:
                malformed += 1
                continue
            lf += same_logical_form(pred, gold)
            try:
                ex += execute(conn, row["table_id"], pred) == gold_result
            except (sqlite3.Error, OverflowError):
                pass
    finally:
        conn.close()
    n = len(rows)
    return {
        "logical_form_accuracy": lf / max(n, 1),
        "execution_accuracy": ex / max(n, 1),
        "malformed_rate": malformed / max(n, 1),
        "n": float(n),
    }


@dataclass(frozen=True)
class WikiSQLTask:
    """WikiSQL in its release format: `<split>.jsonl` questions, `<split>.tables.jsonl` tables."""

    name: str = "wikisql"

    def sample_dir(self) -> Path:
        return SAMPLE_DIR

    def load_split(self, data_dir: Path, split: str) -> datasets.Dataset:
        return load_split(data_dir, split)

    def prompt(self, row: dict[str, Any]) -> str:
        columns = ", ".join(row["header"])
        return f"Table: {row['table_id']} | columns: {columns}\nQuestion: {row['question']}\nSQL:"

    def target(self, row: dict[str, Any]) -> str:
        return format_sql(sql_of(row), row["header"])

    def score(
        self, predictions: list[str], rows: list[dict[str, Any]], data_dir: Path
    ) -> dict[str, float]:
        return score(predictions, rows, data_dir)


TASK = WikiSQLTask()
