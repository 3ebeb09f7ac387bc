"""WikiSQL task: loading and validation, the canonical SQL form, the scorer, the shipped sample."""

from __future__ import annotations

import importlib.util
import json
import re
import sqlite3
from pathlib import Path

import pytest

from lora_dist.tasks.wikisql import (
    TASK,
    execute,
    format_sql,
    load_database,
    load_split,
    parse_sql,
    score,
    sql_of,
)

REPO = Path(__file__).resolve().parents[2]
TABLE = {
    "id": "1-0000001-1",
    "header": ["Player", "Team", "Goals", 'Nick "a.k.a."'],
    "types": ["text", "text", "real", "text"],
    "rows": [
        ["O'Brien", "Leeds", 3, "x; DROP TABLE t; --"],
        ["Ann Lee", "Leeds", 5, "Ace"],
        ["Bo Diaz", "Porto", 7, "Tank"],
        ["Cy Wu", "Leeds", 2.5, 'The "Rock"'],
    ],
}
# Players of Leeds with more than 2.5 goals: O'Brien (3) and Ann Lee (5).
GOLD = {"phase": 1, "table_id": TABLE["id"], "question": "q", "sql": {}}


def write_jsonl(path: Path, items: list) -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "dev.tables.jsonl", [TABLE])
    return tmp_path


def scored(prediction: str, sql: dict, data_dir: Path) -> dict:
    row = {**GOLD, "sql": sql}
    write_jsonl(data_dir / "dev.jsonl", [row])
    return score([prediction], list(load_split(data_dir, "dev")), data_dir)


def test_known_answers(data_dir: Path) -> None:
    gold = {"sel": 2, "agg": 0, "conds": [[1, 0, "Leeds"], [2, 1, 2.5]]}
    cases = {  # prediction -> (logical form right, execution right, malformed)
        """SELECT "Goals" FROM table WHERE "Team" = 'Leeds' AND "Goals" > 2.5""": (1, 1, 0),
        # conditions reordered, value case and spacing changed, number written differently
        """select "Goals" from table where "Goals" > 2.50 and "Team" = '  leeds'""": (1, 1, 0),
        """SELECT MAX("Goals") FROM table WHERE "Team" = 'Leeds' AND "Goals" > 2.5""": (0, 0, 0),
        """SELECT "Player" FROM table WHERE "Team" = 'Leeds' AND "Goals" > 2.5""": (0, 0, 0),
        """SELECT "Goals" FROM table WHERE "Team" = 'Porto' AND "Goals" > 2.5""": (0, 0, 0),
        # a different logical form with the same answer counts for execution only
        """SELECT "Goals" FROM table WHERE "Team" = 'Leeds' AND "Goals" > 2.9""": (0, 1, 0),
        """SELECT "Goals" FROM table WHERE "Team" = 'Leeds' AND""": (0, 0, 1),
        """SELECT "Nope" FROM table""": (0, 0, 1),
        "": (0, 0, 1),
    }
    for prediction, (lf, ex, bad) in cases.items():
        result = scored(prediction, gold, data_dir)
        want = {"logical_form_accuracy": lf, "execution_accuracy": ex, "malformed_rate": bad}
        assert {k: result[k] for k in want} == want, prediction
        assert result["n"] == 1


def test_counts_average_over_rows(data_dir: Path) -> None:
    sqls = [
        {"sel": 0, "agg": 3, "conds": [[1, 0, "Leeds"]]},
        {"sel": 2, "agg": 5, "conds": [[1, 0, "Leeds"]]},
    ]
    write_jsonl(data_dir / "dev.jsonl", [{**GOLD, "sql": s} for s in sqls])
    rows = list(load_split(data_dir, "dev"))
    preds = [format_sql(sqls[0], TABLE["header"]), "SELECT nonsense"]
    assert score(preds, rows, data_dir) == {
        "logical_form_accuracy": 0.5,
        "execution_accuracy": 0.5,
        "malformed_rate": 0.5,
        "n": 2.0,
    }
    conn = load_database([TABLE])
    assert execute(conn, TABLE["id"], sqls[0]) == [(3,)]
    assert execute(conn, TABLE["id"], sqls[1]) == [(round((3 + 5 + 2.5) / 3, 6),)]


