"""The three Section 7 reports as plain dicts: spectrum, subspace similarity, amplification.

Every number is computed in float64 from the factors (and, for amplification, from W read one
tensor at a time); no d x d matrix is ever formed. Each report lists its targets: every
adapted module, and each row slice of a block-structured (fused-slice) adapter.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_dist.analysis.base_weights import SafetensorsWeights, WeightMatrix, stored_layout
from lora_dist.analysis.lowrank import (
    effective_rank,
    energy_fractions,
    expected_random_similarity,
    lowrank_svd,
    projected_norm,
    random_orthonormal,
    right_singular_basis,
    similarity_from_bases,
    top_singular_subspace,
)
from lora_dist.analysis.updates import AdapterUpdates, LowRankUpdate

Progress = Callable[[str], None] | None
_CONFIG_KEYS = (
    "r",
    "lora_alpha",
    "use_rslora",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "base_model_name_or_path",
)


def adapter_summary(adapter: AdapterUpdates) -> dict[str, Any]:
    """The adapter's path, the config fields that shape ΔW, and the tensors left out."""
    return {
        "path": str(adapter.path),
        "config": {k: adapter.config.get(k) for k in _CONFIG_KEYS},
        "ignored_tensors": adapter.ignored,
    }


def spectrum_report(adapter: AdapterUpdates, targets: list[LowRankUpdate]) -> dict[str, Any]:
    """Singular values of ΔW = s·B·A per target, its norm and its effective rank."""
    rows = []
    for t in targets:
        s = lowrank_svd(t.b, t.a, t.scale).s
        rows.append(
            {
                **t.describe(),
                "singular_values": s.tolist(),
                "frobenius_norm": float(s.norm()),
                "energy": energy_fractions(s).tolist(),
                "effective_rank_90": effective_rank(s, 0.90),
                "effective_rank_99": effective_rank(s, 0.99),
            }
        )
    return {"command": "spectrum", "adapter": adapter_summary(adapter), "targets": rows}


def _basis(t: LowRankUpdate, factor: str) -> torch.Tensor:
    """Right-singular vectors of A (input space), or left-singular vectors of B (output)."""
    return right_singular_basis(t.a if factor == "A" else t.b.T)


def _target_key(t: LowRankUpdate) -> tuple[str, tuple[int, ...] | None]:
    return t.module, None if t.rows is None else tuple(t.rows.tolist())


def random_similarity(r1: int, r2: int, dim: int, seed: int) -> torch.Tensor:
    """φ between two seeded Gaussian r1 x dim and r2 x dim matrices (the paper's Figure 4 right)."""
    gen = torch.Generator().manual_seed(seed)
    a1 = torch.randn(r1, dim, generator=gen, dtype=torch.float64)
    a2 = torch.randn(r2, dim, generator=gen, dtype=torch.float64)
    return similarity_from_bases(right_singular_basis(a1), right_singular_basis(a2))


def similarity_report(
    first: AdapterUpdates,
    first_targets: list[LowRankUpdate],
    second: AdapterUpdates,
    second_targets: list[LowRankUpdate],
    factor: str = "A",
    seed: int = 0,
) -> dict[str, Any]:
    """φ(i, j) between the two adapters' top singular directions, for every common target.

    factor "A" is Section 7.2's definition (right-singular vectors of A, in the input space);
    "B" uses the left-singular vectors of B (the output space) instead.
    """
    by_key = {_target_key(t): t for t in second_targets}
    rows, shapes = [], set()
    for t1 in first_targets:
        t2 = by_key.get(_target_key(t1))
        if t2 is None:
            continue
        phi = similarity_from_bases(_basis(t1, factor), _basis(t2, factor))
        dim = t1.in_features if factor == "A" else int(t1.b.shape[0])
        r1, r2 = phi.shape
        shapes.add((r1, r2, dim))
        n = min(r1, r2)
        rows.append(
            {
                **{k: v for k, v in t1.describe().items() if k not in ("rank", "scale")},
                "rank_1": t1.rank,
                "rank_2": t2.rank,
                "dim": dim,
                "phi": phi.tolist(),
                "phi_diagonal": phi.diagonal().tolist(),
                "expected_random_diagonal": [
                    expected_random_similarity(i, i, dim) for i in range(1, n + 1)
                ],
            }
        )
    first_keys = {_target_key(t) for t in first_targets}
    return {
        "command": "similarity",
        "factor": factor,
        "adapter_1": adapter_summary(first),
        "adapter_2": adapter_summary(second),
        "targets": rows,
        "only_in_1": [t.name for t in first_targets if _target_key(t) not in by_key],
        "only_in_2": [t.name for t in second_targets if _target_key(t) not in first_keys],
        "random_reference": [
            {
                "rank_1": r1,
                "rank_2": r2,
                "dim": dim,
                "phi": random_similarity(r1, r2, dim, seed).tolist(),
            }
            for r1, r2, dim in sorted(shapes)
        ],
    }


