"""The sizing in the sbatch scripts' headers is what `lora-dist plan` says for the same run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lora_dist.cli import main

REPO = Path(__file__).resolve().parents[2]
SIZED = ["gpt3_wikisql.sh", "bloom_wikisql.sh", "falcon_wikisql.sh"]


def header(script: str) -> str:
    """The script's leading comment block, without the '#' and the indent."""
    lines = (REPO / "slurm" / script).read_text().splitlines()[1:]
    return " ".join(line.lstrip("# ") for line in lines if line.startswith("#"))


@pytest.mark.parametrize("script", SIZED)
def test_header_sizes_are_the_planners(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = header(script)
    command = re.search(r"`lora-dist plan ([^`]+)`", text)
    totals = re.search(
        r"Plan's total per GPU: ([\d.]+) GiB on 1 node, ([\d.]+) on 2, ([\d.]+) on 4", text
    )
    assert command and totals, f"{script}: no plan command or per-GPU totals in the header"
    for nodes, quoted in zip((1, 2, 4), totals.groups(), strict=True):
        argv = [a if a != "N" else str(nodes) for a in shlex.split(command.group(1))]
        assert main(["plan", *argv]) == 0
        out = capsys.readouterr().out
        lora_total = float(re.search(r"TOTAL per GPU\s+[\d.]+\s+([\d.]+)", out).group(1))
        assert f"{lora_total:.1f}" == quoted, (script, nodes)
        params = re.search(r"LoRA ([\d,]+)", out).group(1)
        if script != "gpt3_wikisql.sh":  # the GPT-3 header gives the paper's r=4 count rounded
            assert params in text, (script, params)