def test_quotes_and_sql_in_values_and_names_are_inert(data_dir: Path) -> None:
    conn = load_database([TABLE])
    before = conn.execute(f'SELECT * FROM "{TABLE["id"]}"').fetchall()
    hostile = ["x; DROP TABLE t; --", "O'Brien", '\'; DELETE FROM "1-0000001-1"; --']
    for value in hostile:
        sql = {"sel": 3, "agg": 0, "conds": [[0, 0, value], [3, 0, value]]}
        execute(conn, TABLE["id"], sql)
        parsed = parse_sql(format_sql(sql, TABLE["header"]), TABLE["header"])
        assert parsed == sql
    assert execute(conn, TABLE["id"], {"sel": 0, "agg": 0, "conds": [[3, 0, 'The "Rock"']]}) == [
        ("Cy Wu",)
    ]
    assert execute(conn, TABLE["id"], {"sel": 3, "agg": 0, "conds": [[0, 0, "o'brien"]]}) == [
        ("x; DROP TABLE t; --",)
    ]
    assert conn.execute(f'SELECT * FROM "{TABLE["id"]}"').fetchall() == before
    tables = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    assert tables == [(TABLE["id"],)]
    # a prediction that smuggles SQL through a column name is malformed, not run
    sneaky = """SELECT "Player" FROM table; DROP TABLE "1-0000001-1"; --"""
    assert scored(sneaky, {"sel": 0, "agg": 0, "conds": [[1, 0, "Porto"]]}, data_dir) == {
        "logical_form_accuracy": 0.0,
        "execution_accuracy": 0.0,
        "malformed_rate": 1.0,
        "n": 1.0,
    }
    gold = {"sel": 1, "agg": 0, "conds": [[0, 0, "O'Brien"], [3, 0, "x; DROP TABLE t; --"]]}
    result = scored(format_sql(gold, TABLE["header"]), gold, data_dir)
    assert result["logical_form_accuracy"] == result["execution_accuracy"] == 1.0


def test_parse_sql_inverts_format_sql() -> None:
    header = TABLE["header"]
    for sql in (
        {"sel": 3, "agg": 0, "conds": []},
        {"sel": 2, "agg": 4, "conds": [[1, 0, "It's"], [2, 2, -1.5], [2, 1, 3]]},
        {"sel": 0, "agg": 3, "conds": [[3, 0, '"quoted" name']]},
    ):
        text = format_sql(sql, header)
        assert parse_sql(text, header) == sql
        assert parse_sql(format_sql(sql, header, table_id='odd "id"'), header) == sql
    assert format_sql({"sel": 3, "agg": 1, "conds": [[0, 0, "O'Brien"]]}, header) == (
        'SELECT MAX("Nick ""a.k.a.""") FROM table WHERE "Player" = ' + "'O''Brien'"
    )
    for bad in ("SELECT", 'SELECT "Goals" FROM', 'SELECT MAX "Goals" FROM table', "DROP table"):
        assert parse_sql(bad, header) is None


