"""Subspace similarity φ(i, j) between two adapters' top singular directions (Section 7.2).

φ(A1, A2, i, j) = ||U1_iᵀ·U2_j||_F² / min(i, j), where U1_i holds the top-i right-singular
vectors of adapter 1's A (r x in) as columns, i.e. the input-space directions it reads most,
and U2_j the top-j of adapter 2's. 1: one subspace contains the other; 0: orthogonal; two random
subspaces of R^k give max(i, j)/k on average. For every module both adapters adapt (and every
row slice of a fused-slice adapter). Figures: heatmaps like the paper's Figures 3 and 4, and
φ per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lora_dist.analysis import figures
from lora_dist.analysis.reports import similarity_report
from lora_dist.analysis.updates import analysis_targets, read_updates
from lora_dist.commands.analyze import emit
from lora_dist.commands.options import Options, option
from lora_dist.errors import ConfigError
from lora_dist.settings import existing_dir, output_dir


@dataclass
class SimilarityOptions(Options):
    """Settings of `lora-dist analyze similarity`."""

    adapter_1: str = option(positional=True, metavar="ADAPTER_1")
    """first adapter (e.g. r=8), or a run directory holding adapter/"""
    adapter_2: str = option(positional=True, metavar="ADAPTER_2")
    """second adapter (e.g. r=64, or another seed), or a run directory holding adapter/"""
    output_dir: str | None = None
    """also write similarity.json and PNG figures to this directory"""
    json: bool = False
    """print the report as one JSON object instead of a table"""
    modules: str | None = None
    """analyse only the modules whose path matches this regular expression"""
    slices: bool = True
    """also compare each row block of block-structured (fused-slice) adapters on its own"""
    factor: Literal["A", "B"] = "A"
    """A: right-singular vectors of A, as the paper; B: left-singular vectors of B"""
    layers: list[int] = option([])
    """draw the φ heatmaps of these layers (repeat the flag); default: the middle layer"""
    seed: int = option(0, minimum=0)
    """seed of the two random Gaussian matrices drawn next to each heatmap"""

    def validate(self) -> None:
        existing_dir("ADAPTER_1", self.adapter_1)
        existing_dir("ADAPTER_2", self.adapter_2)
        if self.output_dir is not None:
            output_dir("--output_dir", self.output_dir)


OPTIONS = SimilarityOptions


def heatmap_layers(report: dict[str, Any], wanted: list[int]) -> list[int | None]:
    """The layers to draw: those asked for (checked), else the middle one."""
    present = sorted({row["layer"] for row in report["targets"] if row["layer"] is not None})
    if not present:
        return [None]
    missing = sorted(set(wanted) - set(present))
    if missing:
        raise ConfigError(f"--layers {missing} not among the adapters' layers {present}")
    return list(wanted) or [present[len(present) // 2]]


def run(opts: SimilarityOptions) -> int:
    first = read_updates(opts.adapter_1, opts.modules)
    second = read_updates(opts.adapter_2, opts.modules)
    report = similarity_report(
        first,
        analysis_targets(first.updates, opts.slices),
        second,
        analysis_targets(second.updates, opts.slices),
        factor=opts.factor,
        seed=opts.seed,
    )
    if not report["targets"]:
        raise ConfigError(
            f"{opts.adapter_1} and {opts.adapter_2} adapt no module in common "
            f"(first has {report['only_in_1'][:3]}, second {report['only_in_2'][:3]})"
        )
    layers = heatmap_layers(report, opts.layers)

    def draw(report: dict[str, Any], out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        paths = [figures.similarity_by_layer(report, out / "similarity_by_layer.png")]
        for layer in layers:
            name = "similarity.png" if layer is None else f"similarity_layer{layer}.png"
            paths.append(figures.similarity_heatmaps(report, layer, out / name))
        return paths

    columns = [
        ("target", lambda r: r["name"]),
        ("r1", lambda r: r["rank_1"]),
        ("r2", lambda r: r["rank_2"]),
        ("phi(1,1)", lambda r: r["phi"][0][0]),
        ("mean phi(i,i)", lambda r: sum(r["phi_diagonal"]) / len(r["phi_diagonal"])),
        ("chance phi(1,1)", lambda r: r["expected_random_diagonal"][0]),
    ]
    return emit(report, opts, "similarity", draw, columns)