def target_seed(seed: int, name: str) -> int:
    """The seed of one target's random subspace: fixed by --seed and the target's name alone."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _amplification_row(
    t: LowRankUpdate, w: WeightMatrix, seed: int, top: int | None, tol: float, max_iters: int
) -> dict[str, Any]:
    svd = lowrank_svd(t.b, t.a, t.scale)
    k = min(top or t.rank, len(svd.s))
    delta = svd.top(k)
    m, n = w.shape
    gen = torch.Generator().manual_seed(target_seed(seed, t.name))
    u_rand, v_rand = random_orthonormal(m, k, gen), random_orthonormal(n, k, gen)
    own = top_singular_subspace(w.matmul, w.rmatmul, w.shape, k, gen, tol, max_iters)
    w_norm = w.frobenius_norm()
    delta_norm = float(svd.s.norm())
    through_delta = projected_norm(w.matmul, delta.u, delta.vh)
    return {
        **t.describe(),
        "k": k,
        "delta_frobenius_norm": delta_norm,
        "w_frobenius_norm": w_norm,
        "projection": {
            "delta": through_delta,
            "w": projected_norm(w.matmul, own.svd.u, own.svd.vh),
            "random": projected_norm(w.matmul, u_rand, v_rand.T),
        },
        # E||UᵀWV||_F² = (k/m)(k/n)||W||_F² for independent uniform U (m x k) and V (n x k).
        "random_expected": k / (m * n) ** 0.5 * w_norm,
        "amplification": delta_norm / through_delta if through_delta > 0 else None,
        "delta_over_w": delta_norm / w_norm if w_norm > 0 else None,
        "w_top_iterations": own.iterations,
        "w_top_converged": own.converged,
    }


def amplification_report(
    adapter: AdapterUpdates,
    targets: list[LowRankUpdate],
    base: SafetensorsWeights,
    seed: int = 0,
    top: int | None = None,
    tol: float = 1e-10,
    max_iters: int = 200,
    progress: Progress = None,
) -> dict[str, Any]:
    """Table 7 per target: ||Uᵀ·W·Vhᵀ||_F for U, Vh from ΔW, from W's own top-k, and random.

    k is `top` (default: the target's rank). The amplification factor is ||ΔW||_F over the
    first of these. Base tensors are read one at a time, in file order, and each serves the
    module's whole update and its row slices before it is dropped.
    """
    modules: dict[str, list[LowRankUpdate]] = {}
    for t in targets:
        modules.setdefault(t.module, []).append(t)
    names = {module: base.tensor_name(module) for module in modules}
    order = sorted(
        modules,
        key=lambda mod: (str(base.locations[names[mod]].file), base.locations[names[mod]].start),
    )
    results: dict[tuple[str, int | None], dict[str, Any]] = {}
    for module in order:
        loc = base.locations[names[module]]
        first = modules[module][0]
        transposed = stored_layout(
            loc.shape, first.out_features, first.in_features, first.fan_in_fan_out
        )
        stored = base.read(names[module])
        for t in modules[module]:
            row = _amplification_row(
                t, WeightMatrix(stored, transposed, t.rows), seed, top, tol, max_iters
            )
            results[t.module, t.slice_index] = {
                **row,
                "base_tensor": names[module],
                "base_transposed": transposed,
            }
            if progress:
                amp = row["amplification"]
                shown = "undefined" if amp is None else f"{amp:.4g}"
                progress(
                    f"{t.name}: ||dW||_F {row['delta_frobenius_norm']:.4g}, amplification {shown}"
                )
        del stored
    return {
        "command": "amplification",
        "adapter": adapter_summary(adapter),
        "base": [str(f) for f in base.files],
        "seed": seed,
        "top": top,
        "targets": [results[t.module, t.slice_index] for t in targets],
    }


def write_json(report: dict[str, Any], path: Path) -> Path:
    """The report as indented JSON at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path
