"""`lora-dist analyze`: the paper's Section 7 questions asked of your own adapters.

`spectrum`, `similarity` and `amplification` each build a report (lora_dist.analysis.reports),
print it as a table (or, with --json, as one JSON object), and with --output_dir also write it
as <command>.json next to its PNG figures.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_dist.analysis.reports import write_json

Column = tuple[str, Callable[[dict[str, Any]], Any]]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: list[Column]) -> None:
    """One line per target, aligned columns."""
    cells = [[title for title, _ in columns]]
    cells += [[_cell(get(row)) for _, get in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )


def emit(
    report: dict[str, Any],
    opts: Any,
    name: str,
    draw: Callable[[dict[str, Any], Path], list[Path]],
    columns: list[Column],
) -> int:
    """Print the report (a table, or JSON with opts.json); write it and its figures to
    opts.output_dir when set."""
    written = []
    if opts.output_dir is not None:
        out = Path(opts.output_dir)
        written = [write_json(report, out / f"{name}.json"), *draw(report, out)]
    if opts.json:
        json.dump(report, sys.stdout, indent=1)
        print()
        return 0
    print_table(report["targets"], columns)
    for path in written:
        print(f"wrote {path}")
    return 0
