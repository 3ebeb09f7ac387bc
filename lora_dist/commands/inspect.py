"""Print an adapter's config and size, and verify its checksums, without loading a model.

Exit code 0 when every checksum holds (or there is no manifest), 1 when one fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lora_dist.commands.options import Options, option
from lora_dist.inspection import format_inspection, inspect_adapter
from lora_dist.settings import existing_dir


@dataclass
class InspectOptions(Options):
    """`lora-dist inspect DIR`."""

    dir: Path = option(positional=True)
    """adapter directory or training checkpoint directory"""
    json: bool = False
    """print one JSON object"""

    def validate(self) -> None:
        existing_dir("DIR", self.dir)


OPTIONS = InspectOptions


def run(opts: InspectOptions) -> int:
    info = inspect_adapter(opts.dir)
    print(json.dumps(info, indent=2) if opts.json else format_inspection(info))
    return 1 if info["problems"] else 0
