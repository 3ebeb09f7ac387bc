"""Singular values and effective rank of every adapted module's update ΔW = s·B·A.

For each module (and each row slice of a fused-slice adapter): σ_1 >= ... >= σ_r of ΔW, from
QR factorisations of B and Aᵀ and the SVD of an r x r core; ||ΔW||_F; and the effective rank,
the smallest k whose top-k singular values hold 90% (99%) of ||ΔW||_F². Figures: ||ΔW||_F per
layer, and each layer's spectrum.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_dist.analysis import figures
from lora_dist.analysis.reports import spectrum_report
from lora_dist.analysis.updates import analysis_targets, read_updates
from lora_dist.commands.analyze import emit
from lora_dist.commands.options import Options, option
from lora_dist.settings import existing_dir, output_dir


@dataclass
class SpectrumOptions(Options):
    """Settings of `lora-dist analyze spectrum`."""

    adapter: str = option(positional=True, metavar="ADAPTER")
    """adapter directory (PEFT format), or a run or checkpoint directory holding adapter/"""
    output_dir: str | None = None
    """also write spectrum.json and PNG figures to this directory"""
    json: bool = False
    """print the report as one JSON object instead of a table"""
    modules: str | None = None
    """analyse only the modules whose path matches this regular expression"""
    slices: bool = True
    """also report each row block of a block-structured (fused-slice) adapter on its own"""

    def validate(self) -> None:
        existing_dir("ADAPTER", self.adapter)
        if self.output_dir is not None:
            output_dir("--output_dir", self.output_dir)


OPTIONS = SpectrumOptions


def _draw(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [
        figures.norm_by_layer(report, out / "delta_norm_by_layer.png"),
        figures.spectrum_heatmap(report, out / "spectrum.png"),
    ]


def run(opts: SpectrumOptions) -> int:
    adapter = read_updates(opts.adapter, opts.modules)
    report = spectrum_report(adapter, analysis_targets(adapter.updates, opts.slices))
    columns = [
        ("target", lambda r: r["name"]),
        ("rank", lambda r: r["rank"]),
        ("||dW||_F", lambda r: r["frobenius_norm"]),
        ("sigma_1", lambda r: r["singular_values"][0]),
        ("top-1 share", lambda r: r["energy"][0]),
        ("rank@90%", lambda r: r["effective_rank_90"]),
        ("rank@99%", lambda r: r["effective_rank_99"]),
    ]
    return emit(report, opts, "spectrum", _draw, columns)
