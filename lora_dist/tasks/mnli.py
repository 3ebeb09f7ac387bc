"""MNLI (Williams et al. 2018, via GLUE): does the premise entail the hypothesis? One word answer.

Data is GLUE's TSV release: `train.tsv`, `dev_matched.tsv`, `dev_mismatched.tsv`, with columns
such as `index, promptID, pairID, genre, sentence1_binary_parse, ..., sentence1, sentence2,
label1, ..., gold_label`. Sentences contain unbalanced quote characters, so files are read with
quoting disabled. The paper's metric is matched accuracy: split "dev" is `dev_matched.tsv`.
GLUE's test files have no labels and are not offered.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from lora_dist.errors import ConfigError, DataError, MissingDataFile
from lora_dist.tasks import metrics

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "assets" / "mnli"
SPLIT_FILES = {
    "train": "train.tsv",
    "dev": "dev_matched.tsv",
    "dev_matched": "dev_matched.tsv",
    "dev_mismatched": "dev_mismatched.tsv",
}
LABELS = ("entailment", "neutral", "contradiction")
REQUIRED = ("index", "promptID", "pairID", "genre", "sentence1", "sentence2", "gold_label")


def split_path(data_dir: Path, split: str) -> Path:
    """The release file holding `split`, which must exist."""
    if split not in SPLIT_FILES:
        raise ConfigError(f"MNLI has no split {split!r}; choose one of {sorted(SPLIT_FILES)}")
    path = Path(data_dir) / SPLIT_FILES[split]
    if not path.is_file():
        raise MissingDataFile(f"MNLI {split} file not found: {path}")
    return path


def read_release_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of a GLUE MNLI TSV as {column: text} for the columns in `REQUIRED`."""
    rows = []
    with Path(path).open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        missing = [c for c in REQUIRED if header is None or c not in header]
        if header is None or missing:
            raise DataError(f"{path}:1: header lacks columns {missing}")
        cols = {c: header.index(c) for c in REQUIRED}
        for record in reader:
            if not record:
                continue
            where = f"{path}:{reader.line_num}"
            if len(record) != len(header):
                raise DataError(f"{where}: expected {len(header)} fields, found {len(record)}")
            row = {c: record[i] for c, i in cols.items()}
            for c in REQUIRED:
                if not row[c].strip():
                    raise DataError(f"{where}: field {c!r} is empty")
            if row["gold_label"] not in LABELS:
                raise DataError(f"{where}: gold_label {row['gold_label']!r} is not one of {LABELS}")
            rows.append(row)
    return rows


def load_split(data_dir: Path, split: str) -> datasets.Dataset:
    """One row per premise/hypothesis pair with the `REQUIRED` columns, all as text.

    Parsed with the csv module (tab-separated, no quoting) so that errors name their line;
    `datasets`' pandas reader would turn a missing field into an empty string silently.
    """
    rows = read_release_tsv(split_path(data_dir, split))
    features = datasets.Features({c: datasets.Value("string") for c in REQUIRED})
    return datasets.Dataset.from_list(rows, features=features)


def score(predictions: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
    """Accuracy in percent (as the paper reports it) of normalised predictions vs gold labels."""
    if len(predictions) != len(rows):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
    gold = [row["gold_label"] for row in rows]
    return {"accuracy": 100.0 * metrics.accuracy(predictions, gold), "n": float(len(rows))}


@dataclass(frozen=True)
class MNLITask:
    """MNLI in GLUE's TSV format; the target is the gold label as a word."""

    name: str = "mnli"

    def sample_dir(self) -> Path:
        return SAMPLE_DIR

    def load_split(self, data_dir: Path, split: str) -> datasets.Dataset:
        return load_split(data_dir, split)

    def prompt(self, row: dict[str, Any]) -> str:
        return f"Premise: {row['sentence1']}\nHypothesis: {row['sentence2']}\nLabel:"

    def target(self, row: dict[str, Any]) -> str:
        return row["gold_label"]

    def score(
        self, predictions: list[str], rows: list[dict[str, Any]], data_dir: Path
    ) -> dict[str, float]:
        return score(predictions, rows)


TASK = MNLITask()
