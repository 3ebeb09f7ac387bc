"""An adapter directory as low-rank updates: ΔW = s·B·A per adapted module, and per row slice.

Reads PEFT-format LoRA adapters (ours or PEFT's). The scale of each module follows PEFT:
r and alpha come from `rank_pattern` and `alpha_pattern` when a pattern key matches the module
path (PEFT's own rule: the path ends with the key, at a dot boundary), else from `r` and
`lora_alpha`; s = alpha/r, or alpha/sqrt(r) with `use_rslora`. The factors are stored in
PEFT's orientation (A: r x in, B: out x r) whatever `fan_in_fan_out` says; that flag only says
how the base stores W, which matters only where the base is read (`base_weights`).

A fused-slice adapter (LoRA on q and v of a fused QKV, exported as ordinary PEFT LoRA on the
fused module) has A' = [A_q; A_v] and a B' that is zero except B_q in the q rows of its first
r columns and B_v in the v rows of its last r columns. Such a B' falls apart into blocks: the
columns that share non-zero rows. `row_slices` finds those blocks from B' alone, whatever the
row layout (contiguous for GPT-2, interleaved per head for BLOOM), so each slice's update
s·B'[rows, cols]·A'[cols] is exactly ΔW restricted to those rows.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_dist import adapter as adapter_files
from lora_dist.errors import AdapterError

Tensor = torch.Tensor
_FACTOR_KEY = re.compile(re.escape(adapter_files.PREFIX) + r"(.+)\.(lora_A|lora_B)\.weight")


@dataclass(frozen=True)
class LowRankUpdate:
    """ΔW = scale·B·A of one adapted module, or of one block of its output rows."""

    module: str
    """Module path in the model, as PEFT names it (e.g. model.layers.3.self_attn.q_proj)."""
    a: Tensor
    """A, r x in, float64."""
    b: Tensor
    """B, out x r (or len(rows) x r for a slice), float64."""
    scale: float
    """s in ΔW = s·B·A."""
    out_features: int
    """Output size of the whole module (rows of its W)."""
    fan_in_fan_out: bool
    """The adapter says the base stores W as in x out (GPT-2's Conv1D)."""
    rows: Tensor | None = None
    """The module's output rows this update covers, ascending; None: all of them."""
    slice_index: int | None = None
    """Which block of a block-structured B this is (0, 1, ...); None for a whole module."""
    slice_name: str | None = None
    """The slice a lora-dist export says this block is (q, k or v), when it says so."""
    slice_names: tuple[str, ...] = ()
    """For a whole fused module: the slices lora_dist.json records for it, in column order."""

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.a.shape[1])

    @property
    def name(self) -> str:
        """The module path, with the rows in brackets for a slice."""
        if self.rows is None:
            return self.module
        runs = row_runs(self.rows)
        if len(runs) > 3:  # interleaved per head: name the block, count its rows
            label = self.slice_name or f"block {self.slice_index}"
            return f"{self.module}[{label}: {len(self.rows)} rows]"
        return f"{self.module}[{','.join(f'{a}:{b}' for a, b in runs)}]"

    @property
    def layer(self) -> int | None:
        """The first numeric component of the module path (the block index), if any."""
        digits = [int(p) for p in self.module.split(".") if p.isdigit()]
        return digits[0] if digits else None

    @property
    def kind(self) -> str:
        """The module's own name (q_proj, c_attn), with the slice index for a slice."""
        leaf = self.module.rsplit(".", 1)[-1]
        if self.slice_index is None:
            return leaf
        return f"{leaf}[{self.slice_name or self.slice_index}]"

    def describe(self) -> dict[str, Any]:
        """What identifies this update in a report."""
        return {
            "name": self.name,
            "module": self.module,
            "rows": None if self.rows is None else row_runs(self.rows),
            "layer": self.layer,
            "kind": self.kind,
            "rank": self.rank,
            "scale": self.scale,
            "shape": [int(self.b.shape[0]), self.in_features],
        }


def row_runs(rows: Tensor) -> list[list[int]]:
    """Ascending row indices as [start, stop) runs: [0, 1, 2, 7] -> [[0, 3], [7, 8]]."""
    runs: list[list[int]] = []
    for r in rows.tolist():
        if runs and runs[-1][1] == r:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    return runs


def pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key the module path ends with."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_analysis_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json, accepting what analysis can honour and loading cannot yet.

    `adapter.read_adapter_config` refuses rank_pattern and alpha_pattern because the loader
    does not apply them; here they only set scales, so they are read. DoRA is refused: its
    ΔW is not s·B·A.
    """
    path = adapter_dir / adapter_files.CONFIG_NAME
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"cannot read {path}: {exc}") from exc
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise AdapterError(f"{path} lacks the field {key!r}")
    if cfg.get("use_dora"):
        raise AdapterError(f"{path}: a DoRA adapter's update is not s·B·A; analyze reads LoRA")
    return cfg


def module_scale(cfg: dict[str, Any], module: str, rank: int) -> float:
    """s for one module: alpha/r or alpha/sqrt(r), r and alpha after rank/alpha patterns."""
    r = int(pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]))
    alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"]))
    if r != rank:
        raise AdapterError(
            f"{module}: lora_A has {rank} rows but the config gives it rank {r} "
            "(r / rank_pattern): the adapter's config and weights disagree"
        )
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


@dataclass(frozen=True)
class AdapterUpdates:
    """Everything analysis reads from one adapter directory."""

    path: Path
    config: dict[str, Any]
    updates: list[LowRankUpdate]
    """One per adapted module, in the file's module order."""
    ignored: list[str]
    """Tensors that are not LoRA factors of a linear map (modules_to_save, embedding LoRA)."""


