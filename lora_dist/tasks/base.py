"""The contract every task implements: rows in, (prompt, target) out, predictions scored."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import datasets


class Task(Protocol):
    """A fine-tuning task. Adding one means adding one module under `lora_dist.tasks`."""

    name: str
    """Registry name used by `--task`."""

    def sample_dir(self) -> Path:
        """The small sample shipped with the package, in the public release's file format."""

    def load_split(self, data_dir: Path, split: str) -> datasets.Dataset:
        """Load one split ("train", "dev", ...) from local files with `datasets`.

        Raises DataError (lora_dist.errors) naming the file and line of any row that is missing
        fields, and MissingDataFile for a split whose file does not exist.
        """

    def prompt(self, row: dict[str, Any]) -> str:
        """The text the model is conditioned on."""

    def target(self, row: dict[str, Any]) -> str:
        """The text the model must produce; loss counts only on its tokens."""

    def score(
        self, predictions: list[str], rows: list[dict[str, Any]], data_dir: Path
    ) -> dict[str, float]:
        """Task metrics for generated `predictions` against `rows` (same order)."""
