"""Write the shipped WikiSQL-format sample and the tokenizer corpus, deterministically from a seed.

Usage: python scripts/make_wikisql_sample.py [--out lora_dist/assets] [--seed 0]
Writes <out>/wikisql/{train,dev}.jsonl, <out>/wikisql/{train,dev}.tables.jsonl and <out>/corpus.txt.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lora_dist.tasks.wikisql import (  # noqa: E402
    TASK,
    execute,
    load_database,
    load_split,
)

FIRST = ["James", "Maria", "Ahmed", "Chen", "Liam", "Sofia", "Kenji", "Amara", "Lucas", "Elena"]
LAST = ["Smith", "Garcia", "Okafor", "Novak", "Silva", "Tanaka", "Murphy", "Kowalski", "Reyes"]
PLACES = ["Leeds", "Porto", "Lyon", "Austin", "Osaka", "Dublin", "Quito", "Perth", "Turin", "Oslo"]
WORDS = ["Blue", "River", "Night", "Golden", "Silent", "Broken", "Summer", "Iron", "Paper", "Wild"]
NOUNS = ["Road", "Heart", "City", "Garden", "Storm", "Mirror", "Bridge", "Fire", "Dream", "Line"]
# Cells that would break a scorer which pasted values into SQL text.
TRICKY = ["O'Brien", 'Dwayne "The Rock" Jones', "x; DROP TABLE t; --"]


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def title(rng: random.Random) -> str:
    return f"{rng.choice(WORDS)} {rng.choice(NOUNS)}"


def pick(options: list[str]) -> Any:
    return lambda rng: rng.choice(options)


def integer(lo: int, hi: int) -> Any:
    return lambda rng: rng.randint(lo, hi)


def decimal(lo: float, hi: float) -> Any:
    return lambda rng: round(rng.uniform(lo, hi), 1)


# domain -> (page title, [(header, type, cell generator)]); a table takes the first column and
# a seeded subset of the rest, so tables of one domain still differ.
DOMAINS: dict[str, tuple[str, list[tuple[str, str, Any]]]] = {
    "players": (
        "List of league players",
        [
            ("Player", "text", person),
            ("Team", "text", pick(PLACES[:5])),
            ("Position", "text", pick(["Forward", "Midfielder", "Defender", "Goalkeeper"])),
            ("Goals", "real", integer(0, 30)),
            ("Appearances", "real", integer(5, 40)),
            ('Nickname ("a.k.a.")', "text", pick(["The Wall", "Speedy", "Ace", "Tank"])),
        ],
    ),
    "elections": (
        "House elections",
        [
            ("District", "text", lambda rng: f"District {rng.randint(1, 30)}"),
            ("Incumbent", "text", person),
            ("Party", "text", pick(["Democratic", "Republican", "Independent"])),
            ("First elected", "real", integer(1960, 2010)),
            ("Result", "text", pick(["Re-elected", "Retired", "Lost re-election"])),
        ],
    ),
    "episodes": (
        "List of episodes",
        [
            ("Title", "text", title),
            ("No. in series", "real", integer(1, 90)),
            ("Directed by", "text", person),
            ("Written by", "text", person),
            ("U.S. viewers (millions)", "real", decimal(1.0, 20.0)),
        ],
    ),
    "cities": (
        "Largest cities",
        [
            (
                "City",
                "text",
                lambda rng: f"{rng.choice(WORDS)}{rng.choice(['ton', 'ville', 'burg'])}",
            ),
            ("Country", "text", pick(["France", "Brazil", "Japan", "Kenya", "Canada"])),
            ("Population", "real", integer(20000, 900000)),
            ("Area (sq km)", "real", decimal(10.0, 900.0)),
            ("Founded", "real", integer(1200, 1950)),
        ],
    ),
    "races": (
        "Championship season",
        [
            ("Circuit", "text", lambda rng: f"{rng.choice(PLACES)} Circuit"),
            ("Round", "real", integer(1, 20)),
            ("Winning driver", "text", person),
            ("Winning team", "text", pick(["Apex Racing", "Team Nova", "Red Fox", "Vortex"])),
            ("Laps", "real", integer(40, 80)),
        ],
    ),
    "albums": (
        "Discography",
        [
            ("Album", "text", title),
            ("Year", "real", integer(1970, 2020)),
            ("Label", "text", pick(["Sunset", "Harbor", "Echo", "Atlas"])),
            ("Peak position", "real", integer(1, 100)),
            ("Certification", "text", pick(["Gold", "Platinum", "Silver", "None"])),
        ],
    ),
    "schools": (
        "High schools",
        [
            (
                "School",
                "text",
                lambda rng: f"{rng.choice(PLACES)} {rng.choice(['High', 'Academy'])}",
            ),
            ("Location", "text", pick(PLACES)),
            ("Mascot", "text", pick(["Eagles", "Tigers", "Bears", "Wolves", "Hawks"])),
            ("Enrollment", "real", integer(200, 3000)),
            ("Founded", "real", integer(1850, 2000)),
        ],
    ),
}
# Which column of each domain gets the tricky cells, so questions about them exist.
TRICKY_COLUMN = {
    "players": "Player",
    "episodes": "Title",
    "albums": "Album",
    "elections": "Incumbent",
}

SELECT_PHRASES = {
    0: ["What is the {sel} when {conds}?", "Name the {sel} when {conds}."],
    1: ["What is the highest {sel} when {conds}?"],
    2: ["What is the lowest {sel} when {conds}?"],
    3: ["How many {sel} are there when {conds}?"],
    4: ["What is the total {sel} when {conds}?"],
    5: ["What is the average {sel} when {conds}?"],
}
COND_PHRASES = {
    0: "{col} is {value}",
    1: "{col} is greater than {value}",
    2: "{col} is less than {value}",
}


def make_table(rng: random.Random, domain: str, table_id: str, tricky: bool) -> dict[str, Any]:
    page_title, columns = DOMAINS[domain]
    rest = columns[1:]
    chosen = [columns[0]] + sorted(rng.sample(rest, rng.randint(3, len(rest))), key=rest.index)
    n_rows = rng.randint(8, 14)
    rows = [[gen(rng) for _, _, gen in chosen] for _ in range(n_rows)]
    headers = [h for h, _, _ in chosen]
    if tricky and TRICKY_COLUMN.get(domain) in headers:
        col = headers.index(TRICKY_COLUMN[domain])
        for i, value in enumerate(TRICKY):
            rows[i][col] = value
    return {
        "id": table_id,
        "header": headers,
        "types": [t for _, t, _ in chosen],
        "rows": rows,
        "page_title": f"{page_title} ({rng.randint(1990, 2015)})",
        "caption": page_title,
        "name": f"table_{table_id.replace('-', '_')}",
    }


def make_question(rng: random.Random, table: dict[str, Any], anchor: int, cond_col: int | None):
    """One question whose gold query matches at least the anchor row."""
    header, types, row = table["header"], table["types"], table["rows"][anchor]
    n = len(header)
    n_conds = 1 if rng.random() < 0.75 else 2
    cols = [cond_col] if cond_col is not None else []
    cols += rng.sample([c for c in range(n) if c not in cols], n_conds - len(cols))
    conds = []
    for c in cols:
        op = 0
        column = [r[c] for r in table["rows"]]
        if types[c] == "real" and rng.random() < 0.4:
            op = rng.choice([1, 2])
            # a threshold taken from the column, strictly on the anchor's side of it
            below = sorted({v for v in column if (v < row[c] if op == 1 else v > row[c])})
            if not below:
                op = 0
        value = row[c] if op == 0 else rng.choice(below)
        conds.append([c, op, value])
    sel = rng.choice([c for c in range(n) if c not in cols])
    aggs = [0, 0, 0, 3] + ([1, 2, 4, 5] if types[sel] == "real" else [])
    agg = rng.choice(aggs)
    sql = {"sel": sel, "agg": agg, "conds": conds}
    phrase = " and ".join(COND_PHRASES[o].format(col=header[c], value=v) for c, o, v in conds)
    question = rng.choice(SELECT_PHRASES[agg]).format(sel=header[sel], conds=phrase)
    return {"phase": 1, "table_id": table["id"], "question": question, "sql": sql}


def make_split(rng: random.Random, n_tables: int, n_questions: int, ids: set[str]):
    domains = sorted(DOMAINS)
    tables = []
    for i in range(n_tables):
        while (table_id := f"1-{rng.randint(1000000, 2999999)}-{rng.randint(1, 3)}") in ids:
            pass
        ids.add(table_id)
        tables.append(make_table(rng, domains[i % len(domains)], table_id, tricky=i < 4))
    conn = load_database(tables)
    questions, seen = [], set()
    # the tricky rows are asked about first so every split exercises them
    forced = [
        (t, i, t["header"].index(TRICKY_COLUMN[d]))
        for t, d in ((t, domains[k % len(domains)]) for k, t in enumerate(tables[:4]))
        if TRICKY_COLUMN.get(d) in t["header"]
        for i in range(len(TRICKY))
    ]
    while len(questions) < n_questions:
        if forced:
            table, anchor, col = forced.pop(0)
        else:
            table = rng.choice(tables)
            anchor, col = rng.randrange(len(table["rows"])), None
        q = make_question(rng, table, anchor, col)
        if (q["table_id"], q["question"]) in seen or not execute(conn, q["table_id"], q["sql"]):
            continue
        seen.add((q["table_id"], q["question"]))
        questions.append(q)
    rng.shuffle(questions)
    return tables, questions


def write_jsonl(path: Path, items: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "lora_dist" / "assets"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    data_dir = args.out / "wikisql"
    data_dir.mkdir(parents=True, exist_ok=True)
    ids: set[str] = set()
    corpus: list[str] = []
    for split, n_tables, n_questions in (("train", 28, 500), ("dev", 8, 120)):
        tables, questions = make_split(rng, n_tables, n_questions, ids)
        write_jsonl(data_dir / f"{split}.tables.jsonl", tables)
        write_jsonl(data_dir / f"{split}.jsonl", questions)
        # the corpus is what the model will read and write: prompts, targets, and every cell
        for row in load_split(data_dir, split):
            corpus += TASK.prompt(row).split("\n") + [TASK.target(row)]
        for t in tables:
            corpus += [t["page_title"], " | ".join(t["header"])]
            corpus += [" | ".join(str(v) for v in r) for r in t["rows"]]
    (args.out / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    print(f"wrote {data_dir} and {args.out / 'corpus.txt'} ({len(corpus)} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