def test_load_split_gives_back_exact_values() -> None:
    d = TASK.sample_dir()
    for split in ("train", "dev"):
        raw = [json.loads(line) for line in (d / f"{split}.jsonl").read_text().splitlines()]
        rows = list(load_split(d, split))
        assert len(rows) == len(raw)
        for row, original in zip(rows, raw, strict=True):
            got = sql_of(row)
            assert got == original["sql"]
            types = [type(v) for _, _, v in got["conds"]]
            assert types == [type(v) for _, _, v in original["sql"]["conds"]]
            assert row["question"] == original["question"]
    value_types = {type(v) for r in raw for _, _, v in r["sql"]["conds"]}
    assert value_types == {str, int, float}  # the mix Arrow cannot type directly


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"phase": 1, "table_id": TABLE["id"], "question": "q"}, "missing field 'sql'"),
        ({**GOLD, "sql": {"sel": 9, "agg": 0, "conds": []}}, "'sel' 9"),
        ({**GOLD, "sql": {"sel": 0, "agg": 6, "conds": []}}, "'agg' 6"),
        ({**GOLD, "sql": {"sel": 0, "agg": 0, "conds": [[0, 7, "a"]]}}, "bad column or operator"),
        ({**GOLD, "table_id": "nope", "sql": {"sel": 0, "agg": 0, "conds": []}}, "'nope'"),
    ],
)
def test_bad_rows_name_file_and_line(data_dir: Path, bad_row: dict, message: str) -> None:
    good = {**GOLD, "sql": {"sel": 0, "agg": 0, "conds": [[1, 0, "Leeds"]]}}
    path = data_dir / "dev.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad_row) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ")) as info:
        load_split(data_dir, "dev")
    assert message in str(info.value)


def test_bad_tables_and_missing_files(data_dir: Path) -> None:
    write_jsonl(data_dir / "dev.jsonl", [{**GOLD, "sql": {"sel": 0, "agg": 0, "conds": []}}])
    broken = {**TABLE, "rows": [["only two", "cells"]]}
    write_jsonl(data_dir / "dev.tables.jsonl", [TABLE, broken])
    with pytest.raises(ValueError, match=r"dev\.tables\.jsonl:2: row 0"):
        load_split(data_dir, "dev")
    (data_dir / "dev.tables.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"dev\.tables\.jsonl:1: invalid JSON"):
        load_split(data_dir, "dev")
    with pytest.raises(FileNotFoundError, match="test.tables.jsonl"):
        load_split(data_dir, "test")


def test_shipped_sample_is_consistent() -> None:
    d = TASK.sample_dir()
    sizes = sum(p.stat().st_size for p in d.iterdir())
    assert sizes < 1_000_000
    ids = {}
    for split in ("train", "dev"):
        tables = [json.loads(x) for x in (d / f"{split}.tables.jsonl").read_text().splitlines()]
        ids[split] = {t["id"] for t in tables}
        rows = list(load_split(d, split))
        conn = load_database(tables)
        # every gold query has a non-empty answer, and gold scores perfectly against itself
        assert all(execute(conn, r["table_id"], sql_of(r)) for r in rows)
        targets = [TASK.target(r) for r in rows]
        assert score(targets, rows, d) == {
            "logical_form_accuracy": 1.0,
            "execution_accuracy": 1.0,
            "malformed_rate": 0.0,
            "n": float(len(rows)),
        }
        questions = " ".join(r["question"] for r in rows)
        assert all(s in questions for s in ("O'Brien", '"The Rock"', "DROP TABLE"))
        assert TASK.prompt(rows[0]).startswith(f"Table: {rows[0]['table_id']} | columns: ")
    assert not ids["train"] & ids["dev"]  # disjoint tables per split, as in the real release
    assert 400 <= len(list(load_split(d, "train"))) <= 600


def test_sample_generator_is_deterministic(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "gen", REPO / "scripts" / "make_wikisql_sample.py"
    )
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for run in ("a", "b"):
        assert gen.main(["--out", str(tmp_path / run)]) == 0
    names = [f"wikisql/{s}{ext}" for s in ("train", "dev") for ext in (".jsonl", ".tables.jsonl")]
    for name in names + ["corpus.txt"]:
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes(), name
        assert first == (REPO / "lora_dist" / "assets" / name).read_bytes(), name


def test_sqlite_is_read_only_after_loading() -> None:
    conn = load_database([TABLE])
    with pytest.raises(sqlite3.OperationalError):
        conn.execute(f'DELETE FROM "{TABLE["id"]}"')
