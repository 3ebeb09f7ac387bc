"""E2E NLG (Novikova et al. 2017): a restaurant meaning representation becomes a description.

Data is the challenge release's CSV files (`trainset.csv`, `devset.csv`, `testset_w_refs.csv`)
with columns `mr` and `ref`. One MR appears on several rows, one per human reference. Training
uses every (MR, reference) row; scoring groups the references of each MR and scores one
prediction per MR against all of them, as the challenge does. See `lora_dist.tasks.metrics` for
which metrics match the challenge's scripts exactly and which approximately (METEOR is absent).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from lora_dist.errors import ConfigError, DataError, MissingDataFile
from lora_dist.tasks import metrics

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "assets" / "e2e"
SPLIT_FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
FEATURES = datasets.Features(
    {
        "mr": datasets.Value("string"),
        "ref": datasets.Value("string"),
        "references": datasets.List(datasets.Value("string")),
    }
)


def split_path(data_dir: Path, split: str) -> Path:
    """The release file holding `split`, which must exist."""
    if split not in SPLIT_FILES:
        raise ConfigError(f"E2E has no split {split!r}; choose one of {sorted(SPLIT_FILES)}")
    path = Path(data_dir) / SPLIT_FILES[split]
    if not path.is_file():
        raise MissingDataFile(f"E2E {split} file not found: {path}")
    return path


def read_release_csv(path: Path) -> list[dict[str, str]]:
    """Rows of an E2E CSV as {"mr", "ref"}, checking every record has both, non-empty."""
    rows = []
    with Path(path).open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or not {"mr", "ref"} <= set(header):
            raise DataError(f"{path}:1: header must name columns 'mr' and 'ref', got {header}")
        mr_col, ref_col = header.index("mr"), header.index("ref")
        for record in reader:
            if not record:
                continue
            # line_num is the last physical line of the record, exact even for quoted newlines.
            where = f"{path}:{reader.line_num}"
            if len(record) != len(header):
                raise DataError(f"{where}: expected {len(header)} fields, found {len(record)}")
            mr, ref = record[mr_col].strip(), record[ref_col].strip()
            for name, value in (("mr", mr), ("ref", ref)):
                if not value:
                    raise DataError(f"{where}: field {name!r} is empty")
            rows.append({"mr": mr, "ref": ref})
    return rows


def load_split(data_dir: Path, split: str) -> datasets.Dataset:
    """One row per (MR, reference); `references` lists every reference of the row's MR in the file.

    Parsed with the csv module rather than `datasets`' pandas reader, which turns a missing
    field into an empty string with no line number to report.
    """
    rows = read_release_csv(split_path(data_dir, split))
    by_mr: dict[str, list[str]] = {}
    for row in rows:
        by_mr.setdefault(row["mr"], []).append(row["ref"])
    return datasets.Dataset.from_list(
        [{**row, "references": by_mr[row["mr"]]} for row in rows], features=FEATURES
    )


def group_by_mr(
    predictions: list[str], rows: list[dict[str, Any]]
) -> tuple[list[str], list[list[str]]]:
    """One prediction per distinct MR (the first given for it) and that MR's references.

    References come from each row's `references` column when present, otherwise from the
    `ref` of every row in `rows` with that MR.
    """
    if len(predictions) != len(rows):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
    preds: dict[str, str] = {}
    refs: dict[str, list[str]] = {}
    for pred, row in zip(predictions, rows, strict=True):
        mr = row["mr"]
        preds.setdefault(mr, pred)
        if row.get("references"):
            refs[mr] = list(row["references"])
        elif row["ref"] not in refs.setdefault(mr, []):
            refs[mr].append(row["ref"])
    return [preds[mr] for mr in preds], [refs[mr] for mr in preds]


def score(predictions: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
    """BLEU, NIST, ROUGE-L and CIDEr-D over distinct MRs, multi-reference."""
    preds, refs = group_by_mr(predictions, rows)
    return {
        "bleu": metrics.corpus_bleu(preds, refs),
        "nist": metrics.corpus_nist(preds, refs),
        "rouge_l": metrics.rouge_l_multi(preds, refs),
        "cider": metrics.corpus_cider_d(preds, refs),
        "n_mrs": float(len(preds)),
    }


@dataclass(frozen=True)
class E2ETask:
    """E2E NLG in the challenge's CSV format."""

    name: str = "e2e"

    def sample_dir(self) -> Path:
        return SAMPLE_DIR

    def load_split(self, data_dir: Path, split: str) -> datasets.Dataset:
        return load_split(data_dir, split)

    def prompt(self, row: dict[str, Any]) -> str:
        return f"Meaning representation: {row['mr']}\nDescription:"

    def target(self, row: dict[str, Any]) -> str:
        return row["ref"]

    def score(
        self, predictions: list[str], rows: list[dict[str, Any]], data_dir: Path
    ) -> dict[str, float]:
        return score(predictions, rows)


TASK = E2ETask()