def read_updates(path: str | Path, modules: str | None = None) -> AdapterUpdates:
    """The adapter at `path` (or the adapter/ inside a run directory) as low-rank updates.

    `modules`: keep only module paths that match this regex (re.search).
    """
    try:
        adapter_dir = adapter_files.resolve_adapter_dir(path)
        cfg = read_analysis_config(adapter_dir)
        weights = adapter_files.read_adapter_weights(adapter_dir)
        fused = adapter_files.read_meta(adapter_dir).get("fused_slices", {})
    except adapter_files.AdapterError as exc:  # the loader's own error class is not a UserError
        raise AdapterError(str(exc)) from exc
    pairs: dict[str, dict[str, Tensor]] = {}
    ignored = []
    for key, value in weights.items():
        m = _FACTOR_KEY.fullmatch(key)
        if m is None:
            ignored.append(key)
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    try:
        pattern = re.compile(modules) if modules else None
    except re.error as exc:
        raise AdapterError(f"--modules {modules!r} is not a regular expression: {exc}") from exc
    updates = []
    for module, factors in pairs.items():
        if set(factors) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{adapter_dir}: {module} has {sorted(factors)} but needs both")
        if pattern is not None and not pattern.search(module):
            continue
        a, b = factors["lora_A"].double(), factors["lora_B"].double()
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise AdapterError(
                f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not multiply"
            )
        updates.append(
            LowRankUpdate(
                module=module,
                a=a,
                b=b,
                scale=module_scale(cfg, module, int(a.shape[0])),
                out_features=int(b.shape[0]),
                fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
                slice_names=_recorded_slices(fused, module),
            )
        )
    if not updates:
        raise AdapterError(
            f"{adapter_dir} has no LoRA factors"
            + (f" on modules matching {modules!r}" if modules else "")
        )
    return AdapterUpdates(adapter_dir, cfg, updates, sorted(ignored))


def _recorded_slices(fused: dict[str, list[str]], module: str) -> tuple[str, ...]:
    """The slices lora_dist.json records for `module` (keyed by target name), or ()."""
    for target, names in fused.items():
        if module == target or module.endswith("." + target):
            return tuple(names)
    return ()


def _column_blocks(nonzero: Tensor) -> list[list[int]]:
    """Groups of B's columns linked by shared non-zero rows (all-zero columns left out)."""
    r = nonzero.shape[1]
    linked = (nonzero.T.double() @ nonzero.double()) > 0
    label = [-1] * r
    blocks: list[list[int]] = []
    for start in range(r):
        if label[start] >= 0 or not linked[start, start]:
            continue
        label[start] = len(blocks)
        stack, block = [start], []
        while stack:
            col = stack.pop()
            block.append(col)
            for other in torch.nonzero(linked[col]).flatten().tolist():
                if label[other] < 0:
                    label[other] = label[start]
                    stack.append(other)
        blocks.append(sorted(block))
    return blocks


def _slice_name(update: LowRankUpdate, cols: list[int]) -> str | None:
    """q, k or v when lora_dist.json names the slices and `cols` are exactly one slice's block
    of B's columns (a lora-dist export puts slice i in columns i·r to (i+1)·r)."""
    names = update.slice_names
    if not names or update.rank % len(names):
        return None
    r = update.rank // len(names)
    first = cols[0] // r
    return names[first] if cols == list(range(first * r, (first + 1) * r)) else None


def row_slices(update: LowRankUpdate) -> list[LowRankUpdate]:
    """The row blocks of a block-structured B (a fused-slice adapter), or [] if B is one block.

    Each block is the columns of B linked by shared non-zero rows and the rows they touch; its
    update scale·B[rows, cols]·A[cols] equals ΔW restricted to those rows exactly. Blocks are
    numbered by their first row, and named q, k or v where the adapter's lora_dist.json says.
    """
    nonzero = update.b != 0
    blocks = _column_blocks(nonzero)
    if len(blocks) < 2:
        return []
    found = []
    for cols in blocks:
        rows = torch.nonzero(nonzero[:, cols].any(dim=1)).flatten()
        found.append((int(rows[0]), rows, cols))
    found.sort(key=lambda item: item[0])
    return [
        LowRankUpdate(
            module=update.module,
            a=update.a[cols],
            b=update.b[rows][:, cols],
            scale=update.scale,
            out_features=update.out_features,
            fan_in_fan_out=update.fan_in_fan_out,
            rows=rows,
            slice_index=index,
            slice_name=_slice_name(update, cols),
        )
        for index, (_, rows, cols) in enumerate(found)
    ]


def analysis_targets(updates: list[LowRankUpdate], slices: bool = True) -> list[LowRankUpdate]:
    """Every module's update, each followed by its row slices when `slices` and it has any."""
    targets = []
    for update in updates:
        targets.append(update)
        if slices:
            targets.extend(row_slices(update))
    return targets
