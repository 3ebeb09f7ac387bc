"""`lora-dist analyze`: the paper's Section 7 questions asked of your own adapters.

`spectrum`, `similarity` and `amplification` each build a report (lora_dist.analysis.reports)
and either print it as JSON or write it with its PNG figures to --output_dir, printing a table.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    output_dir: str | None,
    name: str,
    draw: Callable[[dict[str, Any], Path], list[Path]],
    columns: list[Column],
) -> int:
    """Print the report as JSON, or write <name>.json and the figures and print a table."""
    if output_dir is None:
        json.dump(report, sys.stdout, indent=1)
        print()
        return 0
    from lora_dist.analysis.reports import write_json

    out = Path(output_dir)
    written = [write_json(report, out / f"{name}.json"), *draw(report, out)]
    print_table(report["targets"], columns)
    for path in written:
        print(f"wrote {path}")
    return 0
