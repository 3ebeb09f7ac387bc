"""SAMSum (Gliwa et al. 2019): a messenger-style dialogue becomes a short abstractive summary.

Data is the release's JSON files (`train.json`, `val.json`, `test.json`), each a list of
{"id", "summary", "dialogue"} with dialogue turns separated by "\\r\\n". Scored with ROUGE-1/2/L
F1 (rouge-score, Porter stemmer), x100 as in the LoRA paper's Table 4.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from lora_dist.errors import ConfigError, DataError, MissingDataFile
from lora_dist.tasks import metrics

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "assets" / "samsum"
SPLIT_FILES = {"train": "train.json", "dev": "val.json", "test": "test.json"}
FIELDS = ("id", "summary", "dialogue")
FEATURES = datasets.Features({name: datasets.Value("string") for name in FIELDS})


def split_path(data_dir: Path, split: str) -> Path:
    """The release file holding `split`, which must exist."""
    if split not in SPLIT_FILES:
        raise ConfigError(f"SAMSum has no split {split!r}; choose one of {sorted(SPLIT_FILES)}")
    path = Path(data_dir) / SPLIT_FILES[split]
    if not path.is_file():
        raise MissingDataFile(f"SAMSum {split} file not found: {path}")
    return path


def read_release_json(path: Path) -> list[dict[str, str]]:
    """Rows of a SAMSum JSON file, checking each has all three fields as text."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    rows = []
    for i, item in enumerate(data):
        where = f"{path}: row {i}" + (f" (id {item.get('id')!r})" if isinstance(item, dict) else "")
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object")
        for name in FIELDS:
            # Some exports store the id as a number; text fields must be strings.
            ok = isinstance(item.get(name), str) or (
                name == "id" and isinstance(item.get(name), int)
            )
            if not ok:
                raise DataError(f"{where}: missing or non-text field {name!r}")
        rows.append({name: str(item[name]) for name in FIELDS})
    return rows


def load_split(data_dir: Path, split: str) -> datasets.Dataset:
    """One row per dialogue: {"id", "summary", "dialogue"}, dialogue kept byte-for-byte.

    Parsed with the json module first so that a bad row is reported by index and id.
    """
    return datasets.Dataset.from_list(
        read_release_json(split_path(data_dir, split)), features=FEATURES
    )


def score(predictions: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 x100 against each row's summary."""
    if len(predictions) != len(rows):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
    scores = metrics.rouge_f1(predictions, [row["summary"] for row in rows])
    return {
        "rouge1": scores["rouge1"],
        "rouge2": scores["rouge2"],
        "rougeL": scores["rougeL"],
        "n": float(len(rows)),
    }


@dataclass(frozen=True)
class SAMSumTask:
    """SAMSum in its release JSON format."""

    name: str = "samsum"

    def sample_dir(self) -> Path:
        return SAMPLE_DIR

    def load_split(self, data_dir: Path, split: str) -> datasets.Dataset:
        return load_split(data_dir, split)

    def prompt(self, row: dict[str, Any]) -> str:
        # Carriage returns are a Windows artefact of the release; the model sees plain newlines.
        dialogue = row["dialogue"].replace("\r\n", "\n").strip()
        return f"Dialogue:\n{dialogue}\nSummary:"

    def target(self, row: dict[str, Any]) -> str:
        return row["summary"].strip()

    def score(
        self, predictions: list[str], rows: list[dict[str, Any]], data_dir: Path
    ) -> dict[str, float]:
        return score(predictions, rows)


TASK = SAMSumTask()
