"""How ΔW relates to W: Table 7's ||Uᵀ·W·Vᵀ||_F and the amplification factor, per module.

For each adapted module (and row slice): ||ΔW||_F, ||W||_F, and W seen through k directions,
||Uᵀ·W·Vhᵀ||_F, with U (out x k) and Vh (k x in) the top-k singular directions of ΔW, of W
itself, or of a seeded random subspace; k is the adapter's rank unless --top says otherwise.
The amplification factor is ||ΔW||_F / ||Uᵀ·W·Vhᵀ||_F with U, Vh from ΔW (21.5 in the paper for
GPT-3's W_q at r=4). W is read from the base's safetensors one tensor at a time; W's own top-k
comes from subspace iteration, never a d x d matrix.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_dist.analysis import figures
from lora_dist.analysis.base_weights import SafetensorsWeights
from lora_dist.analysis.reports import amplification_report
from lora_dist.analysis.updates import AdapterUpdates, analysis_targets, read_updates
from lora_dist.commands.analyze import emit
from lora_dist.commands.options import Options, option
from lora_dist.errors import ConfigError
from lora_dist.models import BUILTIN, resolve_model_dir
from lora_dist.settings import existing_dir, output_dir


@dataclass
class AmplificationOptions(Options):
    """Settings of `lora-dist analyze amplification`."""

    adapter: str = option(positional=True, metavar="ADAPTER")
    """adapter directory (PEFT format), or a run or checkpoint directory holding adapter/"""
    model: str | None = option(None, aliases=("--base",))
    """the base model the adapter was trained on: a directory of safetensors (sharded or not),
    or a built-in name (smollm2-135m-instruct, tiny); default: the adapter's
    base_model_name_or_path"""
    output_dir: str | None = None
    """also write amplification.json and PNG figures to this directory"""
    json: bool = False
    """print the report as one JSON object instead of a table"""
    modules: str | None = None
    """analyse only the modules whose path matches this regular expression"""
    slices: bool = True
    """also report each row block of a block-structured (fused-slice) adapter on its own"""
    top: int | None = option(None, minimum=1)
    """dimension k of the subspaces compared; default: each module's rank"""
    seed: int = option(0, minimum=0)
    """seed of the random subspaces (each target's draw depends on this and its name only)"""
    tol: float = option(1e-10, above=0)
    """stop W's subspace iteration when Σσ_i² (i <= k) changes by less than this, relative"""
    max_iters: int = option(200, minimum=1)
    """most rounds of W's subspace iteration (each reads W twice)"""

    def validate(self) -> None:
        existing_dir("ADAPTER", self.adapter)
        if self.model is not None and self.model not in BUILTIN and not Path(self.model).exists():
            raise ConfigError(
                f"--model {self.model} does not exist; pass the base model's directory or one of "
                f"{', '.join(BUILTIN)}"
            )
        if self.output_dir is not None:
            output_dir("--output_dir", self.output_dir)


OPTIONS = AmplificationOptions


def _draw(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [figures.amplification_by_layer(report, out / "amplification_by_layer.png")]


def base_weights(base: str | None, adapter: AdapterUpdates) -> SafetensorsWeights:
    """--model, or the base the adapter names, as safetensors read by tensor name."""
    if base is None:
        named = adapter.config.get("base_model_name_or_path")
        if named not in BUILTIN and not (named and Path(named).is_dir()):
            raise ConfigError(
                f"{adapter.path} names its base as {named!r}, which is not a local directory "
                "or a built-in model: pass --model DIR"
            )
        base = named
    return SafetensorsWeights(resolve_model_dir(base) if base in BUILTIN else base)


def run(opts: AmplificationOptions) -> int:
    adapter = read_updates(opts.adapter, opts.modules)
    report = amplification_report(
        adapter,
        analysis_targets(adapter.updates, opts.slices),
        base_weights(opts.model, adapter),
        seed=opts.seed,
        top=opts.top,
        tol=opts.tol,
        max_iters=opts.max_iters,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    columns = [
        ("target", lambda r: r["name"]),
        ("k", lambda r: r["k"]),
        ("||dW||_F", lambda r: r["delta_frobenius_norm"]),
        ("||W||_F", lambda r: r["w_frobenius_norm"]),
        ("U,V of dW", lambda r: r["projection"]["delta"]),
        ("U,V of W", lambda r: r["projection"]["w"]),
        ("random", lambda r: r["projection"]["random"]),
        ("amplification", lambda r: r["amplification"]),
    ]
    return emit(report, opts, "amplification", _draw, columns)
